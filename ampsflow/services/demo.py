"""``ampsflow demo``: the whole pipeline on loopback with one command.

Starts the devbroker, the processor, the persister and the marker web server
as child processes, with a generated config and all state under ``--dir``:

```
DIR/ampsflow.yaml          the generated config (one file for every service)
DIR/messages.jsonl         the persister's output
DIR/state/<service>/       devbroker transaction log, processor/persister state
DIR/logs/<service>.log     each service's log (its stderr)
```

Each child gets its own ``NOTIFY_SOCKET``, so readiness is the same
``READY=1`` that systemd waits for; the devbroker and the marker are also
probed on their ports. A thread reads every notify socket for the children's
whole life, as systemd does, so a child reporting many ``STATUS=`` lines never
blocks in sd_notify. Ctrl-C (SIGINT) or SIGTERM stops the children in
reverse order (marker, persister, processor, devbroker): SIGTERM, a grace
period, then SIGKILL. If a child exits on its own, the demo names it, stops
the rest and exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from ampsflow.config import Config, load_config
from ampsflow.errors import ConfigError, StartupError

STARTUP_TIMEOUT_S = 60.0
"""How long each service may take to report ready."""

STOP_GRACE_S = 15.0
"""How long a child may take to exit after SIGTERM before it is killed."""

POLL_INTERVAL_S = 0.1

NOTIFY_LINES_KEPT = 200
"""sd_notify lines kept per child (the latest), so a long run stays bounded."""

SERVICES = ("devbroker", "processor", "persister", "marker")
"""Start order; stop order is the reverse."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector endpoint (``.../v1/traces``)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def demo_config(
    directory: Path,
    *,
    broker_tcp_port: int,
    broker_ws_port: int,
    marker_port: int,
    otlp_endpoint: str | None,
    jaeger_ui_url: str | None = None,
) -> dict[str, Any]:
    """The YAML mapping of the demo's config, all state below ``directory``."""
    state = directory / "state"
    return {
        "amps": {"uri": f"tcp://127.0.0.1:{broker_tcp_port}/amps/json", "heartbeat_s": 5},
        # Every service sends its spans to the marker, which keeps them for the
        # page's journeys and forwards them to --otlp-endpoint when given.
        "telemetry": {
            "exporter": "otlp",
            "protocol": "http/protobuf",
            "endpoint": f"http://127.0.0.1:{marker_port}",
            "schedule_delay_ms": 200,
        },
        "processor": {"state_dir": str(state / "processor")},
        "persister": {
            "path": str(directory / "messages.jsonl"),
            "state_dir": str(state / "persister"),
        },
        "marker": {
            "listen": f"127.0.0.1:{marker_port}",
            "amps_websocket_upstream": f"ws://127.0.0.1:{broker_ws_port}/amps/json",
            "otlp_traces_upstream": traces_url(otlp_endpoint) if otlp_endpoint else None,
            "jaeger_ui_url": jaeger_ui_url,
        },
        "devbroker": {
            "tcp": f"127.0.0.1:{broker_tcp_port}",
            "websocket": f"127.0.0.1:{broker_ws_port}",
            "data_dir": str(state / "devbroker"),
        },
        "logging": {"level": "info", "file": None},
    }


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 (fixed loopback URL)
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# Variables that would override the generated config for every child alike:
# one service name for all four, or another collector than --otlp-endpoint.
_OVERRIDING_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
)


def child_environment(environ: Mapping[str, str], notify_path: Path) -> dict[str, str]:
    """The environment of a demo child.

    Variables that would override the demo's own config are removed. Metric
    export is off unless ``OTEL_METRICS_EXPORTER`` is set: the demo is about
    traces, and trace-only backends (Jaeger, Phoenix) reject ``/v1/metrics``.
    """
    env = {k: v for k, v in environ.items() if k not in _OVERRIDING_VARIABLES}
    env.setdefault("OTEL_METRICS_EXPORTER", "none")
    env["NOTIFY_SOCKET"] = str(notify_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Child:
    """One service process of the demo."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    notify: socket.socket
    is_ready: bool = False
    messages: deque[str] = field(default_factory=lambda: deque(maxlen=NOTIFY_LINES_KEPT))
    """The last :data:`NOTIFY_LINES_KEPT` sd_notify lines."""

    def read_notifications(self) -> None:
        """Collect pending sd_notify datagrams; READY=1 marks the child ready."""
        while True:
            try:
                data = self.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # closed while stopping
            for line in data.decode("utf-8", "replace").splitlines():
                self.messages.append(line)
                if line == "READY=1":
                    self.is_ready = True


class Demo:
    """The running children, started and stopped in order."""

    def __init__(
        self,
        directory: Path,
        config_path: Path,
        out: IO[str],
        *,
        command: Sequence[str] = (sys.executable, "-m", "ampsflow"),
    ) -> None:
        self.directory = directory
        self.config_path = config_path
        self.out = out
        self.command = tuple(command)
        self.children: list[Child] = []
        self.sockets_dir = Path(tempfile.mkdtemp(prefix="ampsflow-demo-"))
        self.stop_requested = threading.Event()
        # The notify sockets are read for the children's whole life, not only
        # until they are ready: a datagram socket's queue is short (10 by
        # default), and a child whose queue is full blocks inside sd_notify.
        self._selector = selectors.DefaultSelector()
        self._closing = threading.Event()
        self._reader = threading.Thread(
            target=self._read_notifications, name="notify-reader", daemon=True
        )
        self._reader.start()

    def _read_notifications(self) -> None:
        while not self._closing.is_set():
            try:
                events = self._selector.select(timeout=POLL_INTERVAL_S)
            except (OSError, ValueError):
                return
            for key, _ in events:
                child: Child = key.data
                child.read_notifications()

    def start(self, name: str) -> Child:
        """Start service ``name`` with its own log file and notify socket."""
        log_path = self.directory / "logs" / f"{name}.log"
        notify_path = self.sockets_dir / f"{name}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.setblocking(False)
        env = child_environment(os.environ, notify_path)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*self.command, name, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: Ctrl-C reaches only the demo, which stops the
                # children in order instead of all at once.
                start_new_session=True,
            )
        child = Child(name, process, log_path, notify)
        self.children.append(child)
        self._selector.register(notify, selectors.EVENT_READ, child)
        return child

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        for child in self.children:
            if child.process.poll() is not None:
                return child
        return None

    def wait_until(self, child: Child, ready: Callable[[Child], bool]) -> None:
        """Wait for ``ready(child)``.

        Raises:
            StartupError: when the child exits, the timeout passes, or a stop is requested.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.stop_requested.is_set():
            if ready(child):
                return
            dead = self.exited()
            if dead is not None:
                raise StartupError(_exit_message(dead))
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{child.name} did not become ready within {STARTUP_TIMEOUT_S:.0f} s "
                    f"(see {child.log_path})"
                )
            self.stop_requested.wait(POLL_INTERVAL_S)
        raise StartupError("interrupted during startup")

    def stop(self) -> None:
        """SIGTERM every child in reverse start order, wait, then kill."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    print(
                        f"ampsflow demo: {child.name} did not stop within {STOP_GRACE_S:.0f} s; "
                        "killing it",
                        file=self.out,
                    )
                    child.process.kill()
                    child.process.wait()
        self._closing.set()
        self._reader.join()
        self._selector.close()
        for child in self.children:
            child.notify.close()
        with contextlib.suppress(OSError):
            for path in self.sockets_dir.iterdir():
                path.unlink()
            self.sockets_dir.rmdir()


def _exit_message(child: Child) -> str:
    status = child.process.returncode
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    return f"{child.name} {how} (see {child.log_path})"


@contextlib.contextmanager
def _signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow demo``: run the pipeline on loopback until Ctrl-C."""
    del config  # the demo writes its own config below --dir
    out = sys.stdout
    directory = Path(args.dir).resolve()
    for sub in ("logs", "state/devbroker", "state/processor", "state/persister"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    tcp_port, ws_port = free_port(), free_port()
    mapping = demo_config(
        directory,
        broker_tcp_port=tcp_port,
        broker_ws_port=ws_port,
        marker_port=args.port,
        otlp_endpoint=args.otlp_endpoint,
        jaeger_ui_url=args.jaeger_ui_url,
    )
    config_path = directory / "ampsflow.yaml"
    config_path.write_text(
        "# Written by `ampsflow demo`; rewritten on every start.\n"
        + yaml.safe_dump(mapping, sort_keys=False),
        encoding="utf-8",
    )
    try:
        load_config(config_path, required=True)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    if port_open(args.port):
        print(
            f"ampsflow demo: port {args.port} is in use; pick another with --port", file=sys.stderr
        )
        return 1

    demo = Demo(directory, config_path, out)
    status = 0
    with _signals(demo.stop_requested):
        try:
            broker = demo.start("devbroker")
            demo.wait_until(
                broker, lambda c: c.is_ready or (port_open(tcp_port) and port_open(ws_port))
            )
            for name in ("processor", "persister"):
                demo.wait_until(demo.start(name), lambda c: c.is_ready)
            marker = demo.start("marker")
            health = f"http://127.0.0.1:{args.port}/healthz"
            demo.wait_until(marker, lambda c: c.is_ready and http_ok(health))
            _print_banner(out, directory, args.port, args.otlp_endpoint)
            while not demo.stop_requested.wait(POLL_INTERVAL_S * 5):
                dead = demo.exited()
                if dead is not None:
                    print(f"ampsflow demo: {_exit_message(dead)}; stopping", file=sys.stderr)
                    status = 1
                    break
            else:
                print("ampsflow demo: stopping", file=out)
        except StartupError as exc:
            print(f"ampsflow demo: {exc}", file=sys.stderr)
            status = 1
        finally:
            demo.stop()
    if status == 0:
        print("ampsflow demo: stopped", file=out)
    return status


def _print_banner(out: IO[str], directory: Path, port: int, otlp_endpoint: str | None) -> None:
    traces = (
        f"relayed by the marker (journeys on the page) and forwarded to {otlp_endpoint}"
        if otlp_endpoint
        else "relayed by the marker: journeys on the page (--otlp-endpoint URL forwards them)"
    )
    print(
        "\n".join(
            (
                "ampsflow demo is running",
                f"  page:   http://127.0.0.1:{port}/",
                f"  JSONL:  {directory / 'messages.jsonl'}",
                f"  logs:   {directory / 'logs'}/",
                f"  config: {directory / 'ampsflow.yaml'}",
                f"  traces: {traces}",
                "Press Ctrl-C to stop.",
            )
        ),
        file=out,
        flush=True,
    )
