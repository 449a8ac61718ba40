"""Fixtures that run a devbroker: in-process on port 0, or as a ``python -m ampsflow``
subprocess that can be killed with SIGKILL and restarted on the same ports and data."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import AMPS
import pytest

from ampsflow.config import DevbrokerConfig
from ampsflow.devbroker.auth import Users
from ampsflow.devbroker.broker import Broker
from tests.support.processes import free_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[3]
DEADLINE_S = 15.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class RunningBroker:
    """A :class:`Broker` on its own event loop in a background thread."""

    def __init__(self, config: DevbrokerConfig, users: Users | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.broker = Broker(config, users=users)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.broker.start(), self.loop).result(DEADLINE_S)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.broker.stop(), self.loop).result(DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)
        self.loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the broker's loop (to read its state safely) and return its result."""

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(DEADLINE_S)

    def counter(self, name: str) -> int:
        value: int = self.call(lambda: getattr(self.broker.counters, name))
        return value

    @property
    def tcp_uri(self) -> str:
        return f"tcp://127.0.0.1:{self.broker.tcp_port}/amps/json"

    @property
    def ws_uri(self) -> str:
        return f"ws://127.0.0.1:{self.broker.websocket_port}/amps/json"


def broker_config(data_dir: Path, **overrides: Any) -> DevbrokerConfig:
    """A devbroker config on ephemeral loopback ports with ``data_dir`` as its log."""
    values: dict[str, Any] = {
        "tcp": "127.0.0.1:0",
        "websocket": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "commit_delay_ms": 0,
    }
    values.update(overrides)
    return DevbrokerConfig(**values)


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    """Start in-process brokers (``start_broker(users=..., **config)``); all stop at teardown."""
    running: list[RunningBroker] = []

    def start(users: Users | None = None, **overrides: Any) -> RunningBroker:
        data_dir = tmp_path / f"data{len(running)}"
        broker = RunningBroker(broker_config(data_dir, **overrides), users=users)
        running.append(broker)
        broker.start()
        return broker

    yield start
    for broker in running:
        broker.stop()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One in-process broker for a whole test module (tests use distinct topics)."""
    broker = RunningBroker(broker_config(tmp_path_factory.mktemp("devbroker")))
    broker.start()
    yield broker
    broker.stop()


class BrokerProcess:
    """``python -m ampsflow devbroker`` as a subprocess on fixed loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.config = directory / "ampsflow.yaml"
        self.config.write_text("logging:\n  level: debug\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def tcp_uri(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}/amps/json"

    @property
    def ws_uri(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/amps/json"

    def start(self) -> None:
        self.starts += 1
        log = (self.directory / f"broker{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ampsflow",
                "devbroker",
                "--config",
                str(self.config),
                "--tcp",
                f"127.0.0.1:{self.tcp_port}",
                "--websocket",
                f"127.0.0.1:{self.ws_port}",
                "--data-dir",
                str(self.data_dir),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        wait_until(self._listening, "the devbroker subprocess to listen")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"devbroker exited with {self.proc.returncode}: {self.output()}")
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", self.ws_port))
            except OSError:
                return False
        return True

    def output(self) -> str:
        return "\n".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.directory.glob("broker*.log"))
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(DEADLINE_S)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(DEADLINE_S)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE_S)


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A started devbroker subprocess, killed at teardown whatever state it is in."""
    proc = BrokerProcess(tmp_path)
    try:
        proc.start()
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture
def connect() -> Iterator[Callable[..., AMPS.Client]]:
    """Connect and log on official clients; all are closed at teardown."""
    clients: list[AMPS.Client] = []

    def make(uri: str, name: str | None = None) -> AMPS.Client:
        client = AMPS.Client(name or f"c{uuid.uuid4().hex[:8]}")
        clients.append(client)
        client.connect(uri)
        client.logon()
        return client

    yield make
    for client in clients:
        with contextlib.suppress(AMPS.AMPSException):
            client.close()
