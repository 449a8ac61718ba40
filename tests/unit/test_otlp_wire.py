"""The hand-written OTLP encoder writes what the official one writes.

Both encoders run over the same SDK spans; both outputs are decoded with
``opentelemetry-proto`` and compared field by field (and byte for byte).
"""

from __future__ import annotations

import gzip
import math
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.protobuf import text_format
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from ampsflow.adapters.otlp_wire import OtlpHttpSpanExporter, SpanEncoder
from ampsflow.adapters.telemetry import setup_telemetry
from ampsflow.config import TelemetryConfig

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)

# -- span shapes -----------------------------------------------------------------

TEXT = st.text(max_size=12) | st.sampled_from(["", "amps", "ü", "日本語", "🙂", "a\x00b"])
SCALARS = st.one_of(
    TEXT,
    st.booleans(),
    INT64,
    st.integers(),  # some outside int64: both encoders leave such an attribute out
    st.floats(),
    st.binary(max_size=8),
)
VALUES = st.one_of(
    SCALARS,
    st.none(),
    st.lists(TEXT, max_size=3).map(tuple),
    st.lists(INT64, max_size=3).map(tuple),
    st.lists(st.floats(), max_size=3).map(tuple),
    st.lists(st.booleans(), max_size=3).map(tuple),
    st.lists(SCALARS, max_size=3),
    st.dictionaries(TEXT, SCALARS, max_size=2),
)
ATTRIBUTES = st.dictionaries(TEXT, VALUES, max_size=5)
TIMES = st.one_of(st.none(), st.integers(min_value=0, max_value=(1 << 64) - 1))
TRACE_STATES = st.lists(
    st.tuples(st.sampled_from(["vendor", "a1", "x@y"]), st.sampled_from(["v", "1-2", "ok"])),
    max_size=2,
    unique_by=lambda kv: kv[0],
).map(TraceState)


@st.composite
def span_contexts(draw: st.DrawFn) -> SpanContext:
    return SpanContext(
        trace_id=draw(st.integers(min_value=1, max_value=(1 << 128) - 1)),
        span_id=draw(st.integers(min_value=1, max_value=(1 << 64) - 1)),
        is_remote=draw(st.booleans()),
        trace_flags=TraceFlags(draw(st.sampled_from([0, 1]))),
        trace_state=draw(st.none() | TRACE_STATES),
    )


def bounded_attributes(draw: st.DrawFn) -> object:
    attributes = draw(ATTRIBUTES)
    if draw(st.booleans()):
        return attributes
    return BoundedAttributes(maxlen=draw(st.integers(0, 4)), attributes=attributes)


@st.composite
def events(draw: st.DrawFn) -> Event:
    return Event(draw(TEXT), bounded_attributes(draw), draw(TIMES))  # type: ignore[arg-type]


@st.composite
def links(draw: st.DrawFn) -> Link:
    return Link(draw(span_contexts()), bounded_attributes(draw))  # type: ignore[arg-type]


def bounded(draw: st.DrawFn, items: list[object]) -> object:
    if draw(st.booleans()):
        return tuple(items)
    return BoundedList.from_seq(draw(st.integers(0, 3)), items)


RESOURCES = st.builds(
    Resource, ATTRIBUTES.map(lambda a: {k: v for k, v in a.items() if v is not None}), TEXT
)
SCOPES = st.one_of(
    st.none(),
    st.builds(
        InstrumentationScope, TEXT, st.none() | TEXT, st.none() | TEXT, st.none() | ATTRIBUTES
    ),
)
STATUSES = st.one_of(
    st.just(Status()),
    st.builds(Status, st.sampled_from(list(StatusCode)), st.none() | TEXT),
)


@st.composite
def otlp_spans(draw: st.DrawFn) -> list[ReadableSpan]:
    """Batches of SDK spans over a few resources and scopes, of every shape."""
    resources = draw(st.lists(RESOURCES, min_size=1, max_size=3))
    scopes = draw(st.lists(SCOPES, min_size=1, max_size=3))
    batch = []
    for _ in range(draw(st.integers(0, 6))):
        batch.append(
            ReadableSpan(
                name=draw(TEXT),
                context=draw(span_contexts()),
                parent=draw(st.none() | span_contexts()),
                resource=draw(st.sampled_from(resources)),
                attributes=bounded_attributes(draw),  # type: ignore[arg-type]
                events=bounded(draw, draw(st.lists(events(), max_size=3))),  # type: ignore[arg-type]
                links=bounded(draw, draw(st.lists(links(), max_size=2))),  # type: ignore[arg-type]
                kind=draw(st.sampled_from(list(SpanKind))),
                status=draw(STATUSES),
                start_time=draw(TIMES),
                end_time=draw(TIMES),
                instrumentation_scope=draw(st.sampled_from(scopes)),
            )
        )
    return batch


def official(spans: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializePartialToString()


def has_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def assert_same(spans: Sequence[ReadableSpan]) -> None:
    """Decoded field by field, the two requests are equal (NaN-safe), and so are the bytes."""
    mine = SpanEncoder().encode(spans)
    theirs = official(spans)
    decoded_mine = ExportTraceServiceRequest.FromString(mine)
    decoded_theirs = ExportTraceServiceRequest.FromString(theirs)
    assert text_format.MessageToString(decoded_mine) == text_format.MessageToString(decoded_theirs)
    assert decoded_mine.SerializeToString(deterministic=True) == decoded_theirs.SerializeToString(
        deterministic=True
    )
    assert [f.name for f, _ in decoded_mine.ListFields()] == [
        f.name for f, _ in decoded_theirs.ListFields()
    ]
    assert mine == theirs


@settings(max_examples=150)
@given(otlp_spans())
def test_any_batch_encodes_as_the_official_encoder(spans: list[ReadableSpan]) -> None:
    """Resources, scopes, attributes of every type, events, links, status: all equal."""
    assert_same(spans)


@given(otlp_spans())
def test_a_reused_encoder_keeps_encoding_equal(spans: list[ReadableSpan]) -> None:
    """The caches (resource, scope, key=value) never change what a later batch encodes."""
    encoder = SpanEncoder()
    for _ in range(2):
        assert encoder.encode(spans) == official(spans)
        assert encoder.encode(spans[::-1]) == official(spans[::-1])


CTX = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, False, TraceFlags(1))


def span(**kwargs: object) -> ReadableSpan:
    values: dict[str, object] = {"name": "s", "context": CTX, "start_time": 1, "end_time": 2}
    values.update(kwargs)
    return ReadableSpan(**values)  # type: ignore[arg-type]


@given(st.one_of(st.floats(), INT64, st.booleans(), st.text(), st.binary()))
@example(-0.0)
@example(0.0)
@example(float("nan"))
@example(True)
@example(1)
def test_equal_but_different_values_are_not_confused_by_the_cache(value: object) -> None:
    """``True``/``1``/``1.0`` and ``0.0``/``-0.0`` hash alike but encode differently."""
    encoder = SpanEncoder()
    for candidate in (value, 1, True, 1.0, 0.0, -0.0):
        spans = [span(attributes={"k": candidate})]
        assert encoder.encode(spans) == official(spans)


def test_unencodable_attributes_are_left_out_like_the_official_encoder() -> None:
    """An int outside int64 is skipped; the span and its other attributes are sent."""
    spans = [span(attributes={"big": 1 << 70, "neg": -(1 << 64), "ok": "yes", "arr": (1, 1 << 64)})]
    assert_same(spans)
    decoded = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    keys = [kv.key for kv in decoded.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert keys == ["ok"]


def test_dropped_counts_and_remote_flags_are_carried() -> None:
    """Dropped attributes, events and links, and the is-remote flags of parent and link."""
    attributes = BoundedAttributes(maxlen=1, attributes={"a": 1, "b": 2})
    events = BoundedList.from_seq(1, [Event("e1", {}, 5), Event("e2", {}, 6)])
    remote = SpanContext(7, 8, True, TraceFlags(1), TraceState([("k", "v")]))
    links = BoundedList.from_seq(1, [Link(remote, {"x": "y"}), Link(CTX)])
    spans = [
        span(
            attributes=attributes,
            events=events,
            links=links,
            parent=remote,
            kind=SpanKind.PRODUCER,
            status=Status(StatusCode.ERROR, "ENOSPC: kein Platz ✗"),
            resource=Resource({"service.name": "p"}, "https://schema/1"),
            instrumentation_scope=InstrumentationScope("ampsflow", "1", "https://schema/2"),
        )
    ]
    assert_same(spans)
    decoded = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    out = decoded.resource_spans[0].scope_spans[0].spans[0]
    assert (out.dropped_attributes_count, out.dropped_events_count, out.dropped_links_count) == (
        1,
        1,
        1,
    )
    assert out.flags == 0x300


def test_an_empty_batch_is_an_empty_request() -> None:
    assert SpanEncoder().encode([]) == official([]) == b""


# -- the exporter: the SDK exporter's transport, these bytes ---------------------


class Collector:
    """A loopback OTLP/HTTP receiver answering from a script of status codes."""

    def __init__(self, statuses: Sequence[int] = ()) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[str]:
        names = []
        for headers, raw in self.requests:
            gzipped = headers.get("content-encoding") == "gzip"
            request = ExportTraceServiceRequest.FromString(gzip.decompress(raw) if gzipped else raw)
            names += [
                s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
            ]
        return names


def sample_spans(count: int) -> list[ReadableSpan]:
    return [
        span(name=f"span-{i}", attributes={"i": i, "messaging.system": "amps"})
        for i in range(count)
    ]


def test_the_exporter_sends_gzip_with_the_configured_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_EXPORTER_OTLP_* variables apply as with the SDK exporter; the body is ours."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=secret,tenant=a%20b")
    spans = sample_spans(40)
    with Collector() as collector:
        exporter = OtlpHttpSpanExporter(endpoint=collector.url, timeout=5)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        exporter.shutdown()
    ((headers, body),) = collector.requests
    assert headers["content-encoding"] == "gzip"
    assert headers["content-type"] == "application/x-protobuf"
    assert (headers["x-api-key"], headers["tenant"]) == ("secret", "a b")
    assert gzip.decompress(body) == official(spans)


def test_a_transient_error_is_retried_and_a_permanent_one_fails() -> None:
    """503 is retried (Retry-After honoured) until accepted; 400 fails the batch at once."""
    with Collector(statuses=[503, 503]) as collector:
        exporter = OtlpHttpSpanExporter(endpoint=collector.url, timeout=5)
        assert exporter.export(sample_spans(3)) is SpanExportResult.SUCCESS
        assert len(collector.requests) == 3
        collector.statuses = [400]
        assert exporter.export(sample_spans(2)) is SpanExportResult.FAILURE
        assert len(collector.requests) == 4
        exporter.shutdown()
        assert exporter.export(sample_spans(1)) is SpanExportResult.FAILURE


def test_the_daemons_export_http_protobuf_through_this_encoder() -> None:
    """setup_telemetry's default exporter delivers every span; a rejected batch counts as lost."""
    with Collector() as collector:
        config = TelemetryConfig(endpoint=collector.url.removesuffix("/v1/traces"))
        telemetry = setup_telemetry(
            config, "processor", set_global=False, environ={"OTEL_METRICS_EXPORTER": "none"}
        )
        exporter = telemetry.span_exporter
        assert isinstance(exporter, OtlpHttpSpanExporter)
        for i in range(5):
            telemetry.tracer.start_span(f"m{i}").end()
        assert telemetry.force_flush(10)
        collector.statuses = [400]
        telemetry.tracer.start_span("rejected").end()
        telemetry.shutdown()
        assert sorted(collector.spans()) == ["m0", "m1", "m2", "m3", "m4", "rejected"]
        assert telemetry.losses.failed_export == 1


def test_without_a_known_sdk_exporter_layout_the_sdk_encodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An SDK exporter of another shape: a warning, then the SDK's own export, same bytes."""
    original = OTLPSpanExporter.__init__

    def other_layout(self: OTLPSpanExporter, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self._client.export = None  # type: ignore[method-assign, assignment]

    spans = sample_spans(3)
    with Collector() as collector:
        monkeypatch.setattr(OTLPSpanExporter, "__init__", other_layout)
        fallback = OtlpHttpSpanExporter(endpoint=collector.url, timeout=5)
        monkeypatch.undo()
        assert fallback._encoder is None
        fallback._client = OtlpHttpSpanExporter(endpoint=collector.url, timeout=5)._client
        assert fallback.export(spans) is SpanExportResult.SUCCESS
    ((_, body),) = collector.requests
    assert body == official(spans)


def test_keys_whose_values_never_repeat_stop_being_cached() -> None:
    """Unique ids do not push the recurring attributes out; every batch still encodes equal."""
    encoder = SpanEncoder()
    for batch in range(3):
        spans = [
            span(
                attributes={"messaging.system": "amps", "id": f"{batch}-{i}", "n": batch * 500 + i}
            )
            for i in range(500)
        ]
        assert encoder.encode(spans) == official(spans)
    assert {"id", "n"} <= encoder._unique_keys
    assert "messaging.system" not in encoder._unique_keys
    assert any(key[1] == "messaging.system" for key in encoder._kv_cache)


def _primed_encoder(keys: list[str]) -> SpanEncoder:
    """An encoder that has counted ``keys`` as unique (their values never repeated)."""
    encoder = SpanEncoder()
    spans = [span(attributes={key: f"prime-{i}" for key in keys}) for i in range(300)]
    encoder.encode(spans)
    assert set(keys) <= encoder._unique_keys
    return encoder


UNIQUE_KEYS = ["messaging.message.id", "n", "ü-key"]
PRIMED = _primed_encoder(UNIQUE_KEYS)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(UNIQUE_KEYS), VALUES), min_size=1, max_size=4))
def test_values_of_unique_keys_encode_as_the_official_encoder(
    items: list[tuple[str, object]],
) -> None:
    """Short ASCII text and int64 take the inline path; long, non-ASCII, negative, out-of-range
    and other types take the general one: every one encodes (or is left out) as officially."""
    spans = [span(attributes=dict(items)), span(attributes={k: "x" * 200 for k, _ in items})]
    assert PRIMED.encode(spans) == official(spans)
