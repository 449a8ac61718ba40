"""Hypothesis strategies shared by the property tests, and the test profiles.

Profiles: ``ci`` (the default; bounded so the suite stays fast) and ``long``
for a deeper run, e.g. ``HYPOTHESIS_PROFILE=long python -m pytest
tests/integration/test_marker_server.py -k property``.

Strategies: HTTP requests to the marker (:func:`http_requests`), and message
bodies for the processor and persister (:func:`hostile_bodies`).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- HTTP requests to the marker ---------------------------------------------------

HOSTILE_HOSTS = (
    "evil.example",
    "evil.example:8080",
    "127.0.0.1.evil.example",
    "localhost.evil.example:80",
    "[::2]:8080",
    "",
    " ",
    "a b",
    "127.0.0.1:99999",
    "127.0.0.1:x",
    "[::1",
    "xn--80ak6aa92e.com",
    "@127.0.0.1",
)
"""Host header values the default marker must refuse."""

HOSTILE_ORIGINS = (
    "http://evil.example",
    "https://evil.example:8080",
    "null",
    "file://",
    "http://127.0.0.1.evil.example",
    "http://127.0.0.1:1",
    "javascript:alert(1)",
    "http://user@127.0.0.1",
    "",
)
"""Origin values that are not the marker's own."""

CONTENT_TYPES = (
    "application/x-protobuf",
    "application/protobuf",
    "application/x-protobuf; charset=binary",
    "application/json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "application/x-protobufx",
    "",
)

CONTENT_ENCODINGS = ("identity", "gzip", "GZIP", "deflate", "br", "zstd", "gzip, gzip", "x")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request to send as raw bytes (so no client normalises it).

    ``None`` for a header means it is not sent.
    """

    method: str
    path: str
    host: str | None
    origin: str | None
    content_type: str | None
    content_encoding: str | None
    body: bytes

    def raw(self, *, port: int) -> bytes:
        """The request on the wire; ``{port}`` in the Host is replaced by ``port``."""
        lines = [f"{self.method} {self.path} HTTP/1.1"]
        if self.host is not None:
            lines.append(f"Host: {self.host.replace('{port}', str(port))}")
        if self.origin is not None:
            lines.append(f"Origin: {self.origin.replace('{port}', str(port))}")
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        if self.content_encoding is not None:
            lines.append(f"Content-Encoding: {self.content_encoding}")
        lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("latin-1", "replace") + self.body


def http_requests(
    *, own_hosts: tuple[str, ...], bodies: st.SearchStrategy[bytes]
) -> st.SearchStrategy[HttpRequest]:
    """Requests mixing the marker's own Host/Origin with hostile ones.

    ``own_hosts`` are Host values the marker accepts (``{port}`` is replaced
    with the marker's port when the request is sent); own origins are built
    from them.
    """
    hosts = st.one_of(st.sampled_from(own_hosts), st.sampled_from(HOSTILE_HOSTS), st.none())
    own_origins = tuple(f"http://{h}" for h in own_hosts)
    origins = st.one_of(st.none(), st.sampled_from(own_origins), st.sampled_from(HOSTILE_ORIGINS))
    maybe_gzip = st.tuples(bodies, st.booleans()).map(
        lambda pair: gzip.compress(pair[0], mtime=0) if pair[1] else pair[0]
    )
    return st.builds(
        HttpRequest,
        method=st.sampled_from(("POST", "POST", "POST", "GET", "PUT", "OPTIONS", "DELETE")),
        path=st.sampled_from(("/v1/traces", "/v1/traces", "/", "/healthz", "/v1/traces/", "/v1")),
        host=hosts,
        origin=origins,
        content_type=st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
        content_encoding=st.one_of(st.none(), st.sampled_from(CONTENT_ENCODINGS)),
        body=maybe_gzip,
    )


# -- devbroker queues ---------------------------------------------------------------

QUEUE_OPERATION_NAMES = (
    "offer",
    "subscribe",
    "unsubscribe",
    "ack",
    "cancel",
    "expire",
    "advance",
    "dispatch",
)

queue_operation = st.tuples(
    st.sampled_from(QUEUE_OPERATION_NAMES),
    st.integers(min_value=0, max_value=30),
    st.integers(min_value=0, max_value=5),
)
"""What can happen to a devbroker queue, ``(name, a, b)``: ``a`` picks a message or a
subscription, ``b`` a count or a time step."""

queue_operations = st.lists(queue_operation, max_size=120)
"""Sequences of queue events, for the property tests of :mod:`ampsflow.devbroker.queues`."""


# -- message bodies for the processor and persister ------------------------------------
#
# Generated as *text a client could publish*, not as Python values, so they include
# what a JSON encoder never writes: escapes of lone surrogates, raw control
# characters, numbers no double holds, duplicate keys, deep nesting, NaN, and bodies
# that are not UTF-8 or not an object at all.

LONG_FACTOR = 10
"""How many times more examples a process-driving test runs under the ``long`` profile."""


def examples(ci: int) -> int:
    """``ci`` examples, or :data:`LONG_FACTOR` times as many under the ``long`` profile.

    For tests that set their own ``max_examples`` (those driving real processes,
    and the fast pure ones that run more than the profile's default).
    """
    return ci * LONG_FACTOR if os.environ.get("HYPOTHESIS_PROFILE") == "long" else ci


_plain_chars = st.characters(exclude_characters='"\\', exclude_categories=("Cs", "Cc"))

_string_piece = st.one_of(
    st.text(_plain_chars, max_size=6),
    # Any \uXXXX escape: lone surrogates, valid pairs when two meet, escaped controls.
    st.integers(0, 0xFFFF).map(lambda c: f"\\u{c:04x}"),
    st.sampled_from(["\\ud83d\\ude00", '\\"', "\\\\", "\\n", "\\/", "\\t"]),
    # A raw control character inside a string is not JSON.
    st.integers(0, 0x1F).map(chr),
)

json_string_text = st.lists(_string_piece, max_size=6).map(lambda parts: '"' + "".join(parts) + '"')
"""A JSON string literal as text (not always valid: raw controls, lone surrogates)."""

json_number_text = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-400, 400).map(lambda e: f"1e{e}"),
    st.integers(4290, 4310).map(lambda n: "9" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1E400", "-0", "1.0e+15"]),
)
"""A number as text: ordinary, huge, out of range for a double, or not JSON."""

_keys = st.one_of(
    # A small alphabet so that duplicates (also via escapes: "\u0061" is "a") are common.
    st.sampled_from(['"a"', '"b"', '"\\u0061"', '"id2"']),
    json_string_text,
)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"


json_value_text = st.recursive(
    st.one_of(
        json_string_text,
        json_number_text,
        st.sampled_from(["true", "false", "null"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(_array),
        st.lists(st.tuples(_keys, inner), max_size=4).map(_object),
    ),
    max_leaves=12,
)
"""Any JSON-ish value as text, nested a few levels."""

deep_nesting_text = st.tuples(
    st.one_of(st.integers(1, 3000), st.integers(500, 520), st.integers(950, 1010)),
    st.sampled_from(["[", '{"a":']),
).map(lambda t: t[1] * t[0] + "1" + ("]" if t[1] == "[" else "}") * t[0])
"""An array or object nested up to 3,000 levels deep (often near the limit of 512 and
near Python's recursion limit of 1,000)."""


def big_string_text(max_bytes: int) -> st.SearchStrategy[str]:
    """A JSON string of up to ``max_bytes`` of one repeated piece (plain, escape, or control)."""
    return st.tuples(
        st.integers(1, max_bytes),
        st.sampled_from(["x", "é", "\\u0001", "\\ud800", "\x01", "\\\\"]),
    ).map(lambda t: '"' + t[1] * max(1, t[0] // len(t[1].encode())) + '"')


def expanding_numbers_text(max_bytes: int) -> st.SearchStrategy[str]:
    """An array of ``1e15`` (Python writes it back as ``1000000000000000.0``, four times longer)."""
    return st.integers(1, max_bytes // 5).map(lambda n: "[" + ",".join(["1e15"] * n) + "]")


# -- whole bodies --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Body:
    """A generated body: the bytes, and the ``id`` it carries when it is an object."""

    data: bytes
    ident: str | None
    kind: str

    def __repr__(self) -> str:
        preview = self.data[:120]
        more = f"... ({len(self.data)} bytes)" if len(self.data) > 120 else ""
        return f"Body({self.kind}, {preview!r}{more})"


def hostile_bodies(ident: str, *, big_bytes: int = 64 * 1024) -> st.SearchStrategy[Body]:
    """A message body of one hostile class, its ``id`` member ``ident`` when it is an object.

    Objects start with ``{"id": ident`` so a test can find their persisted line;
    other bodies are found in the dead-letter topic by their SHA-256.
    """

    def with_id(kind: str, members: list[tuple[str, str]]) -> Body:
        text = _object([('"id"', f'"{ident}"'), *members])
        return Body(text.encode("utf-8", "surrogatepass"), ident, kind)

    def member(kind: str, value: st.SearchStrategy[str]) -> st.SearchStrategy[Body]:
        return st.tuples(_keys, value).map(lambda kv: with_id(kind, [kv]))

    return st.one_of(
        member("value", json_value_text),
        st.lists(st.tuples(_keys, json_value_text), max_size=6).map(
            lambda members: with_id("members", members)
        ),
        member("deep", deep_nesting_text),
        member("big string", big_string_text(big_bytes)),
        member("expanding numbers", expanding_numbers_text(big_bytes)),
        st.binary(max_size=64).map(lambda data: Body(data, None, "bytes")),
        json_value_text.map(lambda text: Body(text.encode("utf-8", "surrogatepass"), None, "any")),
    )


# -- OTLP span uploads ---------------------------------------------------------------


def otlp_span(
    *,
    trace_id: str,
    span_id: str,
    name: str,
    service: str,
    parent_id: str | None = None,
    start_ns: int = 1_700_000_000_000_000_000,
    duration_ns: int = 2_000_000,
    error: str | None = None,
    attributes: dict[str, str] | None = None,
    events: tuple[str, ...] = (),
) -> bytes:
    """An ``ExportTraceServiceRequest`` holding one span, serialised."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service))
    )
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id = bytes.fromhex(trace_id)
    span.span_id = bytes.fromhex(span_id)
    if parent_id:
        span.parent_span_id = bytes.fromhex(parent_id)
    span.name = name
    span.kind = Span.SPAN_KIND_CONSUMER
    span.start_time_unix_nano = start_ns
    span.end_time_unix_nano = start_ns + duration_ns
    for key, value in (attributes or {}).items():
        span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    for event in events:
        span.events.add(name=event, time_unix_nano=start_ns + duration_ns)
    if error is not None:
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = error
        span.events.add(name="exception", time_unix_nano=start_ns)
    return request.SerializeToString()


hex_ids = st.binary(min_size=16, max_size=16).filter(any).map(bytes.hex)


def otlp_bodies() -> st.SearchStrategy[bytes]:
    """Valid one-span uploads, truncated ones, and arbitrary bytes."""
    valid = st.builds(
        lambda t, s, n: otlp_span(trace_id=t, span_id=s[:16], name=n, service="fuzz"),
        hex_ids,
        hex_ids,
        st.sampled_from(("publish-message", "process-message", "persist-message", "x")),
    )
    truncated = st.tuples(valid, st.integers(min_value=1, max_value=40)).map(
        lambda pair: pair[0][: -pair[1]]
    )
    return st.one_of(valid, valid, truncated, st.binary(max_size=3000))


# -- config files (reload) ----------------------------------------------------------

LEVELS = ("debug", "info", "warning", "error")


def config_mappings() -> st.SearchStrategy[dict[str, Any]]:
    """Valid config files (as parsed YAML): the keys a reload compares, varied."""
    return st.fixed_dictionaries(
        {},
        optional={
            "logging": st.fixed_dictionaries(
                {}, optional={"level": st.sampled_from(LEVELS), "file": st.just(None)}
            ),
            "telemetry": st.fixed_dictionaries(
                {"exporter": st.just("none")},
                optional={
                    "sampler_ratio": st.floats(0, 1),
                    "schedule_delay_ms": st.integers(1, 5000),
                },
            ),
            "processor": st.fixed_dictionaries(
                {},
                optional={
                    "input_topic": st.sampled_from(["internal", "in", "a.b"]),
                    "output_topic": st.sampled_from(["external", "out"]),
                    "carrier": st.sampled_from(["header", "payload", "both"]),
                },
            ),
            "marker": st.fixed_dictionaries(
                {},
                optional={
                    "jaeger_ui_url": st.none() | st.sampled_from(["http://j:16686", "http://x"]),
                    "listen": st.sampled_from(["127.0.0.1:8080", "127.0.0.1:9090"]),
                },
            ),
        },
    )


def config_texts() -> st.SearchStrategy[str]:
    """Text an operator might leave in a config file: valid, broken or neither."""
    scalar = st.one_of(
        st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=8), st.floats(-1, 2)
    )
    yamlish = st.dictionaries(
        st.sampled_from(["logging", "telemetry", "processor", "nosuch", "marker"]),
        st.dictionaries(
            st.sampled_from(["level", "file", "sampler_ratio", "input_topic", "typo"]), scalar
        )
        | scalar,
        max_size=4,
    )
    import yaml  # noqa: PLC0415 - only the strategies that write files need it

    return st.one_of(
        yamlish.map(yaml.safe_dump),
        st.text(max_size=80),
        st.just("logging: {level: debug\n"),
    )


queue_ack_options = st.sampled_from(
    ["", "cancel", "expire", "cancel,expire", "bogus", "max_backlog=3"]
)
"""Options of a queue ack (``sow_delete``): the supported ones and some that are refused."""

queue_ack_noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
"""Garbage where a queue ack's bookmark goes."""


# -- devbroker: hostile framing, headers and filters ---------------------------------
#
# What a hostile AMPS client can send the devbroker: headers as JSON text (bad JSON, wrong
# types, huge values, escapes of lone surrogates, unknown commands), TCP streams of frames
# with lying lengths, truncations and garbage, WebSocket message sequences with wrong frame
# counts and text/binary mix-ups, and content filters from the grammar plus pathological
# regular expressions.

COMMANDS = (
    "logon", "p", "publish", "delta_publish", "subscribe", "delta_subscribe", "unsubscribe",
    "flush", "heartbeat", "sow", "sow_and_subscribe", "sow_delete", "start_timer", "ack",
    "logon ", "LOGON", "", "\\u0000", "\\ud800", "x" * 300,
)  # fmt: skip
"""Known command names, near misses and nonsense."""

HEADER_KEYS = (
    "c", "cmd", "cid", "cmd_id", "t", "topic", "s", "seq", "a", "ack_type", "sub_id",
    "sids", "filter", "bm", "bookmark", "client_name", "user_id", "pw", "o", "opts", "x",
    "mt", "version", "bs", "top_n", "e", "l", "status", "\\ud800", "",
)  # fmt: skip

PATHOLOGICAL_REGEXES = (
    "^(a+)+$", "(a|a)*b", "(.*a){25}", "(a*)*$", "^(([a-z])+.)+[A-Z]([a-z])+$", "(x+x+)+y",
    "a[ab]{200}c", "(a)\\1", "a(?=b)", "(?<!x)y", "a{1001}", "[", "(?i)(A+)+$", "\\Qa.b\\E",
)  # fmt: skip
"""Regexes that backtrack exponentially in PCRE, that RE2 refuses, or that do not compile."""

_header_value_text = st.one_of(
    json_string_text,
    json_number_text,
    st.sampled_from(["true", "false", "null", "[]", "{}", '[1,"a"]', '{"c":"p"}']),
    st.sampled_from(COMMANDS).map(lambda c: f'"{c}"'),
    big_string_text(100_000),
    st.sampled_from(PATHOLOGICAL_REGEXES).map(lambda r: "\"/s LIKE '" + r + "'\""),
)


def header_text() -> st.SearchStrategy[str]:
    """A client header as JSON text: mostly objects with AMPS keys and hostile values,
    sometimes not JSON or not an object at all."""
    keys = st.one_of(st.sampled_from(HEADER_KEYS).map(lambda k: f'"{k}"'), json_string_text)
    command = st.sampled_from(COMMANDS).map(lambda c: ('"c"', f'"{c}"'))
    members = st.lists(st.tuples(keys, _header_value_text), max_size=6)
    objects = st.tuples(command, members).map(lambda cm: _object([cm[0], *cm[1]]))
    return st.one_of(
        objects,
        objects,
        members.map(_object),
        json_value_text,
        st.text(max_size=40),
        objects.map(lambda text: text[: len(text) // 2]),  # truncated
    )


_hostile_names = st.one_of(
    json_string_text,
    st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"tab\\tname"', '""', "17", "null", "[]"]),
    big_string_text(3000),
)


def logon_headers() -> st.SearchStrategy[str]:
    """A logon whose fields are hostile: client names, users and passwords that are lone
    surrogates, control characters, huge, empty or not strings; odd message types."""
    fields = st.fixed_dictionaries(
        {"c": st.just('"logon"'), "cid": st.just('"L"'), "client_name": _hostile_names},
        optional={
            "a": st.sampled_from(['"processed"', '""', "1"]),
            "user_id": _hostile_names,
            "pw": _hostile_names,
            "mt": st.sampled_from(['"json"', '"fix"', '""', "0", '"\\ud800"']),
            "version": st.sampled_from(['"5.3.4.0"', '"x"', "5"]),
        },
    )
    return fields.map(lambda f: _object([(f'"{k}"', v) for k, v in f.items()]))


def publish_headers() -> st.SearchStrategy[str]:
    """A publish whose topic, correlation id, sequence or ack types are hostile."""
    fields = st.fixed_dictionaries(
        {"c": st.sampled_from(['"p"', '"publish"', '"delta_publish"']), "t": _hostile_names},
        optional={
            "cid": _hostile_names,
            "x": _hostile_names,
            "s": st.one_of(json_number_text, _hostile_names),
            "a": st.sampled_from(['"processed"', '"persisted"', '"processed,persisted"', '","']),
        },
    )
    return fields.map(lambda f: _object([(f'"{k}"', v) for k, v in f.items()]))


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def tcp_frames() -> st.SearchStrategy[bytes]:
    """One TCP frame, honest or lying: right length, length too large or too small, a huge
    length (up to 2**32 - 1), or raw garbage with no length at all."""
    payload = st.tuples(header_text().map(_encode), st.binary(max_size=64)).map(
        lambda hb: hb[0] + hb[1]
    )

    def framed(p: bytes, delta: int) -> bytes:
        return max(0, len(p) + delta).to_bytes(4, "big") + p

    return st.one_of(
        payload.map(lambda p: framed(p, 0)),
        payload.map(lambda p: framed(p, 0)),
        st.tuples(payload, st.integers(-8, 8)).map(lambda pd: framed(*pd)),
        st.tuples(st.integers(2**24, 2**32 - 1), st.binary(max_size=16)).map(
            lambda lb: lb[0].to_bytes(4, "big") + lb[1]
        ),
        st.binary(max_size=64),
    )


def tcp_streams() -> st.SearchStrategy[list[bytes]]:
    """What a hostile TCP client writes: frames, cut at arbitrary points into writes."""
    return st.tuples(st.lists(tcp_frames(), min_size=1, max_size=6), st.integers(1, 4)).map(
        lambda fc: _cut(b"".join(fc[0]), fc[1])
    )


def _cut(data: bytes, pieces: int) -> list[bytes]:
    step = max(1, len(data) // pieces)
    return [data[i : i + step] for i in range(0, len(data), step)] or [b""]


@dataclass(frozen=True, slots=True)
class WsMessage:
    """One WebSocket message a hostile JavaScript-protocol client sends."""

    data: str | bytes

    def __repr__(self) -> str:
        return f"WsMessage({self.data[:60]!r}{'...' if len(self.data) > 60 else ''})"


def ws_sequences() -> st.SearchStrategy[list[WsMessage]]:
    """A WebSocket session: a preamble (right or wrong), then frame counts (right, zero,
    huge, not 4 bytes), headers as text or binary, bodies split over frames, garbage."""
    count = st.one_of(
        st.integers(0, 5000).map(lambda n: n.to_bytes(4, "little")),
        st.binary(max_size=8),
    )
    header = header_text()

    def command(parts: tuple[str, list[bytes], bool]) -> list[WsMessage]:
        head, bodies, as_binary = parts
        frames: list[str | bytes] = [_encode(head) if as_binary else head, *bodies]
        return [WsMessage(len(frames).to_bytes(4, "little"))] + [WsMessage(f) for f in frames]

    item = st.one_of(
        count.map(lambda c: [WsMessage(c)]),
        header.map(lambda h: [WsMessage(h)]),
        st.binary(max_size=256).map(lambda b: [WsMessage(b)]),
        st.text(max_size=40).map(lambda t: [WsMessage(t)]),
        # A well-formed command (its header as text or binary), the body over several frames.
        st.tuples(header, st.lists(st.binary(max_size=64), max_size=5), st.booleans()).map(command),
    )
    preamble = st.sampled_from(["text", "binary", "json", ""]).map(WsMessage)
    return st.tuples(preamble, st.lists(item, max_size=6)).map(
        lambda pi: [pi[0], *(m for group in pi[1] for m in group)]
    )


_paths = st.lists(
    st.sampled_from(["a", "b", "s", "n", "@x", "$y", "a1"]), min_size=1, max_size=4
).map(lambda segs: "/" + "/".join(segs))
_literals = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=8).map(lambda t: "'" + t.replace("'", "''") + "'"),
    st.sampled_from(["TRUE", "FALSE", "NULL", "''", "'\\ud800'"]),
)
_operands = st.one_of(_paths, _literals)
_predicates = st.one_of(
    st.tuples(
        _operands, st.sampled_from(["=", "==", "!=", "<>", "<", ">", "<=", ">="]), _operands
    ).map(" ".join),
    st.tuples(
        _paths, st.sampled_from(["IN", "NOT IN"]), st.lists(_operands, min_size=1, max_size=5)
    ).map(lambda t: f"{t[0]} {t[1]} ({', '.join(t[2])})"),
    st.tuples(_paths, _operands, _operands).map(lambda t: f"{t[0]} BETWEEN {t[1]} AND {t[2]}"),
    st.tuples(_paths, st.sampled_from((*PATHOLOGICAL_REGEXES, "^a", "b$", ".", "(?i)X"))).map(
        lambda t: f"{t[0]} LIKE '{t[1]}'"
    ),
    st.tuples(_paths, st.sampled_from(["IS NULL", "IS NOT NULL"])).map(" ".join),
)
filter_expressions = st.recursive(
    _predicates,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["AND", "OR"]), inner).map(" ".join),
        inner.map(lambda e: f"NOT {e}"),
        inner.map(lambda e: f"({e})"),
    ),
    max_leaves=8,
)
"""Filters from the grammar in ``ampsflow.devbroker.filters``, with pathological regexes."""


def hostile_filters() -> st.SearchStrategy[str]:
    """Grammar filters, filters nested deeper than any limit, huge IN lists, and noise."""
    return st.one_of(
        filter_expressions,
        filter_expressions,
        st.tuples(st.integers(1, 200), st.sampled_from(["(", "NOT ", "NOT ("])).map(
            lambda t: t[1] * t[0] + "/a = 1" + (")" * t[0] if "(" in t[1] else "")
        ),
        st.integers(900, 1100).map(lambda n: "/a IN (" + ",".join(["1"] * n) + ")"),
        st.text(max_size=40),
    )


def filter_bodies() -> st.SearchStrategy[bytes]:
    """Bodies for filters to be evaluated on: generated JSON, deep nesting, long runs of
    the characters pathological regexes feed on."""
    return st.one_of(
        json_value_text.map(_encode),
        deep_nesting_text.map(lambda t: _encode('{"a":' + t + "}")),
        st.integers(1, 50_000).map(lambda n: b'{"s":"' + b"a" * n + b'b"}'),
        st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )
