"""A local OTLP/HTTP receiver for the benchmarks, in a process of its own.

It accepts ``POST /v1/traces`` and ``POST /v1/metrics`` (protobuf, optionally
gzip), answers ``200`` with an empty protobuf body at once, and appends each
trace request body to a file without decoding it, so it costs the exporters
under test no more than a real collector on loopback would and does not
compete with the daemons for CPU while they are measured. Spans are decoded
and counted per ``service.name`` and span name only when asked
(:meth:`OtlpSink.spans`), between measurements.

Used by ``pipeline.py`` and ``tracing_cost.py``; run on its own for a manual
check::

    python benchmarks/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import multiprocessing
import socket
import struct
import tempfile
import threading
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_LENGTH = struct.Struct(">I")


class _State:
    """What the server saw; shared by its handler threads."""

    def __init__(self, spool: Path) -> None:
        self.lock = threading.Lock()
        self.spool_path = spool
        self.spool = spool.open("ab")
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "bytes": dict(self.bytes)}

    def take_spans(self) -> dict[str, Any]:
        """Decode every spooled trace request, count spans, and empty the spool."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
            ExportTraceServiceRequest,
        )

        with self.lock:
            self.spool.close()
            data = self.spool_path.read_bytes()
            self.spool = self.spool_path.open("wb")
            stats = {"requests": dict(self.requests), "bytes": dict(self.bytes)}
            self.requests.clear()
            self.bytes.clear()
        counts: Counter[str] = Counter()
        offset = 0
        while offset < len(data):
            (size,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            request = ExportTraceServiceRequest()
            request.ParseFromString(data[offset : offset + size])
            offset += size
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "?",
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        counts[f"{service}/{span.name}"] += 1
        return {**stats, "spans": dict(counts)}


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(size)
            if self.headers.get("Content-Encoding", "") == "gzip":
                body = gzip.decompress(body)
            path = self.path.split("?", 1)[0]
            with state.lock:
                state.requests[path] += 1
                state.bytes[path] += size
                if path == "/v1/traces":
                    state.spool.write(_LENGTH.pack(len(body)))
                    state.spool.write(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path == "/stats":
                payload = state.stats()
            elif self.path == "/spans":
                payload = state.take_spans()
            else:
                self.send_error(404)
                return
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(port: int, spool: Path, ready: Any = None) -> None:
    """Serve on 127.0.0.1:``port`` until killed."""
    state = _State(spool)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    # Handler threads must not keep the process alive after SIGTERM.
    server.daemon_threads = True
    if ready is not None:
        ready.set()
    server.serve_forever(poll_interval=0.5)


class OtlpSink:
    """The receiver running in a child process; use as a context manager.

    Attributes:
        port: Its loopback port.
        endpoint: The OTLP/HTTP base URL (``http://127.0.0.1:PORT``).
    """

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="otlp-sink-")
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        self.process = ctx.Process(
            target=serve,
            args=(self.port, Path(self._dir.name) / "traces.spool", ready),
            name="otlp-sink",
            daemon=True,
        )
        self.process.start()
        if not ready.wait(30):
            self.close()
            raise RuntimeError("the OTLP sink did not start")

    @property
    def pid(self) -> int:
        """The receiver's process id."""
        assert self.process.pid is not None
        return self.process.pid

    def _get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}{path}", timeout=120) as response:
            result: dict[str, Any] = json.load(response)
            return result

    def stats(self) -> dict[str, Any]:
        """Requests and bytes received per path so far."""
        return self._get("/stats")

    def spans(self) -> dict[str, Any]:
        """Decode and count the spans received since the last call (then forget them)."""
        return self._get("/spans")

    def close(self) -> None:
        """Stop the receiver and remove its spool."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self._dir.cleanup()

    def __enter__(self) -> OtlpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> int:
    """Run the receiver in the foreground (Ctrl-C stops it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    print(f"OTLP/HTTP sink on http://127.0.0.1:{args.port} (GET /stats, GET /spans)")
    with (
        tempfile.TemporaryDirectory(prefix="otlp-sink-") as spool_dir,
        contextlib.suppress(KeyboardInterrupt),
    ):
        serve(args.port, Path(spool_dir) / "traces.spool")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
