"""Run ampsflow's daemons as real subprocesses for integration and end-to-end tests.

The API, smallest first:

- :func:`free_port`, :func:`wait_for`, :func:`short_temp_dir`.
- :class:`Daemon`: one ``python -m ampsflow <command> ...`` subprocess with its own
  log file and sd_notify socket. :meth:`Daemon.start` waits until it is ready
  (``READY=1`` for the services, the TCP port for the devbroker);
  :meth:`Daemon.terminate` sends SIGTERM and returns the exit status;
  :meth:`Daemon.kill` sends SIGKILL; :meth:`Daemon.restart` starts it again with
  the same arguments, ports and state.
- :class:`Processes`: owns every daemon of a test and stops whatever is left at
  the end (the ``processes`` fixture in ``tests/conftest.py`` yields one), with
  :meth:`Processes.devbroker` and :meth:`Processes.service` to create them.
- :func:`pipeline_config`: the YAML mapping that points the services at a
  devbroker, at an OTLP endpoint and at per-test state directories.

Every process gets ``OTEL_METRICS_EXPORTER=none`` unless the caller passes
another value (trace backends such as Phoenix take no metrics).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05


_HANDED_OUT: set[int] = set()


@functools.cache
def _listener_ports() -> list[int]:
    """The ports above 10,000 that outgoing connections never take as their local port
    (those in ``ip_local_port_range``, Linux's default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        ephemeral = range(int(low), int(high) + 1)
    except (OSError, ValueError):
        ephemeral = range(32768, 61000)
    return [port for port in range(10_000, 65_536) if port not in ephemeral]


def free_port() -> int:
    """A loopback port for a listener: free now, and outside the ephemeral range.

    A port the kernel hands out for ``bind(("127.0.0.1", 0))`` is an ephemeral one,
    which any outgoing connection (an AMPS client of an earlier test) may take as its
    local port before the listener binds it ("address already in use"). Ports outside
    the ephemeral range are never taken that way; each is handed out once per process.
    """
    candidates = _listener_ports()
    for _ in range(1000):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def written_lines(path: Path) -> list[str]:
    """The complete lines of a file another process appends to (none if it is absent).

    A line the writer has not finished (no newline yet) is left out: a reader can
    see a ``write`` in progress half done.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()


def wait_for(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it is true.

    Raises:
        AssertionError: naming ``what`` when ``timeout_s`` passes first.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(POLL_S)


def short_temp_dir(prefix: str) -> Path:
    """A fresh directory under /tmp with a short path (unix socket paths max 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class NotifySocket:
    """A unix datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self._dir = short_temp_dir("af-sd-")
        self.path = self._dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._messages: list[str] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="sd-notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append(data.decode("utf-8", "replace"))

    def values(self, key: str) -> list[str]:
        """Every value sent for ``KEY=`` so far (e.g. all ``STATUS`` lines), in order."""
        with self._lock:
            messages = list(self._messages)
        return [
            line.partition("=")[2]
            for message in messages
            for line in message.splitlines()
            if line.partition("=")[0] == key
        ]

    def clear(self) -> None:
        """Forget the messages received so far (before a restart)."""
        with self._lock:
            self._messages.clear()

    def close(self) -> None:
        """Stop listening and remove the socket."""
        self._closed.set()
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Daemon:
    """One ``python -m ampsflow`` subprocess; stdout and stderr go to ``log_path``.

    Args:
        name: A label for messages (``processor``, ``devbroker``...).
        argv: Arguments after ``python -m ampsflow``.
        log_path: Where its output goes (appended to across restarts).
        env: Extra environment variables.
        ready_port: For the devbroker: ready once this port accepts connections.
            Services are ready when they send ``READY=1``.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        ready_port: int | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready_port = ready_port
        self.notify = NotifySocket()
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")
        }
        self.env = {
            **inherited,
            "OTEL_METRICS_EXPORTER": "none",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
            "NOTIFY_SOCKET": str(self.notify.path),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running process id."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S, *, wait: bool = True) -> Daemon:
        """Start and (unless ``wait=False``) wait until ready.

        Raises:
            AssertionError: with the log tail when it exits before it is ready.
        """
        assert not self.running, f"{self.name} is already running"
        self.notify.clear()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ampsflow", *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

        def ready() -> bool:
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited with {self.returncode} while starting:\n{self.log_tail()}"
                )
            if self.ready_port is not None:
                return port_open(self.ready_port)
            return bool(self.notify.values("READY"))

        if wait:
            wait_for(ready, timeout_s=timeout_s, what=f"{self.name} to become ready")
        return self

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited."""
        return self.process.poll() if self.process is not None else None

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait for the exit; returns the exit status.

        Raises:
            AssertionError: when it is still running after ``timeout_s`` (it is
                then killed).
        """
        assert self.process is not None, f"{self.name} was never started"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout_s}s:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL (no chance to flush anything) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running process."""
        assert self.running, f"{self.name} is not running"
        os.kill(self.pid, signum)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> Daemon:
        """Start again with the same arguments (after :meth:`kill` or :meth:`terminate`)."""
        return self.start(timeout_s)

    def log_text(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of its output."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        """Stop it if still running (SIGTERM, then SIGKILL) and release the socket."""
        if self.running:
            with contextlib.suppress(AssertionError):
                self.terminate(10)
        self.kill()
        self.notify.close()


class Devbroker(Daemon):
    """``ampsflow devbroker`` on two free loopback ports with a data directory."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        users_file: Path | None = None,
        config: Path | None = None,
    ) -> None:
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.data_dir = data_dir
        users = ["--users-file", str(users_file)] if users_file is not None else []
        if config is not None:
            users += ["--config", str(config)]
        super().__init__(
            "devbroker",
            [
                "devbroker",
                "--tcp",
                f"127.0.0.1:{self.tcp_port}",
                "--websocket",
                f"127.0.0.1:{self.ws_port}",
                "--data-dir",
                str(data_dir),
                *users,
            ],
            log_path,
            ready_port=self.tcp_port,
        )

    @property
    def uri(self) -> str:
        """The AMPS URI of its TCP listener."""
        return f"tcp://127.0.0.1:{self.tcp_port}/amps/json"


def pipeline_config(
    root: Path,
    broker: Devbroker,
    *,
    otlp_endpoint: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The YAML mapping for processor and persister against ``broker``.

    State lives below ``root`` (``processor/``, ``persister/``,
    ``messages.jsonl``); spans go to ``otlp_endpoint`` over OTLP/HTTP, or
    nowhere when it is ``None``. ``overrides`` are merged per section.
    """
    config: dict[str, Any] = {
        "amps": {"uri": broker.uri, "heartbeat_s": 2, "reconnect_max_delay_s": 1.0},
        "telemetry": (
            {"exporter": "otlp", "endpoint": otlp_endpoint, "schedule_delay_ms": 200}
            if otlp_endpoint
            else {"exporter": "none"}
        ),
        "processor": {"state_dir": str(root / "processor")},
        "persister": {
            "state_dir": str(root / "persister"),
            "path": str(root / "messages.jsonl"),
        },
        "logging": {"level": "info"},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` as YAML to ``path`` and return the path."""
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


class Processes:
    """Every daemon a test starts; :meth:`close` stops whatever is still running.

    Args:
        root: The test's own directory for logs, data and configs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._daemons: list[Daemon] = []

    def devbroker(
        self,
        name: str = "devbroker",
        *,
        users_file: Path | None = None,
        config: Path | None = None,
    ) -> Devbroker:
        """A started devbroker with its data under ``root/name`` (logons checked
        against ``users_file`` when given; other settings from ``config``)."""
        broker = Devbroker(self.root / name, self.root / f"{name}.log", users_file, config)
        self._daemons.append(broker)
        broker.start()
        return broker

    def service(
        self,
        command: str,
        config: Path,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> Daemon:
        """``ampsflow <command> --config <config>``, started (and ready) unless ``start=False``."""
        label = name or command
        daemon = Daemon(
            label, [command, "--config", str(config)], self.root / f"{label}.log", env=env
        )
        self._daemons.append(daemon)
        if start:
            daemon.start()
        return daemon

    def close(self) -> None:
        """Stop every daemon, services first, the broker last."""
        for daemon in sorted(self._daemons, key=lambda d: isinstance(d, Devbroker)):
            daemon.close()


@contextlib.contextmanager
def processes(root: Path) -> Iterator[Processes]:
    """A :class:`Processes` that is always cleaned up."""
    group = Processes(root)
    try:
        yield group
    finally:
        group.close()
