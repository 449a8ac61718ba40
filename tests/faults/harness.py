"""What the fault scenarios share: settle-and-audit, sd_notify capture, a switchable
collector relay, tmpfs mounts, RSS sampling and a dead-letter reader.

Everything here observes the pipeline from the outside, the way an operator
would: the JSONL file, ``ampsflow audit``, the sd_notify socket, ``/proc``, and
the broker through the official client.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import AMPS

POLL_S = 0.2
"""How often the pollers look again."""


def wait_for(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = POLL_S
) -> None:
    """Poll ``predicate`` until it holds.

    Raises:
        AssertionError: naming ``what`` when the deadline passes first.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def count_lines(path: Path) -> int:
    """Complete lines in a file (0 when it does not exist yet)."""
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def file_size(path: Path) -> int:
    """Size of a file in bytes (0 when it does not exist yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_settled(
    jsonl: Path, *, expected_lines: int, quiet_s: float = 2.0, timeout_s: float = 120.0
) -> int:
    """Wait until the JSONL holds at least ``expected_lines`` and has stopped growing.

    Once the expected count is reached the file must stay unchanged for
    ``quiet_s`` more (late duplicates would show up then). When the count is
    never reached the wait ends at the deadline without failing, so the audit
    that follows reports what is missing.

    Returns:
        The number of complete lines.
    """
    deadline = time.monotonic() + timeout_s
    last_size = -1
    stable_since = time.monotonic()
    while True:
        size = file_size(jsonl)
        now = time.monotonic()
        if size != last_size:
            last_size = size
            stable_since = now
        lines = count_lines(jsonl)
        if lines >= expected_lines and now - stable_since >= quiet_s:
            return lines
        if now > deadline:
            return lines
        time.sleep(POLL_S)


@dataclass(frozen=True, slots=True)
class AuditResult:
    """What ``ampsflow audit --json`` said, and its exit status."""

    returncode: int
    report: dict[str, Any]
    stderr: str


def run_audit(published: Path, jsonl: Path) -> AuditResult:
    """Run ``ampsflow audit --published FILE --jsonl FILE --json`` as an operator would."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ampsflow",
            "audit",
            "--published",
            str(published),
            "--jsonl",
            str(jsonl),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {"unparsed_stdout": proc.stdout[-2000:]}
    return AuditResult(proc.returncode, report, proc.stderr[-4000:])


def torn_lines(jsonl: Path) -> list[int]:
    """Line numbers (1-based) that are not a complete JSON object, the tail included."""
    bad: list[int] = []
    data = jsonl.read_bytes() if jsonl.exists() else b""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        bad.append(len(lines))  # no final newline: the last line is torn
    for number, line in enumerate(lines, start=1):
        try:
            value = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if not isinstance(value, dict):
            bad.append(number)
    return sorted(set(bad))


def persisted_ids(jsonl: Path) -> list[str]:
    """The ``id`` of every line, in file order (lines without one are skipped)."""
    ids: list[str] = []
    with jsonl.open("rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict) and isinstance(value.get("id"), str):
                    ids.append(value["id"])
    return ids


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB, from ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def short_temp_dir(prefix: str) -> Path:
    """A fresh directory under /tmp with a short path (unix socket paths max 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class NotifyListener:
    """A unix datagram socket standing in for systemd's ``NOTIFY_SOCKET``.

    Collects every datagram (``READY=1``, ``STATUS=...``, ``STOPPING=1``...) on
    a thread; pass :attr:`path` to a daemon as ``NOTIFY_SOCKET``.
    """

    def __init__(self) -> None:
        self._dir = short_temp_dir("af-notify-")
        self.path = self._dir / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.2)
        self._messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append(data.decode("utf-8", "replace"))

    @property
    def messages(self) -> list[str]:
        """Every datagram received so far, in order."""
        with self._lock:
            return list(self._messages)

    def assignments(self, key: str) -> list[str]:
        """Every value sent for ``KEY=`` so far (e.g. all ``STATUS`` lines), in order."""
        values = []
        for message in self.messages:
            for line in message.splitlines():
                name, sep, value = line.partition("=")
                if sep and name == key:
                    values.append(value)
        return values

    def close(self) -> None:
        """Stop listening and remove the socket."""
        self._stop.set()
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class TcpRelay:
    """A TCP relay that can be switched off and on again on the same port.

    Daemons are pointed at the relay instead of the collector; :meth:`down`
    closes the listener and every open connection (the port then refuses
    connections, as when the collector is stopped), :meth:`up` listens on the
    same port again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.up()

    @property
    def endpoint(self) -> str:
        """The relay as an ``http://`` URL."""
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def down(self) -> None:
        """Stop listening and cut every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        """Shut the relay down for good."""
        self.down()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select(timeout=1.0):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


class Tmpfs:
    """A size-limited tmpfs mounted on a fresh directory (needs CAP_SYS_ADMIN).

    Raises:
        PermissionError: from :meth:`mount` when mounting is not permitted here.
    """

    def __init__(self, size_kib: int) -> None:
        self.path = short_temp_dir("af-tmpfs-")
        self.size_kib = size_kib
        self.mounted = False

    def mount(self) -> None:
        """Mount it; PermissionError carries mount's own message when not permitted."""
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k,mode=0755", "tmpfs", self.path],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            shutil.rmtree(self.path, ignore_errors=True)
            raise PermissionError(proc.stderr.strip() or f"mount exited {proc.returncode}")
        self.mounted = True

    def resize(self, size_kib: int) -> None:
        """Grow or shrink it in place (``mount -o remount,size=...``)."""
        subprocess.run(
            ["mount", "-o", f"remount,size={size_kib}k", self.path], check=True, capture_output=True
        )
        self.size_kib = size_kib

    def free_bytes(self) -> int:
        """Bytes still available to an unprivileged writer."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int) -> Path:
        """Write a filler file so that only about ``leave_bytes`` stay free; return it."""
        filler = self.path / "filler"
        with filler.open("wb") as f:
            while (excess := self.free_bytes() - leave_bytes) >= 4096:
                f.write(b"\0" * min(excess, 1 << 20))
                f.flush()
            os.fsync(f.fileno())
        return filler

    def unmount(self) -> None:
        """Unmount (lazily, should a process still hold a file) and remove the directory."""
        if self.mounted:
            subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)
            self.mounted = False
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class TopicReader:
    """Collects every message on a topic, from the start of the broker's log.

    A bookmark subscription from epoch (``0``) with the official client, so
    messages published before the reader started are included.
    """

    uri: str
    topic: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    _client: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Connect and subscribe."""
        client = AMPS.Client(f"reader-{os.getpid()}-{time.monotonic_ns()}")
        client.connect(self.uri)
        client.logon()
        command = AMPS.Command("subscribe").set_topic(self.topic).set_bookmark("0")
        client.execute_async(command, self._on_message)
        self._client = client

    def _on_message(self, message: Any) -> None:
        if message.get_command() not in ("publish", "p", "sow"):
            return
        raw = message.get_data_raw()
        with self._lock:
            self.messages.append(
                {
                    "data": raw if isinstance(raw, bytes) else str(raw).encode(),
                    "correlation_id": message.get_correlation_id(),
                    "bookmark": message.get_bookmark(),
                }
            )

    def snapshot(self) -> list[dict[str, Any]]:
        """The messages received so far."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        """Disconnect."""
        if self._client is not None:
            self._client.close()
            self._client = None


@contextlib.contextmanager
def topic_reader(uri: str, topic: str) -> Iterator[TopicReader]:
    """A :class:`TopicReader`, always closed."""
    reader = TopicReader(uri, topic)
    reader.start()
    try:
        yield reader
    finally:
        reader.close()


def publish_raw(uri: str, topic: str, bodies: list[tuple[bytes | str, str | None]]) -> None:
    """Publish bodies as they are (no store, no span), each with an optional CorrelationId.

    Waits for the broker to process them (``flush``) before returning.
    """
    client = AMPS.Client(f"raw-{os.getpid()}-{time.monotonic_ns()}")
    client.connect(uri)
    client.logon()
    try:
        for body, correlation_id in bodies:
            if correlation_id is None:
                client.publish(topic, body)
            else:
                client.publish(topic, body, correlation_id=correlation_id)
        client.publish_flush(30_000)
    finally:
        client.close()
