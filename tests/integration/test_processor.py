"""The processor daemon as a subprocess against a real devbroker subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import AMPS
import pytest

from ampsflow.core.codec import TraceParent, decode_correlation_id, encode_correlation_id
from ampsflow.devbroker.auth import hash_password
from tests.support.processes import (
    REPO,
    Daemon,
    Devbroker,
    Processes,
    pipeline_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

SETTLE_S = 60.0


def trace_parent(i: int) -> TraceParent:
    return TraceParent(version=0, trace_id=0xA0000 + i, span_id=0xB0000 + i, flags=1)


class Reader:
    """Collects every message on a topic from the start of the log (official client).

    Messages are keyed by bookmark: a replay after the reader's own reconnect
    delivers the same broker message again, which is not a duplicate output.
    """

    def __init__(self, uri: str, topic: str) -> None:
        self.messages: dict[str, tuple[dict[str, Any] | bytes, str | None]] = {}
        self._lock = threading.Lock()
        self._client = AMPS.HAClient(f"reader-{uuid.uuid4().hex[:8]}", no_store=True)
        chooser = AMPS.DefaultServerChooser()
        chooser.add(uri)
        self._client.set_server_chooser(chooser)
        self._client.connect_and_logon()
        self._client.bookmark_subscribe(self._on_message, topic, "0", timeout=10000)

    def _on_message(self, message: Any) -> None:
        raw = message.get_data_raw()
        try:
            body: dict[str, Any] | bytes = json.loads(raw)
        except ValueError:
            body = raw
        with self._lock:
            self.messages[message.get_bookmark()] = (body, message.get_correlation_id() or None)

    def snapshot(self) -> list[tuple[dict[str, Any] | bytes, str | None]]:
        with self._lock:
            return list(self.messages.values())

    def ids(self) -> list[int]:
        return [b["id"] for b, _ in self.snapshot() if isinstance(b, dict) and "id" in b]

    def close(self) -> None:
        self._client.close()


class Publisher:
    """Publishes numbered messages through a durable client that survives broker restarts."""

    def __init__(self, uri: str, store: Path) -> None:
        self._client = AMPS.HAClient(f"pub-{uuid.uuid4().hex[:8]}", publish_store=str(store))
        chooser = AMPS.DefaultServerChooser()
        chooser.add(uri)
        self._client.set_server_chooser(chooser)
        self._client.set_reconnect_delay_strategy(AMPS.FixedDelayStrategy(200))
        self._client.connect_and_logon()
        self._thread: threading.Thread | None = None

    def publish(self, i: int, body: str | None = None) -> None:
        cid = encode_correlation_id(trace_parent(i))
        self._client.publish("internal", body or json.dumps({"id": i}), correlation_id=cid)

    def publish_many(self, ids: range, rate_per_s: float) -> None:
        """Publish ``ids`` at a steady rate on a background thread."""

        def run() -> None:
            for i in ids:
                self.publish(i)
                time.sleep(1 / rate_per_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join(SETTLE_S)
        self._client.publish_flush(int(SETTLE_S * 1000))

    def close(self) -> None:
        self._client.close()


@pytest.fixture
def broker(processes: Processes) -> Devbroker:
    return processes.devbroker()


@pytest.fixture
def config(tmp_path: Path, broker: Devbroker) -> Path:
    return write_config(tmp_path / "ampsflow.yaml", pipeline_config(tmp_path, broker))


@pytest.fixture
def processor(processes: Processes, config: Path) -> Daemon:
    return processes.service("processor", config)


@pytest.fixture
def output(broker: Devbroker) -> Iterator[Reader]:
    reader = Reader(broker.uri, "external")
    yield reader
    reader.close()


@pytest.fixture
def dead_letters(broker: Devbroker) -> Iterator[Reader]:
    reader = Reader(broker.uri, "internal.dlq")
    yield reader
    reader.close()


@pytest.fixture
def publisher(broker: Devbroker, tmp_path: Path) -> Iterator[Publisher]:
    client = Publisher(broker.uri, tmp_path / "publisher.store")
    yield client
    client.close()


def wait_for_ids(reader: Reader, count: int) -> list[int]:
    wait_for(
        lambda: len(set(reader.ids())) >= count,
        timeout_s=SETTLE_S,
        what=f"{count} distinct messages on the output",
    )
    # Anything duplicated would arrive right behind the originals: read once more
    # after the processor has gone idle.
    return reader.ids()


class TestProcessing:
    def test_messages_are_marked_processed(
        self, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """Every input appears once on the output with processed: true."""
        for i in range(20):
            publisher.publish(i)
        publisher.finish()
        wait_for_ids(output, 20)
        bodies = [b for b, _ in output.snapshot() if isinstance(b, dict)]
        assert (list(range(20)), {True}) == (
            sorted(b["id"] for b in bodies),
            {b["processed"] for b in bodies},
        )

    def test_correlation_chain(
        self, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """The output keeps the input's trace id under a new span id, in header and payload."""
        publisher.publish(7)
        publisher.finish()
        wait_for_ids(output, 1)
        ((body, header),) = output.snapshot()
        assert isinstance(body, dict)
        sent = trace_parent(7)
        decoded = decode_correlation_id(header or "")
        assert (sent.trace_id, True, header) == (
            decoded.trace_id,
            decoded.span_id != sent.span_id,
            body["CorrelationId"],
        )

    def test_bad_input_goes_to_dead_letters_while_good_flows(
        self, processor: Daemon, publisher: Publisher, output: Reader, dead_letters: Reader
    ) -> None:
        """Invalid bodies reach the dead-letter topic with a reason; valid ones are processed."""
        bad = {3: "{not json", 6: "[1,2,3]", 9: '"text"'}
        for i in range(12):
            publisher.publish(i, bad.get(i))
        publisher.finish()
        wait_for_ids(output, 9)
        wait_for(lambda: len(dead_letters.snapshot()) >= 3, timeout_s=SETTLE_S, what="3 DLQ")
        reasons = sorted(
            (b["body"], b["reason"]) for b, _ in dead_letters.snapshot() if isinstance(b, dict)
        )
        assert (
            sorted(set(range(12)) - set(bad)),
            sorted(
                [
                    ("{not json", "invalid_json"),
                    ("[1,2,3]", "not_an_object"),
                    ('"text"', "not_an_object"),
                ]
            ),
            True,
        ) == (sorted(output.ids()), reasons, processor.running)


class TestLifecycle:
    def test_ready_is_announced(self, processor: Daemon) -> None:
        """The processor sends READY=1 with a status once subscribed."""
        assert processor.notify.values("READY") == ["1"]

    def test_sigterm_exits_zero_and_says_stopping(self, processor: Daemon) -> None:
        """SIGTERM drains and exits 0 after STOPPING=1."""
        code = processor.terminate()
        assert (code, processor.notify.values("STOPPING")) == (0, ["1"])

    def test_sigterm_under_load_loses_nothing(
        self, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """SIGTERM mid-stream, then a restart: every message exactly once."""
        publisher.publish_many(range(300), rate_per_s=200)
        wait_for(lambda: len(output.ids()) >= 50, timeout_s=SETTLE_S, what="50 outputs")
        assert processor.terminate() == 0
        processor.restart()
        publisher.finish()
        ids = wait_for_ids(output, 300)
        assert (list(range(300)), 300) == (sorted(set(ids)), len(ids))

    def test_kill9_restart_loses_nothing(
        self, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """SIGKILL mid-stream, then a restart: every message is published, at most one twice.

        A kill between storing an output and discarding its input republishes that one
        message after the restart (at-least-once into the output topic); the persister
        drops the repeat by message id, which tests/faults/test_crashes.py proves.
        """
        publisher.publish_many(range(300), rate_per_s=200)
        wait_for(lambda: len(output.ids()) >= 50, timeout_s=SETTLE_S, what="50 outputs")
        processor.kill()
        processor.restart()
        publisher.finish()
        ids = wait_for_ids(output, 300)
        assert list(range(300)) == sorted(set(ids))
        assert len(ids) - len(set(ids)) <= 1, "more than the one message in flight at the kill"

    def test_broker_kill9_is_survived(
        self, broker: Devbroker, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """The broker killed and restarted mid-stream: the processor reconnects, nothing lost."""
        publisher.publish_many(range(300), rate_per_s=200)
        wait_for(lambda: len(output.ids()) >= 50, timeout_s=SETTLE_S, what="50 outputs")
        broker.kill()
        broker.restart()
        publisher.finish()
        ids = wait_for_ids(output, 300)
        statuses = processor.notify.values("STATUS")
        assert (list(range(300)), 300, True, True) == (
            sorted(set(ids)),
            len(ids),
            processor.running,
            any("reconnecting" in s or "cannot reach" in s for s in statuses),
        )

    def test_sighup_keeps_running(
        self, processor: Daemon, publisher: Publisher, output: Reader
    ) -> None:
        """SIGHUP does not stop the processor."""
        processor.signal(signal.SIGHUP)
        publisher.publish(1)
        publisher.finish()
        wait_for_ids(output, 1)
        assert processor.running

    def test_startup_failure_is_one_line(self, processes: Processes, tmp_path: Path) -> None:
        """An unusable state_dir exits non-zero with one clear line on stderr."""
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        broker = processes.devbroker("broker2")
        config = pipeline_config(
            tmp_path, broker, overrides={"processor": {"state_dir": str(blocker / "state")}}
        )
        daemon = processes.service(
            "processor", write_config(tmp_path / "bad.yaml", config), start=False
        )
        with pytest.raises(AssertionError, match="exited with 1"):
            daemon.start()
        assert any(
            line.startswith("ampsflow processor: cannot open the AMPS stores")
            for line in daemon.log_text().splitlines()
        )


class TestSupervision:
    def test_watchdog_is_pinged(self, processes: Processes, config: Path) -> None:
        """With WATCHDOG_USEC set, the consumer loop sends WATCHDOG=1."""
        daemon = processes.service("processor", config, env={"WATCHDOG_USEC": "400000"})
        wait_for(
            lambda: len(daemon.notify.values("WATCHDOG")) >= 3,
            timeout_s=SETTLE_S,
            what="three watchdog pings",
        )
        assert daemon.running

    def test_sigterm_while_broker_is_unreachable(
        self, processes: Processes, tmp_path: Path, broker: Devbroker
    ) -> None:
        """SIGTERM during the connection backoff ends the daemon at once with status 0."""
        broker.kill()
        config = write_config(tmp_path / "down.yaml", pipeline_config(tmp_path, broker))
        daemon = processes.service("processor", config, start=False)
        daemon.start(wait=False)
        wait_for(
            lambda: any("cannot reach AMPS" in s for s in daemon.notify.values("STATUS")),
            timeout_s=SETTLE_S,
            what="a failed connection attempt",
        )
        assert (daemon.terminate(timeout_s=10), daemon.notify.values("READY")) == (0, [])

    def test_daemonize_with_pid_file(
        self, tmp_path: Path, broker: Devbroker, publisher: Publisher, output: Reader
    ) -> None:
        """--daemonize detaches, holds the pid file, processes, and stops on SIGTERM."""
        pid_file = tmp_path / "processor.pid"
        log_file = tmp_path / "processor.log"
        config = write_config(
            tmp_path / "daemon.yaml",
            pipeline_config(tmp_path, broker, overrides={"logging": {"file": str(log_file)}}),
        )
        launcher = subprocess.run(
            [
                sys.executable,
                "-m",
                "ampsflow",
                "processor",
                "--config",
                str(config),
                "--daemonize",
                "--pid-file",
                str(pid_file),
            ],
            cwd=REPO,
            capture_output=True,
            timeout=SETTLE_S,
            check=False,
        )
        pid = 0
        try:
            wait_for(pid_file.exists, timeout_s=SETTLE_S, what="the pid file")
            wait_for(lambda: pid_file.read_text().strip().isdigit(), timeout_s=10, what="a pid")
            pid = int(pid_file.read_text())
            wait_for(lambda: "ready:" in _read(log_file), timeout_s=SETTLE_S, what="ready")
            publisher.publish(1)
            publisher.finish()
            wait_for_ids(output, 1)
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not _alive(pid), timeout_s=SETTLE_S, what="the daemon to exit")
            pid = 0
        finally:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert (
            launcher.returncode,
            pid_file.exists(),
            "stopped" in _read(log_file),
        ) == (0, False, True)


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TestAuthentication:
    @pytest.fixture
    def secured(self, processes: Processes, tmp_path: Path) -> Devbroker:
        users = tmp_path / "users"
        users.write_text(f"alice:{hash_password('s3cret', iterations=1000)}\n")
        return processes.devbroker("secured", users_file=users)

    def config_with(self, tmp_path: Path, broker: Devbroker, password: str) -> Path:
        secret = tmp_path / f"password-{password}"
        secret.write_text(password + "\n")
        amps = {"user": "alice", "password_file": str(secret)}
        return write_config(
            tmp_path / f"auth-{password}.yaml",
            pipeline_config(tmp_path, broker, overrides={"amps": amps}),
        )

    def test_password_file_logs_on(
        self, processes: Processes, tmp_path: Path, secured: Devbroker
    ) -> None:
        """With the right password from amps.password_file the processor becomes ready."""
        daemon = processes.service("processor", self.config_with(tmp_path, secured, "s3cret"))
        assert ["1"] == daemon.notify.values("READY")

    def test_refused_logon_is_a_startup_failure(
        self, processes: Processes, tmp_path: Path, secured: Devbroker
    ) -> None:
        """A refused logon exits 1 with one clear line instead of retrying forever."""
        daemon = processes.service(
            "processor", self.config_with(tmp_path, secured, "wrong"), start=False
        )
        with pytest.raises(AssertionError, match="exited with 1"):
            daemon.start()
        assert any(
            line.startswith("ampsflow processor: AMPS refused the logon")
            for line in daemon.log_text().splitlines()
        )
