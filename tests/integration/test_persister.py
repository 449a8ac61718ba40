"""The persister daemon as a subprocess against the devbroker, fed by the official client.

Each test starts its own devbroker and persister on free loopback ports in a
fresh directory, publishes uniquely identified messages to ``external`` with
``tests.support.load.SteadyPublisher`` (official Python client, durable publish
store), and checks the JSONL with the audit (:func:`ampsflow.core.audit.reconcile`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ampsflow.core.audit import AuditReport, reconcile
from tests.support.load import LoadConfig, SteadyPublisher

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class Process:
    """A command run with ``python -m ampsflow``, output to a log file; stopped by pid."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ampsflow", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Pipeline:
    """A devbroker and a persister (restartable) in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp = free_port()
        self.jsonl = root / "out" / "messages.jsonl"
        self.jsonl.parent.mkdir()
        self.config = root / "ampsflow.yaml"
        self.config.write_text(
            f"""
amps:
  uri: tcp://127.0.0.1:{self.tcp}/amps/json
  client_name: test-persister
  reconnect_max_delay_s: 1.0
telemetry:
  exporter: none
persister:
  path: {self.jsonl}
  state_dir: {root / "state"}
  max_batch_delay_ms: 5
logging:
  level: debug
""",
            encoding="utf-8",
        )
        self.published = root / "published.txt"
        self.broker = Process(
            [
                "devbroker",
                "--tcp",
                f"127.0.0.1:{self.tcp}",
                "--websocket",
                f"127.0.0.1:{free_port()}",
                "--data-dir",
                str(root / "broker"),
            ],
            root / "devbroker.log",
        )
        self.persisters: list[Process] = []

    @property
    def persister(self) -> Process:
        return self.persisters[-1]

    def start_broker(self) -> None:
        self.broker.start()
        wait_for(lambda: "listening" in self.broker.output(), "the devbroker to listen")

    def start_persister(self) -> Process:
        process = Process(
            ["persister", "--config", str(self.config)],
            self.root / f"persister-{len(self.persisters)}.log",
        )
        self.persisters.append(process.start())
        wait_for(lambda: "ready:" in process.output(), "the persister to be ready")
        return process

    def publisher(self, rate_per_s: float = 400.0) -> SteadyPublisher:
        return SteadyPublisher(
            LoadConfig(
                uri=f"tcp://127.0.0.1:{self.tcp}/amps/json",
                published_path=self.published,
                store_path=self.root / "publisher.store",
                topic="external",
                rate_per_s=rate_per_s,
            )
        )

    def lines(self, path: Path | None = None) -> list[dict[str, object]]:
        target = path or self.jsonl
        if not target.exists():
            return []
        with target.open("rb") as f:
            return [json.loads(line) for line in f if line.endswith(b"\n")]

    def line_count(self, path: Path | None = None) -> int:
        target = path or self.jsonl
        if not target.exists():
            return 0
        with target.open("rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))

    def published_count(self) -> int:
        if not self.published.exists():
            return 0
        return len(self.published.read_text(encoding="utf-8").splitlines())

    def audit(self, *paths: Path) -> AuditReport:
        def persisted() -> Iterator[bytes]:
            for path in paths or (self.jsonl,):
                with path.open("rb") as f:
                    yield from f

        with self.published.open(encoding="utf-8") as published:
            return reconcile(published, persisted())

    def stop(self) -> None:
        for process in reversed(self.persisters):
            process.stop()
        self.broker.stop()


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(tmp_path)
    try:
        p.start_broker()
        yield p
    finally:
        p.stop()


def lines_at_least(pipeline: Pipeline, count: int) -> Callable[[], bool]:
    """A condition: the JSONL holds at least ``count`` whole lines."""
    return lambda: pipeline.line_count() >= count


def assert_clean(report: AuditReport) -> None:
    """The audit found nothing lost, duplicated, reordered, torn or invalid."""
    problems = {
        "lost": report.lost[:10],
        "duplicated": dict(list(report.duplicated.items())[:10]),
        "out_of_order": report.out_of_order[:10],
        "torn": report.torn_last_line,
        "invalid": report.invalid_lines[:10],
    }
    expected = {"lost": [], "duplicated": {}, "out_of_order": [], "torn": False, "invalid": []}
    assert expected == problems


class TestDelivery:
    def test_published_messages_land_exactly_once(self, pipeline: Pipeline) -> None:
        """Messages published with the official client are each in the JSONL once, in order."""
        pipeline.start_persister()
        with pipeline.publisher() as publisher:
            publisher.wait_published(300)
        total = pipeline.published_count()
        wait_for(lambda: pipeline.line_count() >= total, f"{total} lines")
        assert_clean(pipeline.audit())

    def test_restart_mid_stream_loses_and_duplicates_nothing(self, pipeline: Pipeline) -> None:
        """kill -9 and SIGTERM restarts while messages flow: every message exactly once."""
        pipeline.start_persister()
        with pipeline.publisher() as publisher:
            restarts = ((150, signal.SIGKILL), (400, signal.SIGTERM), (650, signal.SIGKILL))
            for target, how in restarts:
                wait_for(lines_at_least(pipeline, target), f"{target} lines")
                pipeline.persister.signal(how)
                pipeline.persister.wait()
                pipeline.start_persister()
            publisher.wait_published(900)
        total = pipeline.published_count()
        wait_for(lambda: pipeline.line_count() >= total, f"{total} lines")
        assert_clean(pipeline.audit())


class TestSignals:
    def test_sighup_after_rename_writes_to_new_file(self, pipeline: Pipeline) -> None:
        """After a rename and SIGHUP, later messages go to a new file; none lost or doubled."""
        persister = pipeline.start_persister()
        rotated = pipeline.jsonl.with_name("messages.jsonl.1")
        with pipeline.publisher(rate_per_s=200) as publisher:
            wait_for(lambda: pipeline.line_count() >= 50, "50 lines")
            pipeline.jsonl.rename(rotated)
            persister.signal(signal.SIGHUP)
            wait_for(lambda: "reopened" in persister.output(), "the reopen")
            wait_for(lambda: pipeline.line_count() >= 50, "50 lines in the new file")
            publisher.wait_published(pipeline.line_count(rotated) + 100)
        total = pipeline.published_count()
        wait_for(
            lambda: pipeline.line_count(rotated) + pipeline.line_count() >= total,
            f"{total} lines in both files",
        )
        assert_clean(pipeline.audit(rotated, pipeline.jsonl))

    def test_sigterm_under_load_exits_zero_with_acked_on_disk(self, pipeline: Pipeline) -> None:
        """SIGTERM while busy: exit 0, and the resume point is a message already on disk."""
        persister = pipeline.start_persister()
        with pipeline.publisher(rate_per_s=600) as publisher:
            wait_for(lambda: pipeline.line_count() >= 200, "200 lines")
            persister.signal(signal.SIGTERM)
            status = persister.wait()
            on_disk = {
                meta["bookmark"]
                for meta in (line["_ampsflow"] for line in pipeline.lines())
                if isinstance(meta, dict)
            }
            restarted = pipeline.start_persister()
            resumed = next(
                line.split("resuming after ", 1)[1].strip()
                for line in restarted.output().splitlines()
                if "resuming after " in line
            )
            publisher.wait_published(publisher.published + 50)
        resume_points = [b + ("" if b.endswith("|") else "|") for b in resumed.split(",")]
        expected: tuple[int, list[str]] = (0, [])
        assert expected == (status, [b for b in resume_points if b not in on_disk])

    def test_unwritable_path_is_one_error_and_exit(self, pipeline: Pipeline) -> None:
        """A JSONL path in a missing directory: one stderr line, exit 1, no retries."""
        config = pipeline.config.read_text(encoding="utf-8")
        pipeline.config.write_text(
            config.replace(str(pipeline.jsonl), str(pipeline.root / "absent" / "m.jsonl")),
            encoding="utf-8",
        )
        result = subprocess.run(
            [sys.executable, "-m", "ampsflow", "persister", "--config", str(pipeline.config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        lines = result.stderr.strip().splitlines()
        expected = (1, 1, True)
        assert expected == (result.returncode, len(lines), "cannot open" in lines[-1])
