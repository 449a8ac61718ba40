"""The marker web server against real sockets: static assets and their headers,
/config.json, the OTLP proxy (fake collector) and the AMPS WebSocket proxy
(echo server), plus the ``ampsflow marker`` process lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.config import MarkerConfig
from ampsflow.errors import OtlpBodyError
from ampsflow.services.marker.otlp import decompress, span_records
from ampsflow.services.marker.server import (
    SHUTDOWN_TIMEOUT_S,
    STATIC_DIR,
    Counters,
    build_app,
    counters,
    health_counters,
)
from tests.strategies import HttpRequest, http_requests, otlp_bodies, otlp_span
from tests.support.processes import Daemon, free_port, wait_for, write_config

pytestmark = pytest.mark.timeout(60)


def _closed_port_url(path: str) -> str:
    """A URL on a loopback port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}{path}"


@dataclass
class Collector:
    """A fake OTLP/HTTP collector that records what it receives."""

    requests: list[tuple[str, bytes]] = field(default_factory=list)
    delay_s: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.headers.get("Content-Type", ""), await request.read()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(body=b"", content_type="application/x-protobuf")


@asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def _collector(collector: Collector) -> AsyncIterator[str]:
    # Bodies are recorded as they arrive, gzip or not.
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_post("/v1/traces", collector.handle)
    async with _serve(app) as server:
        yield str(server.make_url("/v1/traces"))


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(b"echo:" + message.data)
    return ws


@asynccontextmanager
async def _echo_broker() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/amps/json", _echo)
    async with _serve(app) as server:
        yield f"ws://127.0.0.1:{server.port}/amps/json"


@asynccontextmanager
async def _marker(config: MarkerConfig) -> AsyncIterator[tuple[TestServer, web.Application]]:
    app = build_app(config)
    async with _serve(app) as server:
        yield server, app


def _run(scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(scenario())


def _config(**overrides: Any) -> MarkerConfig:
    defaults: dict[str, Any] = {
        "otlp_traces_upstream": _closed_port_url("/v1/traces"),
        "amps_websocket_upstream": _closed_port_url("/amps/json").replace("http", "ws"),
    }
    return MarkerConfig(**{**defaults, **overrides})


async def _get(config: MarkerConfig, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with (
        _marker(config) as (server, _),
        aiohttp.ClientSession() as client,
        client.get(server.make_url(path), **kwargs) as response,
    ):
        return response.status, response.headers, await response.read()


def _asset_path(suffix: str) -> str:
    names = sorted(p.name for p in (STATIC_DIR / "assets").iterdir() if p.name.endswith(suffix))
    return f"/assets/{names[0]}"


class TestStatic:
    def test_index_is_html(self) -> None:
        """/ serves index.html as UTF-8 HTML."""
        status, headers, _ = _run(lambda: _get(_config(), "/"))
        assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")

    def test_index_is_revalidated(self) -> None:
        """index.html is never served from cache without revalidation."""
        _, headers, _ = _run(lambda: _get(_config(), "/"))
        assert headers["Cache-Control"] == "no-cache"

    def test_index_matches_the_shipped_file(self) -> None:
        """The body of / is the shipped index.html."""
        _, _, body = _run(lambda: _get(_config(), "/"))
        assert (STATIC_DIR / "index.html").read_bytes() == body

    def test_script_type(self) -> None:
        """The hashed script is served as JavaScript."""
        _, headers, _ = _run(lambda: _get(_config(), _asset_path(".js")))
        assert headers["Content-Type"] == "text/javascript; charset=utf-8"

    def test_stylesheet_type(self) -> None:
        """The hashed stylesheet is served as CSS."""
        _, headers, _ = _run(lambda: _get(_config(), _asset_path(".css")))
        assert headers["Content-Type"] == "text/css; charset=utf-8"

    def test_hashed_assets_are_immutable(self) -> None:
        """Content-hashed assets may be cached for a year."""
        _, headers, _ = _run(lambda: _get(_config(), _asset_path(".js")))
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"

    def test_etag_revalidation(self) -> None:
        """A matching If-None-Match gets 304."""
        _, headers, _ = _run(lambda: _get(_config(), "/"))
        status, _, _ = _run(
            lambda: _get(_config(), "/", headers={"If-None-Match": headers["ETag"]})
        )
        assert status == 304

    def test_script_is_gzipped_on_request(self) -> None:
        """A client accepting gzip gets the script compressed; it inflates to the file."""

        async def scenario() -> tuple[str, bytes]:
            path = _asset_path(".js")
            async with (
                _marker(_config()) as (server, _),
                aiohttp.ClientSession() as client,
                client.get(server.make_url(path), headers={"Accept-Encoding": "gzip"}) as response,
            ):
                return response.headers["Content-Encoding"], await response.read()

        encoding, body = _run(scenario)
        assert (encoding, body) == ("gzip", (STATIC_DIR / _asset_path(".js")[1:]).read_bytes())

    def test_plain_without_accept_encoding(self) -> None:
        """A client that does not accept gzip gets the file as it is."""
        _, headers, _ = _run(
            lambda: _get(_config(), _asset_path(".js"), headers={"Accept-Encoding": "identity"})
        )
        assert "Content-Encoding" not in headers

    def test_unknown_path(self) -> None:
        """A path that is not part of the page is 404."""
        status, _, _ = _run(lambda: _get(_config(), "/nope.js"))
        assert status == 404

    @pytest.mark.parametrize(
        "path",
        [
            "/../../../../etc/passwd",
            "/assets/../../server.py",
            "/%2e%2e/%2e%2e/server.py",
            "/assets/..%2f..%2fserver.py",
            "/..%5c..%5cserver.py",
        ],
    )
    def test_traversal_is_rejected(self, path: str) -> None:
        """No request path reaches a file outside the built page."""

        async def scenario() -> tuple[int, bytes]:
            async with _marker(_config()) as (server, _):
                # A raw request line, so the client cannot normalise the path.
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                raw = await reader.read()
                writer.close()
                return int(raw.split(b" ", 2)[1]), raw

        status, raw = _run(scenario)
        assert (status in (400, 404), b"import" in raw) == (True, False)


class TestSecurityHeaders:
    def test_csp_allows_only_what_the_page_needs(self) -> None:
        """The CSP allows own scripts/styles and WebSockets to the serving host only."""
        config = _config(allowed_hosts=("marker.test",))
        _, headers, _ = _run(lambda: _get(config, "/", headers={"Host": "marker.test:8080"}))
        expected = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self' ws://marker.test:8080; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        assert expected == headers["Content-Security-Policy"]

    def test_csp_names_a_direct_broker_url(self) -> None:
        """With amps_websocket_url set, the CSP allows that broker's origin."""
        config = _config(amps_websocket_url="ws://broker.test:9008/amps/json")
        _, headers, _ = _run(lambda: _get(config, "/"))
        assert "connect-src 'self' ws://broker.test:9008;" in headers["Content-Security-Policy"]

    def test_bad_host_is_not_echoed(self) -> None:
        """A Host header with odd characters stays out of the CSP."""
        _, headers, _ = _run(lambda: _get(_config(), "/", headers={"Host": "a b;script-src *"}))
        assert "connect-src 'self';" in headers["Content-Security-Policy"]

    def test_nosniff_and_framing(self) -> None:
        """Responses forbid MIME sniffing and framing."""
        _, headers, _ = _run(lambda: _get(_config(), "/"))
        assert (
            headers["X-Content-Type-Options"],
            headers["X-Frame-Options"],
        ) == ("nosniff", "DENY")

    def test_no_server_banner(self) -> None:
        """Responses do not announce the server software and version."""
        _, headers, _ = _run(lambda: _get(_config(), "/"))
        assert "Server" not in headers

    def test_errors_carry_the_headers(self) -> None:
        """A 404 carries the security headers too."""
        _, headers, _ = _run(lambda: _get(_config(), "/missing"))
        assert headers["X-Content-Type-Options"] == "nosniff"


class TestConfigJson:
    def test_page_config(self) -> None:
        """/config.json carries the marker settings the page uses."""
        config = _config(topic="marks", jaeger_ui_url="http://jaeger:16686")
        _, _, body = _run(lambda: _get(config, "/config.json"))
        expected = {
            "service_name": "react-web-app",
            "topic": "marks",
            "amps_websocket_url": None,
            "jaeger_ui_url": "http://jaeger:16686",
            "traces_enabled": True,
            "traces_upstream": True,
            "journey_stall_s": 10.0,
        }
        assert expected == json.loads(body)

    def test_page_exports_without_upstream(self) -> None:
        """Without otlp_traces_upstream the page still exports (to the journey index)."""
        _, _, body = _run(lambda: _get(_config(otlp_traces_upstream=None), "/config.json"))
        page = json.loads(body)
        assert (page["traces_enabled"], page["traces_upstream"]) == (True, False)


_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_SPANS = otlp_span(trace_id=_TRACE, span_id="00f067aa0ba902b7", name="process-message", service="p")


_PROTOBUF = {"Content-Type": "application/x-protobuf"}


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (yielding to the loop) until ``predicate`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _health(app: web.Application) -> dict[str, Any]:
    """What /healthz would answer, read in process."""
    return cast(dict[str, Any], health_counters(app))


async def _post_traces(
    config: MarkerConfig, body: bytes, *, collector: Collector | None = None
) -> tuple[int, bytes, web.Application]:
    async with (
        _marker(config) as (server, app),
        aiohttp.ClientSession() as client,
        client.post(
            server.make_url("/v1/traces"),
            data=body,
            headers={"Content-Type": "application/x-protobuf"},
        ) as response,
    ):
        return response.status, await response.read(), app


class TestOtlpProxy:
    def test_forwards_protobuf(self) -> None:
        """The body and its content type reach the collector unchanged."""
        collector = Collector()

        async def scenario() -> list[tuple[str, bytes]]:
            async with _collector(collector) as url:
                await _post_traces(_config(otlp_traces_upstream=url), _SPANS)
            return collector.requests

        assert _run(scenario) == [("application/x-protobuf", _SPANS)]

    def test_answers_with_the_collector_status(self) -> None:
        """The page gets the collector's 200."""

        async def scenario() -> int:
            async with _collector(Collector()) as url:
                status, _, _ = await _post_traces(_config(otlp_traces_upstream=url), _SPANS)
            return status

        assert _run(scenario) == 200

    def test_oversized_body_is_413(self) -> None:
        """A body over otlp_max_body_bytes is rejected before forwarding."""
        collector = Collector()

        async def scenario() -> tuple[int, int]:
            async with _collector(collector) as url:
                config = _config(otlp_traces_upstream=url, otlp_max_body_bytes=100)
                status, _, app = await _post_traces(config, b"x" * 101)
            return status, counters(app).otlp_too_large

        assert (_run(scenario), collector.requests) == ((413, 1), [])

    def test_collector_down_is_accepted_and_retried(self) -> None:
        """An unreachable collector never fails the upload: it is queued and retried."""

        async def scenario() -> tuple[int, int]:
            async with _marker(_config()) as (server, app), aiohttp.ClientSession() as client:
                async with client.post(
                    server.make_url("/v1/traces"), data=_SPANS, headers=_PROTOBUF
                ) as response:
                    status = response.status
                await _until(lambda: _health(app)["otlp_forward_retries"] >= 1)
                return status, _health(app)["otlp_upstream_errors"]

        status, errors = _run(scenario)
        assert (status, errors >= 1) == (200, True)

    def test_outage_is_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """Repeated failures during one collector outage give one WARNING, not one per retry."""

        async def scenario() -> None:
            async with _marker(_config(forward_retry_max_delay_ms=50)) as (server, app):
                async with aiohttp.ClientSession() as client:
                    for _ in range(3):
                        async with client.post(
                            server.make_url("/v1/traces"), data=_SPANS, headers=_PROTOBUF
                        ) as response:
                            await response.read()
                await _until(lambda: _health(app)["otlp_forward_retries"] >= 5)

        with caplog.at_level(logging.DEBUG, logger="ampsflow.services.marker.relay"):
            _run(scenario)
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.message
        ]
        assert len(warnings) == 1

    def test_slow_collector_does_not_hold_the_upload(self) -> None:
        """A collector slower than otlp_timeout_ms: the upload still gets 200 at once,
        and the timeout is counted."""
        collector = Collector(delay_s=5.0)

        async def scenario() -> tuple[int, bool]:
            async with _collector(collector) as url:
                config = _config(otlp_traces_upstream=url, otlp_timeout_ms=200)
                async with _marker(config) as (server, app), aiohttp.ClientSession() as client:
                    async with client.post(
                        server.make_url("/v1/traces"), data=_SPANS, headers=_PROTOBUF
                    ) as response:
                        status = response.status
                    await _until(lambda: _health(app)["otlp_upstream_timeouts"] >= 1)
                    return status, True

        assert _run(scenario) == (200, True)

    def test_forwarding_recovers_when_the_collector_comes_back(self) -> None:
        """Uploads queued while the collector is down reach it once it is up, unchanged."""
        collector = Collector()

        async def scenario() -> list[bytes]:
            port = free_port()
            config = _config(
                otlp_traces_upstream=f"http://127.0.0.1:{port}/v1/traces",
                forward_retry_max_delay_ms=200,
            )
            async with _marker(config) as (server, app), aiohttp.ClientSession() as client:
                for body in (_SPANS, _SPANS + b""):
                    async with client.post(
                        server.make_url("/v1/traces"), data=body, headers=_PROTOBUF
                    ) as response:
                        assert response.status == 200
                await _until(lambda: _health(app)["otlp_forward_retries"] >= 2)
                up = web.Application(handler_args={"auto_decompress": False})
                up.router.add_post("/v1/traces", collector.handle)
                runner = web.AppRunner(up)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                try:
                    await _until(lambda: len(collector.requests) >= 2, timeout_s=20)
                finally:
                    await runner.cleanup()
            return [body for _, body in collector.requests]

        assert _run(scenario) == [_SPANS, _SPANS]

    def test_full_queue_drops_and_counts(self) -> None:
        """Past forward_queue_max_requests, uploads are not forwarded (counted) but indexed."""

        async def scenario() -> tuple[int, int, int]:
            config = _config(forward_queue_max_requests=2, forward_retry_max_delay_ms=60000)
            async with _marker(config) as (server, app), aiohttp.ClientSession() as client:
                statuses = set()
                for i in range(6):
                    body = otlp_span(
                        trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", name="x", service="s"
                    )
                    async with client.post(
                        server.make_url("/v1/traces"), data=body, headers=_PROTOBUF
                    ) as response:
                        statuses.add(response.status)
                health = _health(app)
                return (
                    len(statuses),
                    health["otlp_forward_dropped_queue_full"],
                    health["journey_traces"],
                )

        # 2 workers hold one each, 2 wait in the queue, the other 2 are dropped.
        assert _run(scenario) == (1, 2, 6)

    def test_no_upstream_drops(self) -> None:
        """Without an upstream, spans are accepted and dropped (counted)."""
        _, _, app = _run(lambda: _post_traces(_config(otlp_traces_upstream=None), _SPANS))
        assert counters(app).otlp_dropped_no_upstream == 1


def _publish_span(trace: str, span: str = "00000000000000a1", **kw: Any) -> bytes:
    return otlp_span(
        trace_id=trace,
        span_id=span,
        name="publish-message",
        service="react-web-app",
        attributes={"messaging.message.id": "m-1"},
        **kw,
    )


async def _post_all(
    config: MarkerConfig, bodies: list[tuple[bytes, dict[str, str]]]
) -> tuple[list[int], dict[str, Any], list[dict[str, Any]]]:
    """Post each body, then read /api/journeys; the statuses, /healthz and the journeys."""
    async with _marker(config) as (server, app), aiohttp.ClientSession() as client:
        statuses = []
        for body, headers in bodies:
            async with client.post(
                server.make_url("/v1/traces"), data=body, headers=headers
            ) as response:
                statuses.append(response.status)
        async with client.get(server.make_url("/api/journeys")) as response:
            journeys = (await response.json())["journeys"]
        return statuses, _health(app), journeys


class TestJourneyIndex:
    def test_a_pipeline_trace_becomes_one_journey(self) -> None:
        """publish -> process -> persist spans, uploaded apart, form one persisted journey."""
        t0 = 1_700_000_000_000_000_000
        bodies = [
            _publish_span(_TRACE, start_ns=t0),
            otlp_span(
                trace_id=_TRACE,
                span_id="00000000000000b2",
                parent_id="00000000000000a1",
                name="process-message",
                service="processor",
                start_ns=t0 + 3_000_000,
            ),
            otlp_span(
                trace_id=_TRACE,
                span_id="00000000000000c3",
                parent_id="00000000000000b2",
                name="persist-message",
                service="persister",
                start_ns=t0 + 8_000_000,
                events=("fsync",),
            ),
        ]
        _, _, journeys = _run(
            lambda: _post_all(_config(otlp_traces_upstream=None), [(b, _PROTOBUF) for b in bodies])
        )
        (journey,) = journeys
        hops = [(h["hop"], h["service"], h["duration_ms"]) for h in journey["hops"]]
        assert (journey["state"], journey["message_id"], hops, journey["total_ms"]) == (
            "persisted",
            "m-1",
            [
                ("published", "react-web-app", 2.0),
                ("processed", "processor", 2.0),
                ("persisted", "persister", 2.0),
            ],
            10.0,
        )

    def test_failed_hop_carries_its_error(self) -> None:
        """An ERROR persist span makes the journey failed, with that span's message."""
        body = otlp_span(
            trace_id=_TRACE,
            span_id="00000000000000c3",
            name="persist-message",
            service="persister",
            error="ENOSPC: [Errno 28] No space left on device",
        )
        _, _, journeys = _run(
            lambda: _post_all(_config(otlp_traces_upstream=None), [(body, _PROTOBUF)])
        )
        assert (journeys[0]["state"], journeys[0]["error"]) == (
            "failed",
            "persist-message: ENOSPC: [Errno 28] No space left on device",
        )

    def test_gzip_upload_is_indexed_and_forwarded_as_gzip(self) -> None:
        """A gzip upload is read for the index and forwarded as the same gzip bytes."""
        collector = Collector()
        packed = gzip.compress(_SPANS)

        async def scenario() -> tuple[list[dict[str, Any]], list[bytes]]:
            async with _collector(collector) as url:
                headers = {**_PROTOBUF, "Content-Encoding": "gzip"}
                async with _marker(_config(otlp_traces_upstream=url)) as (server, _):
                    async with aiohttp.ClientSession() as client:
                        async with client.post(
                            server.make_url("/v1/traces"), data=packed, headers=headers
                        ) as response:
                            assert response.status == 200
                        async with client.get(server.make_url("/api/journeys")) as response:
                            journeys = (await response.json())["journeys"]
                    await _until(lambda: len(collector.requests) == 1)
            return journeys, [b for _, b in collector.requests]

        journeys, forwarded = _run(scenario)
        assert ([j["trace_id"] for j in journeys], forwarded) == ([_TRACE], [packed])

    @pytest.mark.parametrize(
        "body",
        [
            b"\xff\xff\xff",
            _SPANS[:-3],
            otlp_span(trace_id="0" * 32, span_id="1" * 16, name="x", service="s"),
        ],
        ids=["garbage", "truncated", "zero-trace-id"],
    )
    def test_malformed_protobuf_is_400_and_not_kept(self, body: bytes) -> None:
        """Malformed protobuf: 400, counted, nothing indexed, nothing forwarded."""
        collector = Collector()

        async def scenario() -> tuple[list[int], dict[str, Any], list[dict[str, Any]]]:
            async with _collector(collector) as url:
                return await _post_all(_config(otlp_traces_upstream=url), [(body, _PROTOBUF)])

        statuses, health, journeys = _run(scenario)
        assert (statuses, health["otlp_malformed"], journeys, collector.requests) == (
            [400],
            1,
            [],
            [],
        )

    def test_gzip_bomb_is_413(self) -> None:
        """A small gzip body that inflates past otlp_max_decoded_bytes is refused."""
        bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))
        config = _config(otlp_traces_upstream=None, otlp_max_decoded_bytes=1024 * 1024)
        headers = {**_PROTOBUF, "Content-Encoding": "gzip"}
        statuses, health, journeys = _run(lambda: _post_all(config, [(bomb, headers)]))
        assert (len(bomb) < 65536, statuses, health["otlp_too_large"], journeys) == (
            True,
            [413],
            1,
            [],
        )

    def test_not_gzip_but_labelled_gzip_is_400(self) -> None:
        """A body labelled gzip that is not gzip is malformed."""
        headers = {**_PROTOBUF, "Content-Encoding": "gzip"}
        statuses, _, _ = _run(
            lambda: _post_all(_config(otlp_traces_upstream=None), [(_SPANS, headers)])
        )
        assert statuses == [400]

    def test_oldest_journeys_are_evicted_and_counted(self) -> None:
        """Past journey_max_spans the oldest journeys go first, and evictions are counted."""
        bodies = [
            (
                otlp_span(trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", name="x", service="s"),
                _PROTOBUF,
            )
            for i in range(5)
        ]
        config = _config(otlp_traces_upstream=None, journey_max_spans=3)
        _, health, journeys = _run(lambda: _post_all(config, bodies))
        assert (
            [j["trace_id"] for j in journeys],
            health["journey_evicted_traces"],
            health["journey_spans"],
        ) == ([f"{i:032x}" for i in (5, 4, 3)], 2, 3)

    def test_byte_bound_evicts_too(self) -> None:
        """journey_max_bytes bounds the index as well."""
        bodies = [
            (
                otlp_span(
                    trace_id=f"{i + 1:032x}",
                    span_id=f"{i + 1:016x}",
                    name="x",
                    service="s",
                    attributes={"ampsflow.big": "y" * 400},
                ),
                _PROTOBUF,
            )
            for i in range(10)
        ]
        config = _config(otlp_traces_upstream=None, journey_max_bytes=4000)
        _, health, _ = _run(lambda: _post_all(config, bodies))
        assert (health["journey_bytes"] <= 4000, health["journey_evicted_traces"] > 0) == (
            True,
            True,
        )

    def test_lookup_by_trace_and_message_id(self) -> None:
        """/api/journeys/{trace} and ?message_id= find the journey; unknown is 404."""

        async def scenario() -> tuple[str, list[str], int]:
            config = _config(otlp_traces_upstream=None)
            async with _marker(config) as (server, _), aiohttp.ClientSession() as client:
                async with client.post(
                    server.make_url("/v1/traces"), data=_publish_span(_TRACE), headers=_PROTOBUF
                ):
                    pass
                async with client.get(server.make_url(f"/api/journeys/{_TRACE}")) as response:
                    by_trace = (await response.json())["trace_id"]
                async with client.get(server.make_url("/api/journeys?message_id=m-1")) as response:
                    by_message = [j["trace_id"] for j in (await response.json())["journeys"]]
                async with client.get(server.make_url(f"/api/journeys/{'1' * 32}")) as response:
                    missing = response.status
            return by_trace, by_message, missing

        assert _run(scenario) == (_TRACE, [_TRACE], 404)

    def test_failed_filter(self) -> None:
        """?failed=1 lists only journeys with an ERROR span."""

        async def scenario() -> list[str]:
            config = _config(otlp_traces_upstream=None)
            bad = otlp_span(
                trace_id="2" * 32,
                span_id="2" * 16,
                name="process-message",
                service="processor",
                error="invalid_json: Expecting value",
            )
            async with _marker(config) as (server, _), aiohttp.ClientSession() as client:
                for body in (_publish_span(_TRACE), bad):
                    async with client.post(
                        server.make_url("/v1/traces"), data=body, headers=_PROTOBUF
                    ):
                        pass
                async with client.get(server.make_url("/api/journeys?failed=1")) as response:
                    return [j["trace_id"] for j in (await response.json())["journeys"]]

        assert _run(scenario) == ["2" * 32]


class TestJourneyPush:
    def test_changes_are_pushed_as_server_sent_events(self) -> None:
        """A page following /api/journeys/events gets each changed journey, no polling."""

        async def scenario() -> dict[str, Any]:
            config = _config(otlp_traces_upstream=None)
            async with (
                _marker(config) as (server, _),
                aiohttp.ClientSession() as client,
                client.get(server.make_url("/api/journeys/events")) as events,
            ):
                assert events.headers["Content-Type"].startswith("text/event-stream")
                await events.content.readuntil(b"\n\n")  # the opening comment
                async with client.post(
                    server.make_url("/v1/traces"), data=_publish_span(_TRACE), headers=_PROTOBUF
                ):
                    pass
                block = await asyncio.wait_for(events.content.readuntil(b"\n\n"), 10)
            event, data = block.decode().strip().split("\n")
            assert event == "event: journey"
            return cast(dict[str, Any], json.loads(data.removeprefix("data: ")))

        journey = _run(scenario)
        assert (journey["trace_id"], journey["state"]) == (_TRACE, "published")

    def test_shutdown_ends_the_stream(self) -> None:
        """Stopping the server ends an open event stream promptly."""

        async def scenario() -> float:
            app = build_app(_config(otlp_traces_upstream=None))
            server = TestServer(app, host="127.0.0.1", port=free_port())
            await server.start_server()
            async with (
                aiohttp.ClientSession() as client,
                client.get(server.make_url("/api/journeys/events")) as events,
            ):
                await events.content.readuntil(b"\n\n")
                started = asyncio.get_running_loop().time()
                await server.close()
                return asyncio.get_running_loop().time() - started

        assert _run(scenario) < SHUTDOWN_TIMEOUT_S


async def _ws_round_trip(config: MarkerConfig) -> list[tuple[aiohttp.WSMsgType, Any]]:
    async with (
        _marker(config) as (server, _),
        aiohttp.ClientSession() as client,
        client.ws_connect(server.make_url("/amps/json")) as ws,
    ):
        await ws.send_bytes(b"\x01\x00\x00\x00")
        await ws.send_str('{"c":"logon"}')
        replies = [await ws.receive(timeout=5), await ws.receive(timeout=5)]
    return [(m.type, m.data) for m in replies]


class TestAmpsWebSocketProxy:
    def test_round_trip_keeps_frame_types(self) -> None:
        """Binary and text frames cross the proxy both ways as they are."""

        async def scenario() -> list[tuple[aiohttp.WSMsgType, Any]]:
            async with _echo_broker() as url:
                return await _ws_round_trip(_config(amps_websocket_upstream=url))

        expected = [
            (aiohttp.WSMsgType.BINARY, b"echo:\x01\x00\x00\x00"),
            (aiohttp.WSMsgType.TEXT, 'echo:{"c":"logon"}'),
        ]
        assert expected == _run(scenario)

    def test_broker_down_is_502(self) -> None:
        """Without a broker the upgrade is refused with 502."""

        async def scenario() -> int:
            async with _marker(_config()) as (server, _), aiohttp.ClientSession() as client:
                try:
                    async with client.ws_connect(server.make_url("/amps/json")):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status

        assert _run(scenario) == 502

    def test_outage_is_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """Pages retrying against a down broker give one WARNING per outage."""

        async def scenario() -> None:
            async with _marker(_config()) as (server, _), aiohttp.ClientSession() as client:
                for _ in range(3):
                    with contextlib.suppress(aiohttp.WSServerHandshakeError):
                        await client.ws_connect(server.make_url("/amps/json"))

        with caplog.at_level(logging.DEBUG, logger="ampsflow.services.marker.server"):
            _run(scenario)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1

    def test_broker_close_closes_the_page_socket(self) -> None:
        """When the broker goes away the page's socket is closed, not left hanging."""

        async def scenario() -> aiohttp.WSMsgType:
            async with (
                _echo_broker() as url,
                _marker(_config(amps_websocket_upstream=url)) as (server, _),
                aiohttp.ClientSession() as client,
            ):
                ws = await client.ws_connect(server.make_url("/amps/json"))
                await ws.send_str("x")
                await ws.receive(timeout=5)
            # The echo broker has shut down here.
            message = await ws.receive(timeout=10)
            await ws.close()
            return message.type

        assert _run(scenario) in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    def test_shutdown_closes_page_sockets_going_away(self) -> None:
        """A stopping server closes open page sockets with 1001 (going away)."""

        async def scenario() -> int | None:
            async with _echo_broker() as url, aiohttp.ClientSession() as client:
                async with _marker(_config(amps_websocket_upstream=url)) as (server, _):
                    ws = await client.ws_connect(server.make_url("/amps/json"))
                    await ws.send_str("x")
                    await ws.receive(timeout=5)
                message = await ws.receive(timeout=10)
                await ws.close()
                return int(message.data) if message.type is aiohttp.WSMsgType.CLOSE else None

        assert _run(scenario) == aiohttp.WSCloseCode.GOING_AWAY


class TestHealthz:
    def test_ok(self) -> None:
        """/healthz answers ok."""
        _, _, body = _run(lambda: _get(_config(), "/healthz"))
        assert json.loads(body)["status"] == "ok"


@contextmanager
def _marker_process(tmp_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "ampsflow.yaml"
    config.write_text(f"marker:\n  listen: 127.0.0.1:{port}\n", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "ampsflow", "marker", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def _wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "ampsflow marker exited during startup"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("ampsflow marker did not become healthy")


@pytest.mark.slow
class TestProcess:
    def test_sigterm_exits_zero(self, tmp_path: Path) -> None:
        """SIGTERM shuts the server down gracefully with exit status 0."""
        port = free_port()
        with _marker_process(tmp_path, port) as process:
            _wait_healthy(port, process)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0

    def test_sd_notify_ready_then_stopping(self, tmp_path: Path) -> None:
        """The server tells systemd READY=1 once listening and STOPPING=1 on SIGTERM."""
        path = write_config(
            tmp_path / "ampsflow.yaml", {"marker": {"listen": f"127.0.0.1:{free_port()}"}}
        )
        marker = Daemon("marker", ["marker", "--config", str(path)], tmp_path / "marker.log")
        try:
            marker.start()
            status = marker.terminate()
            notified = (marker.notify.values("READY"), marker.notify.values("STOPPING"))
        finally:
            marker.close()
        assert (status, notified) == (0, (["1"], ["1"]))

    def test_sighup_reloads_without_stopping(self, tmp_path: Path) -> None:
        """SIGHUP (systemctl reload, logrotate) is acknowledged with RELOADING=1 then READY=1."""
        path = write_config(
            tmp_path / "ampsflow.yaml", {"marker": {"listen": f"127.0.0.1:{free_port()}"}}
        )
        marker = Daemon("marker", ["marker", "--config", str(path)], tmp_path / "marker.log")
        try:
            marker.start()
            marker.signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while len(marker.notify.values("READY")) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = marker.running
            status = marker.terminate()
            notified = (marker.notify.values("RELOADING"), marker.notify.values("READY"))
        finally:
            marker.close()
        assert (alive, status, notified) == (True, 0, (["1"], ["1", "1"]))

    def test_port_in_use_is_one_line_error(self, tmp_path: Path) -> None:
        """A busy port gives a one-line error and exit status 1."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with _marker_process(tmp_path, port) as process:
                status = process.wait(timeout=20)
                assert process.stderr is not None
                last = process.stderr.read().decode().strip().splitlines()[-1]
        assert (
            status,
            last.startswith(f"ampsflow marker: cannot listen on 127.0.0.1:{port}"),
        ) == (1, True)


# -- who may talk to the marker: Host and Origin ------------------------------------


async def _status(
    config: MarkerConfig, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, Counters]:
    async with (
        _marker(config) as (server, app),
        aiohttp.ClientSession() as client,
        client.request(method, server.make_url(path), headers=headers, data=body) as response,
    ):
        await response.read()
        return response.status, counters(app)


class TestHostGuard:
    @pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io"])
    @pytest.mark.parametrize("path", ["/", "/healthz", "/config.json", "/assets/x.js"])
    def test_foreign_host_is_403_on_every_route(self, host: str, path: str) -> None:
        """A DNS-rebound name in Host is refused on every route, and counted."""
        status, seen = _run(lambda: _status(_config(), "GET", path, {"Host": host}))
        assert (status, seen.forbidden_host) == (403, 1)

    @pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:80"])
    def test_loopback_names_are_served(self, host: str) -> None:
        """The default allowed hosts: localhost, 127.0.0.1 and ::1, any port."""
        status, _ = _run(lambda: _status(_config(), "GET", "/healthz", {"Host": host}))
        assert status == 200

    def test_listen_host_is_allowed_by_default(self) -> None:
        """The listen address's host is allowed without configuring it."""
        config = _config(listen="10.1.2.3:8080")
        status, _ = _run(lambda: _status(config, "GET", "/", {"Host": "10.1.2.3:8080"}))
        assert status == 200

    def test_configured_hosts_replace_the_defaults(self) -> None:
        """allowed_hosts lists the names served; localhost is then refused."""
        config = _config(allowed_hosts=("marker.example.com",))
        ok, _ = _run(lambda: _status(config, "GET", "/", {"Host": "marker.example.com:443"}))
        refused, _ = _run(lambda: _status(config, "GET", "/", {"Host": "localhost"}))
        assert (ok, refused) == (200, 403)

    def test_refusal_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A refused Host is named in a WARNING."""
        with caplog.at_level(logging.WARNING, logger="ampsflow.services.marker.server"):
            _run(lambda: _status(_config(), "GET", "/", {"Host": "evil.example"}))
        assert any("'evil.example'" in r.getMessage() for r in caplog.records)

    def test_a_flood_of_refusals_logs_once(self, caplog: pytest.LogCaptureFixture) -> None:
        """Many refusals in a burst give one WARNING, not one per request."""

        async def scenario() -> None:
            async with _marker(_config()) as (server, _), aiohttp.ClientSession() as client:
                for _ in range(20):
                    async with client.get(
                        server.make_url("/"), headers={"Host": "evil.example"}
                    ) as response:
                        await response.read()

        with caplog.at_level(logging.WARNING, logger="ampsflow.services.marker.server"):
            _run(scenario)
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1


class TestOriginGuard:
    def test_cross_site_websocket_is_refused(self) -> None:
        """A page on another site cannot open /amps/json (cross-site WebSocket hijacking)."""

        async def scenario() -> tuple[int, int]:
            async with (
                _echo_broker() as url,
                _marker(_config(amps_websocket_upstream=url)) as (
                    server,
                    app,
                ),
            ):
                async with aiohttp.ClientSession() as client:
                    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                        await client.ws_connect(
                            server.make_url("/amps/json"), origin="http://evil.example"
                        )
                return refused.value.status, counters(app).forbidden_origin

        assert _run(scenario) == (403, 1)

    def test_same_origin_websocket_is_relayed(self) -> None:
        """The page's own origin (the request's Host) opens /amps/json."""

        async def scenario() -> Any:
            async with (
                _echo_broker() as url,
                _marker(_config(amps_websocket_upstream=url)) as (
                    server,
                    _,
                ),
            ):
                origin = f"http://127.0.0.1:{server.port}"
                async with (
                    aiohttp.ClientSession() as client,
                    client.ws_connect(server.make_url("/amps/json"), origin=origin) as ws,
                ):
                    await ws.send_str("hi")
                    return (await ws.receive(timeout=5)).data

        assert _run(scenario) == "echo:hi"

    def test_configured_origin_is_allowed(self) -> None:
        """allowed_origins admits a reverse proxy's origin."""
        config = _config(allowed_origins=("https://marker.example.com",))
        headers = {"Origin": "https://marker.example.com"}
        status, _ = _run(lambda: _status(config, "GET", "/healthz", headers))
        assert status == 200

    @pytest.mark.parametrize(
        "origin", ["http://evil.example", "null", "http://127.0.0.1:1", "http://localhost.evil"]
    )
    def test_cross_site_span_upload_is_refused(self, origin: str) -> None:
        """A page on another site cannot post spans either."""
        headers = {"Origin": origin, "Content-Type": "application/x-protobuf"}
        status, seen = _run(lambda: _status(_config(), "POST", "/v1/traces", headers, _SPANS))
        assert (status, seen.forbidden_origin) == (403, 1)

    def test_bad_origin_is_not_forwarded(self) -> None:
        """A refused upload never reaches the collector."""
        collector = Collector()

        async def scenario() -> None:
            async with _collector(collector) as url:
                headers = {
                    "Origin": "http://evil.example",
                    "Content-Type": "application/x-protobuf",
                }
                await _status(
                    _config(otlp_traces_upstream=url), "POST", "/v1/traces", headers, _SPANS
                )

        _run(scenario)
        assert collector.requests == []


# -- what /v1/traces takes ----------------------------------------------------------


class TestOtlpInput:
    @pytest.mark.parametrize(
        "content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
    )
    def test_non_protobuf_is_415(self, content_type: str) -> None:
        """Only OTLP/HTTP protobuf is accepted; the rest is 415 and counted."""
        headers = {"Content-Type": content_type}
        status, seen = _run(lambda: _status(_config(), "POST", "/v1/traces", headers, _SPANS))
        assert (status, seen.otlp_unsupported_media_type) == (415, 1)

    @pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, br"])
    def test_unknown_encoding_is_415(self, encoding: str) -> None:
        """Only identity and gzip bodies are accepted."""
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": encoding}
        status, _ = _run(lambda: _status(_config(), "POST", "/v1/traces", headers, _SPANS))
        assert status == 415

    def test_gzip_body_arrives_as_gzip(self) -> None:
        """A gzip upload reaches the collector as the same gzip bytes, labelled gzip."""
        received: list[tuple[str | None, bytes]] = []

        async def handle(request: web.Request) -> web.Response:
            received.append((request.headers.get("Content-Encoding"), await request.read()))
            return web.Response(body=b"", content_type="application/x-protobuf")

        async def scenario() -> None:
            app = web.Application(handler_args={"auto_decompress": False})
            app.router.add_post("/v1/traces", handle)
            async with _serve(app) as upstream:
                config = _config(otlp_traces_upstream=str(upstream.make_url("/v1/traces")))
                headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
                await _status(config, "POST", "/v1/traces", headers, gzip.compress(_SPANS))

        _run(scenario)
        assert [(e, gzip.decompress(b)) for e, b in received] == [("gzip", _SPANS)]


# -- slow clients ------------------------------------------------------------------


class TestSlowClients:
    def test_slow_body_is_408(self) -> None:
        """A body that stops arriving gets 408 after body_timeout_s, and is counted."""

        async def scenario() -> tuple[bytes, int]:
            async with _marker(_config(body_timeout_s=0.3)) as (server, app):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(
                    b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\nabc"
                )
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), timeout=10)
                writer.close()
                return line, counters(app).body_timeouts

        line, timeouts = _run(scenario)
        assert (line.split(b" ")[1], timeouts) == (b"408", 1)

    @pytest.mark.slow
    def test_slowloris_connections_are_closed(self) -> None:
        """3,000 connections that never finish their headers (some trickling a byte at a
        time) are all closed by the server after header_timeout_s, and /healthz answers
        throughout."""
        count, trickling, timeout_s = 3000, 200, 1.0

        async def scenario() -> tuple[int, int, int]:
            async with _marker(_config(header_timeout_s=timeout_s)) as (server, _):
                conns = []
                for _ in range(count):
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
                    conns.append((reader, writer))
                started = asyncio.get_running_loop().time()

                async def trickle(writer: asyncio.StreamWriter) -> None:
                    with contextlib.suppress(ConnectionError):
                        while not writer.is_closing():
                            writer.write(b"a")
                            await asyncio.sleep(0.2)

                tricklers = [asyncio.create_task(trickle(w)) for _, w in conns[:trickling]]
                async with (
                    aiohttp.ClientSession() as client,
                    client.get(server.make_url("/healthz")) as response,
                ):
                    health = response.status

                async def closed(reader: asyncio.StreamReader) -> bool:
                    try:
                        rest = await asyncio.wait_for(reader.read(), timeout=timeout_s + 10)
                    except TimeoutError:
                        return False
                    except ConnectionError:
                        return True  # reset by the server: closed too
                    return rest == b""

                results = await asyncio.gather(*(closed(r) for r, _ in conns))
                elapsed = asyncio.get_running_loop().time() - started
                for task in tricklers:
                    task.cancel()
                for _, writer in conns:
                    writer.close()
                return health, sum(results), int(elapsed < timeout_s + 10)

        assert _run(scenario) == (200, count, 1)


# -- property: whatever arrives, the marker keeps serving and forwards only what it should


@dataclass
class _Threaded:
    """A marker and its fake collector served from a loop in another thread."""

    port: int
    collector: Collector
    app: web.Application


@contextmanager
def _threaded_marker(**overrides: Any) -> Iterator[_Threaded]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    collector = Collector()
    stack = contextlib.AsyncExitStack()

    async def start() -> _Threaded:
        url = await stack.enter_async_context(_collector(collector))
        config = _config(otlp_traces_upstream=url, otlp_max_body_bytes=4096, **overrides)
        server, app = await stack.enter_async_context(_marker(config))
        return _Threaded(server.port, collector, app)

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _send_raw(port: int, data: bytes) -> int | None:
    """Send one raw request; the response status, or None if the server closed first."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    head = b"".join(chunks).split(b"\r\n", 1)[0].split(b" ")
    return int(head[1]) if len(head) > 1 and head[1].isdigit() else None


def _still_serving(port: int) -> bool:
    for path, marker in (("/healthz", b'"status"'), ("/", b"<!doctype html>")):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200 or marker not in response.read().lower():
                return False
    return True


_OWN_HOSTS = ("127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "127.0.0.1")


def _should_forward(request: HttpRequest, port: int) -> bool:
    own = {h.replace("{port}", str(port)) for h in _OWN_HOSTS}
    host = None if request.host is None else request.host.replace("{port}", str(port))
    origin = None if request.origin is None else request.origin.replace("{port}", str(port))
    media = (request.content_type or "").split(";")[0].strip()
    return (
        request.method == "POST"
        and request.path == "/v1/traces"
        and host in own
        and (origin is None or origin == f"http://{host}")
        and media in ("application/x-protobuf", "application/protobuf")
        and (request.content_encoding or "identity").lower() in ("identity", "gzip")
        and len(request.body) <= 4096
        and _decodes(request)
    )


def _decodes(request: HttpRequest) -> bool:
    """Whether the upload is a complete OTLP request (gzip undone when labelled so)."""
    encoding = (request.content_encoding or "identity").lower()
    try:
        span_records(decompress(request.body, encoding, 32 * 1024 * 1024))
    except OtlpBodyError:
        return False
    return True


class TestHostileRequestsProperty:
    @given(
        requests=st.lists(
            http_requests(own_hosts=_OWN_HOSTS, bodies=otlp_bodies()),
            min_size=1,
            max_size=5,
        )
    )
    def test_property_serves_and_forwards_only_what_it_should(
        self, threaded: _Threaded, requests: list[HttpRequest]
    ) -> None:
        """Hostile Host, Origin, Content-Type, Content-Encoding and bodies: the marker
        still serves /healthz and the page, and the collector receives exactly the
        uploads that pass every check."""
        before = len(threaded.collector.requests)
        expected = [r.body for r in requests if _should_forward(r, threaded.port)]
        for request in requests:
            _send_raw(threaded.port, request.raw(port=threaded.port))
        assert _still_serving(threaded.port)
        wait_for(
            lambda: len(threaded.collector.requests) >= before + len(expected),
            timeout_s=10,
            what="the accepted uploads to be forwarded",
        )
        forwarded = [body for _, body in threaded.collector.requests[before:]]
        assert sorted(forwarded) == sorted(expected)


@pytest.fixture
def threaded() -> Iterator[_Threaded]:
    with _threaded_marker() as marker:
        yield marker


# -- ampsflow journey ----------------------------------------------------------------


def _journey_cli(tmp_path: Path, port: int, ident: str) -> subprocess.CompletedProcess[str]:
    config = write_config(
        tmp_path / "ampsflow.yaml",
        {
            "marker": {"listen": f"127.0.0.1:{port}"},
            "persister": {"path": str(tmp_path / "messages.jsonl")},
        },
    )
    return subprocess.run(
        [sys.executable, "-m", "ampsflow", "journey", ident, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
class TestJourneyCommand:
    @pytest.fixture
    def marker_with_a_failed_journey(self, tmp_path: Path) -> Iterator[int]:
        with _threaded_marker() as marker:
            t0 = 1_700_000_000_000_000_000
            for body in (
                _publish_span(_TRACE, start_ns=t0),
                otlp_span(
                    trace_id=_TRACE,
                    span_id="00000000000000c3",
                    name="persist-message",
                    service="persister",
                    start_ns=t0 + 5_000_000,
                    error="PermissionError: [Errno 13] Permission denied: 'messages.jsonl'",
                ),
            ):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{marker.port}/v1/traces", data=body, headers=_PROTOBUF
                )
                with urllib.request.urlopen(request, timeout=10):
                    pass
            line = {"id": "m-1", "text": "t", "_ampsflow": {"trace_id": _TRACE}}
            (tmp_path / "messages.jsonl").write_text(
                '{"id":"other"}\n' + json.dumps(line) + "\n", encoding="utf-8"
            )
            yield marker.port

    def test_prints_hops_error_and_line(
        self, tmp_path: Path, marker_with_a_failed_journey: int
    ) -> None:
        """By message id: each hop with service and time, the error, and the JSONL line."""
        done = _journey_cli(tmp_path, marker_with_a_failed_journey, "m-1")
        out = done.stdout
        assert (
            done.returncode,
            "state failed" in out,
            "published  react-web-app" in out,
            "error: persist-message: PermissionError" in out,
            out.count("JSONL ") == 1 and '"id": "m-1"' in out,
        ) == (0, True, True, True, True)

    def test_by_trace_id(self, tmp_path: Path, marker_with_a_failed_journey: int) -> None:
        """A trace id finds the same journey."""
        done = _journey_cli(tmp_path, marker_with_a_failed_journey, _TRACE.upper())
        assert (done.returncode, "message m-1" in done.stdout) == (0, True)

    def test_unknown_id_is_status_1(
        self, tmp_path: Path, marker_with_a_failed_journey: int
    ) -> None:
        """Neither a journey nor a line: exit status 1 with a message."""
        done = _journey_cli(tmp_path, marker_with_a_failed_journey, "nope")
        assert (done.returncode, "no journey of nope" in done.stdout) == (1, True)

    def test_marker_down_is_status_2(self, tmp_path: Path) -> None:
        """An unreachable marker: a one-line error and exit status 2."""
        done = _journey_cli(tmp_path, free_port(), "m-1")
        assert (done.returncode, done.stderr.startswith("ampsflow journey: cannot ask")) == (
            2,
            True,
        )
