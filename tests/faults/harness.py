"""What the fault scenarios share: settle-and-audit, a switchable collector relay,
tmpfs mounts, RSS sampling, and a topic reader and raw publisher on the official
client.

Everything here observes the pipeline from the outside, the way an operator
would: the JSONL file, ``ampsflow audit``, ``/proc``, and the broker through the
official client. Processes are started with :mod:`tests.support.processes`.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import AMPS

from ampsflow.core.codec import decode_correlation_id
from tests.support.load import LoadConfig, SteadyPublisher
from tests.support.phoenix import Phoenix, StoredSpan
from tests.support.processes import (
    Daemon,
    Devbroker,
    Processes,
    pipeline_config,
    short_temp_dir,
    write_config,
)

POLL_S = 0.2
"""How often the pollers look again."""


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


def run_audit(published: Path, jsonl: Path, *, any_order: bool = False) -> AuditResult:
    """Run ``ampsflow audit --published FILE --jsonl FILE --json`` as an operator would
    (with ``--any-order`` when ``any_order``)."""
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
            *(["--any-order"] if any_order else []),
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

    def remount_read_only(self) -> None:
        """Make it read-only (``mount -o remount,ro``): every write then fails with EROFS."""
        subprocess.run(["mount", "-o", "remount,ro", self.path], check=True, capture_output=True)

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


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One record of an official client's ``MMapBookmarkStore`` file."""

    sub_id: str
    kind: str
    """``b`` a message was received, ``d`` it was discarded, ``p`` a persisted ack."""
    bookmark: str


def bookmark_store_entries(path: Path) -> list[StoreEntry]:
    """The records of an ``MMapBookmarkStore`` file, oldest first.

    The layout is the client's own (``MMapBookmarkStore.hpp``, ``write``): a native
    ``size_t`` length and the sub id, one type byte, a ``size_t`` length and the
    bookmark; the preallocated rest of the file is zeros.
    """
    data = path.read_bytes() if path.exists() else b""
    size = struct.calcsize("N")
    out: list[StoreEntry] = []
    offset = 0
    while offset + size <= len(data):
        (sub_len,) = struct.unpack_from("N", data, offset)
        if sub_len == 0 or sub_len > 4096:
            break
        offset += size
        sub_id = data[offset : offset + sub_len].decode("utf-8", "replace")
        offset += sub_len
        kind = chr(data[offset])
        offset += 1
        (bm_len,) = struct.unpack_from("N", data, offset)
        offset += size
        bookmark = data[offset : offset + bm_len].decode("utf-8", "replace")
        offset += bm_len
        out.append(StoreEntry(sub_id, kind, bookmark))
    return out


RATE_PER_S = 300.0
"""The steady load of every scenario, in messages per second."""


def clean_audit() -> dict[str, Any]:
    """:func:`audit_summary` of a JSONL that holds every message once, in order, untorn."""
    return {
        "exit_status": 0,
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "torn_last_line": False,
        "invalid_lines": 0,
    }


def audit_summary(result: AuditResult) -> dict[str, Any]:
    """The failure counts of an audit, comparable with :func:`clean_audit`."""
    report = result.report
    return {
        "exit_status": result.returncode,
        "lost": len(report.get("lost", [None])),
        "duplicated": len(report.get("duplicated", {None: 0})),
        "out_of_order": len(report.get("out_of_order", [None])),
        "torn_last_line": report.get("torn_last_line", True),
        "invalid_lines": len(report.get("invalid_lines", [None])),
    }


def audit_details(result: AuditResult, limit: int = 10) -> str:
    """A short account of what an audit found, for assertion messages."""
    report = result.report
    parts = [f"published={report.get('published')} persisted={report.get('persisted_lines')}"]
    for key in ("lost", "duplicated", "out_of_order", "invalid_lines", "unexpected"):
        value = report.get(key)
        if value:
            items = list(value.items() if isinstance(value, dict) else value)
            parts.append(f"{key} ({len(items)}): {items[:limit]}")
    if result.stderr:
        parts.append(f"stderr: {result.stderr}")
    return "; ".join(parts)


@dataclass
class Pipeline:
    """A running devbroker, processor and persister, and where their output goes."""

    root: Path
    processes: Processes
    broker: Devbroker
    processor: Daemon
    persister: Daemon
    config_path: Path
    jsonl: Path
    published: Path

    def publisher(
        self,
        *,
        rate_per_s: float = RATE_PER_S,
        client_name: str = "",
        otlp_endpoint: str | None = None,
    ) -> SteadyPublisher:
        """A steady publisher to the processor's input topic (not started yet).

        Its ids go to :attr:`published`; its publish store lives under :attr:`root`.
        """
        name = client_name or f"load-{uuid.uuid4().hex[:8]}"
        return SteadyPublisher(
            LoadConfig(
                uri=self.broker.uri,
                published_path=self.published,
                store_path=self.root / f"{name}.store",
                rate_per_s=rate_per_s,
                client_name=name,
                otlp_endpoint=otlp_endpoint,
            )
        )

    def settle_and_audit(self, expected_lines: int, *, timeout_s: float = 120.0) -> AuditResult:
        """Wait until the JSONL stops growing, then run ``ampsflow audit`` on it."""
        wait_settled(self.jsonl, expected_lines=expected_lines, timeout_s=timeout_s)
        return run_audit(self.published, self.jsonl)

    def logs(self) -> str:
        """The last lines of every daemon's log, for assertion messages."""
        return "\n".join(
            f"--- {d.name}\n{d.log_tail(15)}" for d in (self.broker, self.processor, self.persister)
        )


def start_pipeline(
    processes: Processes,
    root: Path,
    *,
    otlp_endpoint: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    start_services: bool = True,
    export_from: Collection[str] = ("processor", "persister"),
    env: Mapping[str, str] | None = None,
) -> Pipeline:
    """Start a devbroker, then (unless ``start_services`` is false) processor and persister.

    The services share one generated config (:func:`pipeline_config`) below
    ``root``; spans go to ``otlp_endpoint`` (or nowhere), but only from the
    services named in ``export_from``: the others get ``telemetry.exporter:
    none``, which keeps the trace backend's ingest load down to what a
    scenario reads back. ``env`` is added to both services' environment.
    """
    root.mkdir(parents=True, exist_ok=True)
    broker = processes.devbroker()
    config = pipeline_config(root, broker, otlp_endpoint=otlp_endpoint, overrides=overrides)
    config_path = write_config(root / "ampsflow.yaml", config)
    silent = write_config(
        root / "ampsflow-no-export.yaml", {**config, "telemetry": {"exporter": "none"}}
    )
    processor = processes.service(
        "processor",
        config_path if "processor" in export_from else silent,
        env=env,
        start=start_services,
    )
    persister = processes.service(
        "persister",
        config_path if "persister" in export_from else silent,
        env=env,
        start=start_services,
    )
    return Pipeline(
        root=root,
        processes=processes,
        broker=broker,
        processor=processor,
        persister=persister,
        config_path=config_path,
        jsonl=Path(config["persister"]["path"]),
        published=root / "published.txt",
    )


def lines(jsonl: Path) -> list[dict[str, Any]]:
    """Every complete line of the JSONL, parsed (torn or invalid lines skipped)."""
    out: list[dict[str, Any]] = []
    with jsonl.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                continue
            with contextlib.suppress(ValueError):
                value = json.loads(raw)
                if isinstance(value, dict):
                    out.append(value)
    return out


def search_spans(
    phoenix: Phoenix,
    *,
    since: datetime | None = None,
    names: Sequence[str] = (),
    span_ids: Sequence[str] = (),
    status: str | None = None,
) -> list[StoredSpan]:
    """Spans stored in Phoenix (every project) matching all the given filters.

    Uses the server-side filters of ``GET /v1/projects/{project}/spans`` so a
    scenario reads back only its own spans, not the whole session's.
    ``span_ids`` are queried in chunks.
    """
    chunks: list[Sequence[str]] = (
        [span_ids[i : i + 200] for i in range(0, len(span_ids), 200)] if span_ids else [()]
    )
    found: dict[str, StoredSpan] = {}
    for project in phoenix.projects():
        for chunk in chunks:
            query: list[tuple[str, str]] = [("limit", "1000")]
            if since is not None:
                query.append(("start_time", since.astimezone(UTC).isoformat()))
            query += [("name", n) for n in names]
            query += [("span_id", s) for s in chunk]
            if status is not None:
                query.append(("status_code", status))
            cursor: str | None = None
            while True:
                page_query = [*query, ("cursor", cursor)] if cursor else query
                url = (
                    f"{phoenix.url}/v1/projects/{urllib.parse.quote(project, safe='')}/spans?"
                    + urllib.parse.urlencode(page_query)
                )
                with urllib.request.urlopen(url, timeout=60) as response:
                    page = json.loads(response.read())
                for raw in page["data"]:
                    span = _stored_span(raw, project, phoenix)
                    found[span.span_id] = span
                cursor = page.get("next_cursor")
                if not cursor:
                    break
    return list(found.values())


def _stored_span(raw: dict[str, Any], project: str, phoenix: Phoenix) -> StoredSpan:
    context = raw.get("context", {})
    span_id = context.get("span_id", "")
    services = phoenix.tap.services if phoenix.tap is not None else {}
    return StoredSpan(
        trace_id=context.get("trace_id", ""),
        span_id=span_id,
        parent_id=raw.get("parent_id") or None,
        name=raw.get("name", ""),
        status=raw.get("status_code", "UNSET"),
        status_message=raw.get("status_message") or "",
        attributes=dict(raw.get("attributes") or {}),
        events=list(raw.get("events") or []),
        project=project,
        service=services.get(span_id),
    )


def wait_for_span_ids(
    phoenix: Phoenix, span_ids: Sequence[str], *, since: datetime, timeout_s: float = 60.0
) -> set[str]:
    """Poll Phoenix until every span id is stored; returns those still missing at the deadline."""
    wanted = set(span_ids)
    missing = set(wanted)
    deadline = time.monotonic() + timeout_s
    while missing and time.monotonic() < deadline:
        stored = search_spans(phoenix, since=since, span_ids=sorted(missing))
        missing -= {s.span_id for s in stored}
        if missing:
            time.sleep(1.0)
    return missing


def span_id_of(correlation_id: str) -> str:
    """The span id (16 hex) a CorrelationId names."""
    return f"{decode_correlation_id(correlation_id).span_id:016x}"


class RssSampler:
    """Samples the resident memory of some processes on a thread until stopped."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 0.5) -> None:
        self.pids = dict(pids)
        self.samples: dict[str, list[int]] = {name: [] for name in pids}
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError, ValueError):
                    self.samples[name].append(rss_kib(pid))
            self._stop.wait(self._interval_s)

    def stop(self) -> dict[str, list[int]]:
        """Stop sampling and return the samples per process (KiB)."""
        self._stop.set()
        self._thread.join()
        return self.samples


class MetricsCapture:
    """An OTLP/HTTP metrics endpoint that keeps the latest value of every sum data point.

    Point a daemon at it with ``OTEL_METRICS_EXPORTER=otlp`` and
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=`` :attr:`endpoint`; :meth:`total`
    then reads a counter the way a metrics backend would.
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        capture = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding", "") == "gzip":
                    body = gzip.decompress(body)
                capture.record(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The full metrics URL (``.../v1/metrics``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/metrics"

    def record(self, body: bytes) -> None:
        """Remember the sum data points of one OTLP metrics export request."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: PLC0415
            ExportMetricsServiceRequest,
        )

        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        found: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for resource_metrics in request.resource_metrics:
            service = next(
                (
                    a.value.string_value
                    for a in resource_metrics.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if not metric.HasField("sum"):
                        continue
                    for point in metric.sum.data_points:
                        attrs = tuple(
                            sorted((a.key, str(a.value.string_value)) for a in point.attributes)
                        )
                        value = (
                            point.as_int
                            if point.WhichOneof("value") == "as_int"
                            else point.as_double
                        )
                        found[(service, metric.name, attrs)] = float(value)
        with self._lock:
            self._latest.update(found)

    def total(self, service: str, metric: str) -> float:
        """The latest cumulative value of a counter, summed over its attribute sets."""
        with self._lock:
            return sum(v for (s, m, _), v in self._latest.items() if (s, m) == (service, metric))

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
