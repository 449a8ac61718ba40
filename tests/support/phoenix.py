"""A real OTLP trace backend for tests: Arize Phoenix on loopback.

:func:`start_phoenix` runs ``phoenix serve`` on free ports with its working
directory in a temporary folder, waits for ``/healthz``, and always stops it.
Point exporters at :attr:`Phoenix.endpoint` (OTLP/HTTP protobuf; exporters
append ``/v1/traces``).

:meth:`Phoenix.spans` reads back every span of every project from
``GET /v1/projects/{project}/spans`` (paged by ``next_cursor``) as
:class:`StoredSpan`. Phoenix keeps trace id, span id, parent span id, name,
status code and message, attributes and events, but **not the span kind**
(it reports OpenInference kinds, ``UNKNOWN`` for ours) **nor the resource**
(it reads only ``openinference.project.name`` from it, and files a whole trace
under the project of its first span). So :attr:`Phoenix.endpoint` is a small
pass-through tap in front of Phoenix: it forwards every OTLP request unchanged
and remembers the ``service.name`` of the resource each span was sent with;
:attr:`StoredSpan.service` reports it. Span kinds are checked with in-memory
exporters in the unit tests.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.processes import free_port, short_temp_dir, wait_for

START_TIMEOUT_S = 120.0
PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class StoredSpan:
    """One span as Phoenix stored it.

    Attributes:
        trace_id: 32 lowercase hex.
        span_id: 16 lowercase hex.
        parent_id: 16 lowercase hex, or ``None`` for a root span.
        name: The span name.
        status: ``UNSET``, ``OK`` or ``ERROR``.
        status_message: The status description.
        attributes: The span attributes, dotted keys as sent.
        events: Each event as ``{"name", "attributes", ...}``.
        project: The Phoenix project it landed in.
        service: ``service.name`` of the resource it was exported with (from the
            tap), or ``None`` when it did not pass through the tap.
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    status: str
    status_message: str
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    project: str = "default"
    service: str | None = None


class Phoenix:
    """A running ``phoenix serve``; use :func:`start_phoenix` to get one."""

    def __init__(self, port: int, grpc_port: int, working_dir: Path, log_path: Path) -> None:
        self.port = port
        self.grpc_port = grpc_port
        self.working_dir = working_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.tap: OtlpTap | None = None

    @property
    def url(self) -> str:
        """Base URL of the UI and REST API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """OTLP/HTTP base endpoint for exporters (the service-recording tap)."""
        assert self.tap is not None, "phoenix was not started with start_phoenix"
        return self.tap.url

    def _get(self, path: str, query: dict[str, str] | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def projects(self) -> list[str]:
        """Every project name."""
        names: list[str] = []
        cursor: str | None = None
        while True:
            page = self._get("/v1/projects", {"cursor": cursor} if cursor else None)
            names.extend(p["name"] for p in page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return names

    def spans(self, project: str | None = None) -> list[StoredSpan]:
        """Every span stored so far (in ``project``, or in all projects)."""
        out: list[StoredSpan] = []
        for name in [project] if project else self.projects():
            cursor: str | None = None
            while True:
                query = {"limit": str(PAGE_SIZE)}
                if cursor:
                    query["cursor"] = cursor
                path = f"/v1/projects/{urllib.parse.quote(name, safe='')}/spans"
                page = self._get(path, query)
                services = self.tap.services if self.tap is not None else {}
                out.extend(_stored(raw, name, services) for raw in page["data"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        return out

    def wait_for_spans(
        self,
        predicate: Callable[[list[StoredSpan]], bool],
        *,
        timeout_s: float = 60.0,
        what: str = "spans",
    ) -> list[StoredSpan]:
        """Poll :meth:`spans` until ``predicate`` holds for them; returns the last read."""
        latest: list[StoredSpan] = []

        def check() -> bool:
            nonlocal latest
            latest = self.spans()
            return predicate(latest)

        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:.0f}s waiting for {what} "
                    f"({len(latest)} spans stored)"
                )
            time.sleep(0.5)
        return latest

    def log_tail(self, lines: int = 40) -> str:
        """The last lines Phoenix wrote."""
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _stored(raw: dict[str, Any], project: str, services: dict[str, str]) -> StoredSpan:
    context = raw.get("context", {})
    span_id = context.get("span_id", "")
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


class _QuietServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server that does not print a traceback when a client hangs up.

    Exporters close their connection when a test stops a daemon mid-request; that is
    expected here, any other error is still reported.
    """

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class OtlpTap:
    """Forwards OTLP/HTTP requests to ``target`` and records each span's service.name.

    Runs a threaded HTTP server on a free loopback port. Every ``POST`` is sent
    on unchanged (same path, body and content headers) and Phoenix's answer is
    returned unchanged; trace requests are also decoded to map span id (16
    hex) to the ``service.name`` of its resource.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.services: dict[str, str] = {}
        self._lock = threading.Lock()
        tap = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.rstrip("/").endswith("/v1/traces"):
                    tap.record(body, self.headers.get("Content-Encoding", ""))
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() in ("content-type", "content-encoding")
                }
                request = urllib.request.Request(
                    tap.target + self.path, data=body, headers=headers, method="POST"
                )
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, payload = response.status, response.read()
                        content_type = response.headers.get("Content-Type", "")
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                    content_type = exc.headers.get("Content-Type", "")
                except OSError:
                    status, payload, content_type = 503, b"", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The tap's base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def record(self, body: bytes, encoding: str) -> None:
        """Remember the service of every span in one OTLP trace request."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
            ExportTraceServiceRequest,
        )

        if encoding == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        found: dict[str, str] = {}
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found[span.span_id.hex()] = service
        with self._lock:
            self.services.update(found)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@contextlib.contextmanager
def start_phoenix(log_dir: Path | None = None) -> Iterator[Phoenix]:
    """Run Phoenix on free loopback ports until the block ends; always stops it.

    Raises:
        AssertionError: when it exits or does not become healthy in time.
    """
    working_dir = short_temp_dir("af-phoenix-")
    log_path = (log_dir or working_dir) / "phoenix.log"
    phoenix = Phoenix(free_port(), free_port(), working_dir, log_path)
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(phoenix.port),
        "PHOENIX_GRPC_PORT": str(phoenix.grpc_port),
        "PHOENIX_WORKING_DIR": str(working_dir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    phoenix_bin = shutil.which("phoenix")
    assert phoenix_bin is not None, "the phoenix command (pip arize-phoenix) is not on PATH"
    try:
        with log_path.open("ab") as log:
            phoenix.process = subprocess.Popen(
                [phoenix_bin, "serve"], stdout=log, stderr=subprocess.STDOUT, env=env
            )

        def ready() -> bool:
            assert phoenix.process is not None
            if phoenix.process.poll() is not None:
                raise AssertionError(f"phoenix exited while starting:\n{phoenix.log_tail()}")
            return phoenix.healthy()

        wait_for(ready, timeout_s=START_TIMEOUT_S, what="phoenix to become healthy")
        phoenix.tap = OtlpTap(phoenix.url)
        yield phoenix
    finally:
        if phoenix.tap is not None:
            phoenix.tap.close()
        if phoenix.process is not None and phoenix.process.poll() is None:
            phoenix.process.send_signal(signal.SIGTERM)
            try:
                phoenix.process.wait(30)
            except subprocess.TimeoutExpired:
                phoenix.process.kill()
                phoenix.process.wait(30)
        shutil.rmtree(working_dir, ignore_errors=True)
