"""``ampsflow marker``: the web server of the marker page.

One port serves everything the page needs, so neither the collector nor the
broker has to allow cross-origin requests:

- ``/`` and ``/assets/...``: the built page (``static/``, shipped in the
  package), loaded into memory at startup; only files that exist there can be
  served, so no request path can reach anything else. Hashed assets are cached
  for a year, ``index.html`` is revalidated on every load.
- ``/config.json``: what the page needs from the ``marker`` config section.
- ``POST /v1/traces``: the span relay. OTLP/HTTP protobuf from the page and
  from the daemons is decoded into the journey index
  (:class:`~ampsflow.core.journeys.JourneyIndex`), answered 200 at once, and
  queued unchanged for ``otlp_traces_upstream``
  (:class:`~ampsflow.services.marker.relay.Forwarder`: bounded, retried).
- ``/api/journeys``, ``/api/journeys/{trace id}``: the index as JSON;
  ``/api/journeys/events``: changed journeys pushed as server-sent events.
- ``/amps/json``: a WebSocket proxied frame by frame (text and binary kept as
  they are) to the broker's WebSocket listener ``amps_websocket_upstream``.
- ``/healthz``: liveness plus the proxy counters.

Every request passes the Host check and, when it carries an ``Origin``, the
Origin check of :mod:`ampsflow.services.marker.guard` (403 otherwise). A
connection that does not complete its request headers within
``header_timeout_s`` is closed; a body slower than ``body_timeout_s`` gets 408.

Every response carries security headers and a Content-Security-Policy that
allows the page's own scripts and styles and connections to its own origin
(plus ``amps_websocket_url`` when the page talks to the broker directly).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType, web

from ampsflow.config import Config, MarkerConfig, parse_host_port
from ampsflow.core.journeys import JourneyIndex, summarise
from ampsflow.errors import OtlpBodyError, StartupError
from ampsflow.lifecycle import LIVE_KEYS_COMMON, Daemon, run_service, serve_until_stopped
from ampsflow.services.marker.guard import Guard
from ampsflow.services.marker.otlp import decompress, span_records
from ampsflow.services.marker.relay import ForwardCounters, Forwarder

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The built page, as produced by ``npm run build`` in ``marker/``."""

MAX_WS_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest WebSocket message relayed in either direction (the devbroker's default frame cap)."""

SHUTDOWN_TIMEOUT_S = 5.0
"""How long graceful shutdown waits for in-flight requests."""

UPSTREAM_CONNECT_TIMEOUT_S = 5.0
"""How long a browser's WebSocket waits for the broker connection before a 502."""

_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}

_COMPRESSIBLE = ("text/", "application/json", "image/svg+xml")
_MIN_GZIP_BYTES = 1024

OTLP_CONTENT_TYPES = ("application/x-protobuf", "application/protobuf")
"""Media types accepted on ``/v1/traces``: OTLP/HTTP protobuf (OTLP/JSON gets 415)."""

OTLP_CONTENT_ENCODINGS = ("identity", "gzip")
"""Content-Encodings accepted on ``/v1/traces`` (what OTLP exporters send)."""

MAX_LISTED_JOURNEYS = 1000
"""Most journeys one ``GET /api/journeys`` returns."""

MAX_PUSHED_JOURNEYS = 200
"""Most journeys one server-sent push carries (the newest of those that changed)."""

PUSH_INTERVAL_S = 0.25
"""Changes to journeys are coalesced this long before a push."""

SSE_HEARTBEAT_S = 15.0

REFUSAL_LOG_INTERVAL_S = 10.0
"""Refused requests are logged at WARNING at most once per interval and kind."""

_HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of the built page, held in memory."""

    body: bytes
    content_type: str
    cache_control: str
    etag: str
    gzipped: bytes | None
    """The body gzip-compressed, when that is worth it (text types)."""


def content_type_for(name: str) -> str:
    """The Content-Type for a file name (``application/octet-stream`` if unknown)."""
    return _CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


def load_static(root: Path) -> dict[str, StaticFile]:
    """Read every file under ``root`` into a table keyed by URL path (``/index.html``).

    Raises:
        StartupError: when ``root`` has no ``index.html`` (the page was not built).
    """
    if not (root / "index.html").is_file():
        raise StartupError(f"marker page not found: {root / 'index.html'} is missing")
    table: dict[str, StaticFile] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        body = path.read_bytes()
        # Vite puts content-hashed names under assets/: safe to cache forever.
        cache = _IMMUTABLE if rel.startswith("assets/") else _REVALIDATE
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        content_type = content_type_for(rel)
        gzipped = None
        if content_type.startswith(_COMPRESSIBLE) and len(body) > _MIN_GZIP_BYTES:
            # mtime=0 keeps the compressed bytes identical from start to start.
            gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        table["/" + rel] = StaticFile(body, content_type, cache, etag, gzipped)
    return table


def websocket_origin(url: str) -> str:
    """``ws://host:port`` of a WebSocket URL, for the CSP."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(config: MarkerConfig, host: str | None, *, secure: bool) -> str:
    """The CSP for the page served to ``host`` (the request's Host header).

    ``'self'`` covers same-origin ``ws:`` in CSP Level 3 browsers; the
    explicit same-host WebSocket source keeps older ones working. An invalid
    Host header is not echoed into the policy.
    """
    connect = ["'self'"]
    if config.amps_websocket_url:
        connect.append(websocket_origin(config.amps_websocket_url))
    elif host is not None and _HOST_HEADER.match(host):
        connect.append(f"{'wss' if secure else 'ws'}://{host}")
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


SECURITY_HEADERS: Mapping[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}


def page_config(config: MarkerConfig) -> dict[str, object]:
    """The body of ``/config.json``."""
    return {
        "service_name": config.service_name,
        "topic": config.topic,
        "amps_websocket_url": config.amps_websocket_url,
        "jaeger_ui_url": config.jaeger_ui_url,
        # The page always exports: the marker keeps its spans for the journeys
        # even when there is no upstream to forward them to.
        "traces_enabled": True,
        "traces_upstream": config.otlp_traces_upstream is not None,
        "journey_stall_s": config.journey_stall_s,
    }


@dataclass(slots=True)
class Counters:
    """What the proxies did since startup; served on ``/healthz``."""

    otlp_too_large: int = 0
    otlp_dropped_no_upstream: int = 0
    otlp_malformed: int = 0
    otlp_spans_received: int = 0
    journey_subscribers: int = 0
    ws_sessions_total: int = 0
    ws_sessions_active: int = 0
    ws_upstream_failures: int = 0
    ws_messages_relayed: int = 0
    forbidden_host: int = 0
    forbidden_origin: int = 0
    otlp_unsupported_media_type: int = 0
    body_timeouts: int = 0


@dataclass(slots=True)
class _RefusalLog:
    """WARNING for the first refusal of a kind per interval, DEBUG for the rest."""

    last: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)

    def log(self, kind: str, message: str, *args: object) -> None:
        now = asyncio.get_running_loop().time()
        if now - self.last.get(kind, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S:
            self.last[kind] = now
            quiet = self.suppressed.pop(kind, 0)
            logger.warning(message, *args)
            if quiet:
                logger.warning("(%d more refused like that since the last report)", quiet)
        else:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            logger.debug(message, *args)


@dataclass(slots=True, eq=False)
class _Subscriber:
    """One page following journeys over server-sent events."""

    dirty: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _State:
    config: MarkerConfig
    static: dict[str, StaticFile]
    guard: Guard
    index: JourneyIndex
    dead_letter_topic: str | None
    refusals: _RefusalLog = field(default_factory=_RefusalLog)
    counters: Counters = field(default_factory=Counters)
    session: aiohttp.ClientSession | None = None
    forwarder: Forwarder | None = None
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    subscribers: set[_Subscriber] = field(default_factory=set)
    amps_failing: bool = False
    closing: bool = False

    def journeys_changed(self, trace_ids: set[str]) -> None:
        """Tell every following page that these journeys changed."""
        if not trace_ids:
            return
        for subscriber in self.subscribers:
            subscriber.dirty |= trace_ids
            subscriber.wake.set()


_STATE = web.AppKey("marker_state", _State)


def _json_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def _security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    state = request.app[_STATE]
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
        response.headers["Content-Security-Policy"] = content_security_policy(
            state.config, request.headers.get("Host"), secure=request.secure
        )
    if isinstance(response, web.HTTPException):
        raise response
    return response


def _printable(value: str | None, limit: int = 120) -> str:
    """A header value safe for one log line."""
    if value is None:
        return "(none)"
    return repr(value[:limit] + ("…" if len(value) > limit else ""))


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[_STATE]
    host = request.headers.get("Host")
    if not state.guard.host_allowed(host):
        state.counters.forbidden_host += 1
        state.refusals.log(
            "host",
            "refused %s %s from %s: Host %s is not in marker.allowed_hosts",
            request.method,
            request.path[:100],
            request.remote,
            _printable(host),
        )
        return _json_error(403, "forbidden host", "this Host is not in marker.allowed_hosts")
    origin = request.headers.get("Origin")
    if not state.guard.origin_allowed(origin, host):
        state.counters.forbidden_origin += 1
        state.refusals.log(
            "origin",
            "refused %s %s from %s: Origin %s is neither the marker nor in marker.allowed_origins",
            request.method,
            request.path[:100],
            request.remote,
            _printable(origin),
        )
        return _json_error(
            403, "forbidden origin", "this Origin is neither the marker nor in allowed_origins"
        )
    return await handler(request)


async def _static(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    path = request.path
    if path == "/":
        path = "/index.html"
    item = state.static.get(path)
    if item is None:
        raise web.HTTPNotFound(text="not found\n")
    headers = {"Cache-Control": item.cache_control, "ETag": item.etag}
    if item.gzipped is not None:
        headers["Vary"] = "Accept-Encoding"
    if item.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = item.content_type
    # aiohttp sends no body for HEAD on its own.
    if item.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=item.gzipped, headers=headers)
    return web.Response(body=item.body, headers=headers)


async def _config_json(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return web.json_response(page_config(state.config), headers={"Cache-Control": "no-store"})


def health_counters(app: web.Application) -> dict[str, object]:
    """The body of ``/healthz`` for an app built by :func:`build_app`."""
    state = app[_STATE]
    body: dict[str, object] = {"status": "ok", **dataclasses.asdict(state.counters)}
    # The short names predate the forwarder's own counters; they stay for dashboards.
    forward = state.forwarder.counters if state.forwarder is not None else ForwardCounters()
    if state.forwarder is not None:
        body |= {f"otlp_forward_{k}": v for k, v in dataclasses.asdict(forward).items()}
    body |= {
        "otlp_forwarded": forward.forwarded,
        "otlp_upstream_errors": forward.upstream_errors,
        "otlp_upstream_timeouts": forward.upstream_timeouts,
    }
    body |= {f"journey_{k}": v for k, v in dataclasses.asdict(state.index.stats).items()}
    return body


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response(
        health_counters(request.app),
        headers={"Cache-Control": "no-store"},
    )


async def _read_capped(request: web.Request, limit: int, timeout_s: float) -> bytes | None:
    """The request body as received (still compressed), or None once it exceeds ``limit``.

    Raises:
        TimeoutError: when the whole body has not arrived within ``timeout_s``.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout_s):
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    return b"".join(chunks)


def _unsupported_otlp(request: web.Request) -> str | None:
    """Why ``/v1/traces`` cannot take this request's body, or None."""
    if request.content_type not in OTLP_CONTENT_TYPES:
        return (
            f"Content-Type {request.headers.get('Content-Type', '(none)')[:80]!r} is not "
            "OTLP/HTTP protobuf (application/x-protobuf)"
        )
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in OTLP_CONTENT_ENCODINGS:
        return f"Content-Encoding {encoding[:40]!r} is not supported (identity or gzip)"
    return None


async def _traces(request: web.Request) -> web.Response:
    """Take one OTLP upload: check it, index its spans, queue it for the upstream."""
    state = request.app[_STATE]
    config = state.config
    counters = state.counters
    unsupported = _unsupported_otlp(request)
    if unsupported is not None:
        counters.otlp_unsupported_media_type += 1
        state.refusals.log("otlp-type", "refused an OTLP upload: %s", unsupported)
        return _json_error(415, "unsupported media type", unsupported)
    try:
        body = await _read_capped(request, config.otlp_max_body_bytes, config.body_timeout_s)
    except TimeoutError:
        counters.body_timeouts += 1
        state.refusals.log(
            "body-timeout",
            "an OTLP body from %s took over %.0f s",
            request.remote,
            config.body_timeout_s,
        )
        return _json_error(408, "request timeout", "the body did not arrive in time")
    if body is None:
        counters.otlp_too_large += 1
        state.refusals.log(
            "otlp-size",
            "rejected an OTLP body over otlp_max_body_bytes=%d",
            config.otlp_max_body_bytes,
        )
        limit = config.otlp_max_body_bytes
        return _json_error(413, "payload too large", f"OTLP bodies are limited to {limit} bytes")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    try:
        spans = span_records(decompress(body, encoding, config.otlp_max_decoded_bytes))
    except OtlpBodyError as exc:
        # Not forwarded either: the upstream could not read it any better,
        # and the index must not hold half of a request.
        if exc.reason == "too_large":
            counters.otlp_too_large += 1
            status, error = 413, "payload too large"
        else:
            counters.otlp_malformed += 1
            status, error = 400, "malformed OTLP body"
        state.refusals.log(
            f"otlp-{exc.reason}", "refused an OTLP upload from %s: %s", request.remote, exc
        )
        return _json_error(status, error, str(exc))
    counters.otlp_spans_received += len(spans)
    touched = state.index.add(spans)
    state.journeys_changed(touched)
    if state.forwarder is None:
        counters.otlp_dropped_no_upstream += 1
    else:
        # The bytes as received (the server does not decompress request
        # bodies), so their Content-Encoding still describes them.
        headers = {"Content-Type": request.headers.get("Content-Type", "application/x-protobuf")}
        if "Content-Encoding" in request.headers:
            headers["Content-Encoding"] = request.headers["Content-Encoding"]
        state.forwarder.submit(body, headers)
    # An empty body is an empty ExportTraceServiceResponse: success for the exporter.
    return web.Response(status=200, content_type="application/x-protobuf")


_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def _journey(state: _State, trace_id: str) -> dict[str, object]:
    return summarise(state.index.spans(trace_id), dead_letter_topic=state.dead_letter_topic)


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit", "")
    if raw.isascii() and raw.isdigit():
        return max(1, min(maximum, int(raw)))
    return default


async def _journeys(request: web.Request) -> web.Response:
    """``GET /api/journeys[?failed=1][&limit=N][&message_id=ID]``: newest first."""
    state = request.app[_STATE]
    limit = _limit(request, 100, MAX_LISTED_JOURNEYS)
    message_id = request.query.get("message_id")
    failed_only = request.query.get("failed", "") in ("1", "true", "yes")
    if message_id is not None:
        trace_ids = list(reversed(state.index.traces_of_message(message_id)))[:limit]
    else:
        trace_ids = state.index.recent(limit, failed_only=failed_only)
    return web.json_response(
        {"journeys": [_journey(state, t) for t in trace_ids]},
        headers={"Cache-Control": "no-store"},
    )


async def _journey_by_id(request: web.Request) -> web.Response:
    """``GET /api/journeys/{trace_id}``: one journey with its spans, or 404."""
    state = request.app[_STATE]
    trace_id = request.match_info["trace_id"].lower()
    if not _TRACE_ID.match(trace_id) or not state.index.spans(trace_id):
        return _json_error(404, "unknown trace", f"no spans of trace {trace_id[:40]!r} are held")
    return web.json_response(_journey(state, trace_id), headers={"Cache-Control": "no-store"})


async def _journey_events(request: web.Request) -> web.StreamResponse:
    """``GET /api/journeys/events``: server-sent events, one ``journey`` per changed trace.

    Changes are coalesced for ``PUSH_INTERVAL_S`` and at most
    ``MAX_PUSHED_JOURNEYS`` journeys (the newest) are sent per push; a comment
    line every ``SSE_HEARTBEAT_S`` keeps proxies from closing an idle stream.
    """
    state = request.app[_STATE]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            **SECURITY_HEADERS,
        }
    )
    await response.prepare(request)
    subscriber = _Subscriber()
    state.subscribers.add(subscriber)
    state.counters.journey_subscribers += 1
    try:
        await response.write(b": journeys\n\n")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscriber.wake.wait(), timeout=SSE_HEARTBEAT_S)
            if not subscriber.wake.is_set():
                await response.write(b": heartbeat\n\n")
                continue
            if state.closing:
                break
            await asyncio.sleep(PUSH_INTERVAL_S)
            subscriber.wake.clear()
            changed, subscriber.dirty = subscriber.dirty, set()
            held = [t for t in changed if state.index.spans(t)]
            if len(held) > MAX_PUSHED_JOURNEYS:
                held = [t for t in state.index.recent(state.index.stats.traces) if t in changed]
            chunks = []
            for trace_id in held[:MAX_PUSHED_JOURNEYS]:
                data = json.dumps(_journey(state, trace_id), separators=(",", ":"))
                chunks.append(f"event: journey\ndata: {data}\n\n".encode())
            if chunks:
                await response.write(b"".join(chunks))
    except ConnectionError:
        logger.debug("journey stream to %s closed by the page", request.remote)
    finally:
        state.subscribers.discard(subscriber)
        state.counters.journey_subscribers -= 1
    return response


async def _relay(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    counters: Counters,
) -> None:
    """Copy frames from ``source`` to ``target`` until ``source`` closes."""
    async for message in source:
        if message.type is WSMsgType.TEXT:
            await target.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await target.send_bytes(message.data)
        elif message.type is WSMsgType.ERROR:
            logger.debug("WebSocket error: %s", source.exception())
            break
        else:
            continue
        counters.ws_messages_relayed += 1


async def _amps_websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    config = state.config
    assert state.session is not None
    browser = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE_BYTES, autoping=True)
    if not browser.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="WebSocket upgrade expected\n")
    try:
        # The JS client offers no subprotocol, so none is requested upstream either.
        broker = await state.session.ws_connect(
            config.amps_websocket_upstream,
            max_msg_size=MAX_WS_MESSAGE_BYTES,
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        state.counters.ws_upstream_failures += 1
        # Every open page retries every few seconds: one WARNING per outage.
        log = logger.debug if state.amps_failing else logger.warning
        state.amps_failing = True
        log("AMPS upstream %s unavailable: %s", config.amps_websocket_upstream, exc)
        return _json_error(
            502, "amps upstream unavailable", f"{config.amps_websocket_upstream}: {exc}"
        )
    if state.amps_failing:
        state.amps_failing = False
        logger.warning("AMPS upstream %s is reachable again", config.amps_websocket_upstream)
    await browser.prepare(request)
    state.sockets.add(browser)
    state.counters.ws_sessions_total += 1
    state.counters.ws_sessions_active += 1
    logger.debug("AMPS WebSocket session from %s opened", request.remote)
    to_broker = asyncio.create_task(_relay(browser, broker, state.counters))
    to_browser = asyncio.create_task(_relay(broker, browser, state.counters))
    try:
        await asyncio.wait({to_broker, to_browser}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_broker, to_browser):
            task.cancel()
        for task in (to_broker, to_browser):
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, ConnectionError):
                await task
        # Whichever side closed first, the other learns it with the same code.
        code = broker.close_code if broker.closed else browser.close_code
        await broker.close()
        await browser.close(code=code if code else aiohttp.WSCloseCode.GOING_AWAY)
        state.sockets.discard(browser)
        state.counters.ws_sessions_active -= 1
        logger.debug("AMPS WebSocket session from %s closed", request.remote)
    return browser


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    state = app[_STATE]
    # No total timeout here: the OTLP call sets its own, and WebSocket
    # sessions live as long as the page.
    state.session = session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=UPSTREAM_CONNECT_TIMEOUT_S),
        auto_decompress=False,
    )
    config = state.config
    if config.otlp_traces_upstream is not None:
        state.forwarder = Forwarder(
            url=config.otlp_traces_upstream,
            session=lambda: session,
            timeout_s=config.otlp_timeout_ms / 1000,
            max_requests=config.forward_queue_max_requests,
            max_bytes=config.forward_queue_max_bytes,
            max_delay_s=config.forward_retry_max_delay_ms / 1000,
        )
        state.forwarder.start()
    yield
    if state.forwarder is not None:
        await state.forwarder.stop()
    await session.close()


async def _close_websockets(app: web.Application) -> None:
    state = app[_STATE]
    state.closing = True
    for subscriber in state.subscribers:
        subscriber.wake.set()
    for socket in list(state.sockets):
        await socket.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")


async def _hide_server_header(request: web.Request, response: web.StreamResponse) -> None:
    del request
    response.headers.pop("Server", None)


def build_app(
    config: MarkerConfig,
    *,
    static_dir: Path = STATIC_DIR,
    dead_letter_topic: str | None = "internal.dlq",
) -> web.Application:
    """The marker web application for ``config``, serving the page from ``static_dir``.

    ``dead_letter_topic`` is the processor's: a journey whose message was
    published there shows as dead-lettered.

    Raises:
        StartupError: when the page is missing from ``static_dir``.
    """
    # keepalive_timeout doubles as the header timeout: aiohttp closes a
    # connection that has not delivered a complete request within it, from
    # connect and from the end of each response. Bodies are kept as
    # received, so a gzip upload is forwarded as gzip.
    app = web.Application(
        middlewares=[_security_headers, _guard],
        handler_args={"keepalive_timeout": config.header_timeout_s, "auto_decompress": False},
    )
    host, _ = parse_host_port(config.listen)
    guard = Guard.build(
        listen_host=host,
        allowed_hosts=config.allowed_hosts,
        allowed_origins=config.allowed_origins,
    )
    app[_STATE] = _State(
        config=config,
        static=load_static(static_dir),
        guard=guard,
        index=JourneyIndex(max_spans=config.journey_max_spans, max_bytes=config.journey_max_bytes),
        dead_letter_topic=dead_letter_topic,
    )
    app.cleanup_ctx.append(_client_session)
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(_hide_server_header)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/config.json", _config_json)
    app.router.add_post("/v1/traces", _traces)
    app.router.add_get("/api/journeys", _journeys)
    app.router.add_get("/api/journeys/events", _journey_events)
    app.router.add_get("/api/journeys/{trace_id}", _journey_by_id)
    app.router.add_get("/amps/json", _amps_websocket)
    app.router.add_get("/{path:.*}", _static)
    return app


def counters(app: web.Application) -> Counters:
    """The proxy counters of an app built by :func:`build_app`."""
    return app[_STATE].counters


def apply_reload(app: web.Application, new: MarkerConfig) -> None:
    """Use the live keys of a reloaded ``marker`` section (``jaeger_ui_url``).

    The next ``/config.json`` carries the new value; a page already open keeps
    the one it loaded until it is reloaded.
    """
    state = app[_STATE]
    # One reference assignment, so it is safe from the lifecycle's signal thread.
    state.config = dataclasses.replace(state.config, jaeger_ui_url=new.jaeger_ui_url)


async def serve(daemon: Daemon) -> None:
    """Serve until ``daemon.stop`` is set, then shut down gracefully.

    Raises:
        StartupError: when the page is missing or the address cannot be bound.
    """
    marker = daemon.config.marker
    host, port = parse_host_port(marker.listen)
    app = build_app(marker, dead_letter_topic=daemon.config.processor.dead_letter_topic)
    runner = web.AppRunner(app, access_log=logger if logger.isEnabledFor(logging.DEBUG) else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {marker.listen}: {exc.strerror or exc}") from exc
        if marker.otlp_traces_upstream is None:
            logger.info(
                "otlp_traces_upstream is not set: spans are kept for the journeys, not forwarded"
            )
        logger.info(
            "marker serving on http://%s:%d (AMPS upstream %s, OTLP upstream %s)",
            host,
            port,
            marker.amps_websocket_upstream,
            marker.otlp_traces_upstream,
        )
        daemon.on_reload(lambda _running, new: apply_reload(app, new.marker))
        daemon.ready(f"serving on {marker.listen}")
        await serve_until_stopped(daemon)
        logger.info("marker stopping")
    finally:
        await runner.cleanup()
    logger.info("marker stopped")


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow marker``: serve the page and its proxies until SIGTERM or SIGINT.

    The shared lifecycle (:mod:`ampsflow.lifecycle`) takes the signals, pings the
    watchdog from the event loop and reloads on SIGHUP: ``logging.*`` and
    ``marker.jaeger_ui_url`` apply live; every other ``marker`` key needs a restart.
    """

    def work(daemon: Daemon, telemetry: object) -> None:
        del telemetry  # the page's spans are proxied, the server emits none
        asyncio.run(serve(daemon))

    return run_service(
        config,
        args,
        service="marker",
        service_name="marker",
        work=work,
        sections=("marker", "logging", "processor.dead_letter_topic"),
        live_keys=LIVE_KEYS_COMMON | {"marker.jaeger_ui_url"},
        tracing=False,
    )
