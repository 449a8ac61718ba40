"""OTLP/HTTP protobuf trace export that writes the wire bytes directly.

The SDK's ``OTLPSpanExporter`` builds an ``opentelemetry-proto`` message object
for every span, attribute and value, then serialises it: about 55 µs of
Python per span of the daemons' shape, and long stretches without releasing
the GIL. :class:`SpanEncoder` writes the same ``ExportTraceServiceRequest``
bytes straight from the SDK's ``ReadableSpan`` objects, with the encodings
that never change (resource, scope, and recurring ``key=value`` attributes)
cached.

The output is the official encoder's, field for field (``tests/unit/
test_otlp_wire.py`` decodes both with ``opentelemetry-proto`` over generated
span shapes and compares them), including its choices:

- spans are grouped by resource, then by instrumentation scope, in the order
  they first appear;
- ``flags`` carries only the ``HAS_IS_REMOTE``/``IS_REMOTE`` bits of the
  parent (or link) context;
- a link's ``trace_state`` is not sent;
- an attribute whose value cannot be encoded (an ``int`` outside int64, an
  unsupported type) is left out with a warning; the rest of the span is sent.

:class:`OtlpHttpSpanExporter` is the SDK's exporter with only the encoding
replaced: endpoint, ``OTEL_EXPORTER_OTLP_*`` variables, headers, TLS,
compression, timeout, retries with backoff and ``max_request_size`` all stay
the SDK's. Its encoding runs in slices of :data:`SLICE_SPANS` spans and gives
the GIL away between slices, so the daemon's message loop never waits on the
export thread for more than a slice (about 0.3 ms).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.http._common import RequestPayloadTooLargeError
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import Link, SpanContext, SpanKind

from ampsflow.adapters.lean_spans import LeanSpan, LightSpan

logger = logging.getLogger(__name__)

SLICE_SPANS = 16
"""Spans encoded between two GIL hand-offs (about 10 µs each)."""

_CACHE_LIMIT = 4096
"""Cached ``key=value`` encodings kept before the cache starts afresh."""

_UNIQUE_AFTER_MISSES = 256
"""Cache misses after which a key's values count as unique and are not cached."""

_GROUP_CACHE_LIMIT = 64
"""Resources and scopes whose encodings are kept (a daemon has one of each)."""

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1

_BYTE = [bytes((i,)) for i in range(256)]
_pack_fixed64 = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack
_pack_fixed32 = struct.Struct("<I").pack

# Span.flags: the parent's (or link's) context says whether it is remote.
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_FLAGS_LOCAL = _pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_FLAGS_REMOTE = _pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)


def _varint(value: int) -> bytes:
    """The protobuf base-128 varint of a non-negative ``value``."""
    if value < 0x80:
        return _BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


def _text(tag: bytes, value: str) -> bytes:
    return _field(tag, value.encode("utf-8"))


# -- common.v1.AnyValue / KeyValue ---------------------------------------------


def _any_value(value: Any) -> bytes:
    """The encoded ``AnyValue`` of an attribute value (the SDK's type rules)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            msg = f"integer {value} is outside int64"
            raise ValueError(msg)
        return b"\x18" + _varint(value & _UINT64_MASK)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        pairs = b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()])
        return _field(b"\x32", pairs)
    msg = f"Invalid type {type(value)} of value {value}"
    raise TypeError(msg)


def _key_value(key: str, value: Any) -> bytes:
    value_field = _field(b"\x12", _any_value(value))
    return _text(b"\x0a", key) + value_field if key else value_field


_CACHEABLE = (str, int, bool)
"""Value types whose equal values encode alike (not float: ``-0.0 == 0.0``)."""


class SpanEncoder:
    """Encodes SDK spans into an ``ExportTraceServiceRequest``, as bytes.

    Keeps caches: the encodings of each resource and scope seen, and of
    recurring attributes. One encoder per export thread (not thread-safe).
    """

    def __init__(self) -> None:
        self._kv_cache: dict[tuple[bytes, str, type, object], bytes] = {}
        self._key_misses: dict[str, int] = {}
        self._unique_keys: set[str] = set()
        self._key_heads: dict[str, bytes] = {}  # encoded key of each unique key
        self._resources: dict[int, tuple[Resource, Resource, bytes, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, object, bytes, bytes]] = {}
        self._canonical_resources: dict[Resource, Resource] = {}
        self._canonical_scopes: dict[InstrumentationScope, InstrumentationScope] = {}

    # -- public ----------------------------------------------------------------

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialised request for ``spans``, in one go."""
        return self.encode_sliced(spans, len(spans) or 1, None)

    def encode_sliced(
        self,
        spans: Sequence[ReadableSpan],
        slice_spans: int,
        between: Callable[[], None] | None,
    ) -> bytes:
        """The serialised request, calling ``between`` after every ``slice_spans`` spans."""
        if len(self._resources) > _GROUP_CACHE_LIMIT or len(self._scopes) > _GROUP_CACHE_LIMIT:
            self._resources.clear()
            self._canonical_resources.clear()
            self._scopes.clear()
            self._canonical_scopes.clear()
        # resource key -> scope key -> encoded spans; dicts keep first-seen order.
        groups: dict[int, dict[int, list[bytes]]] = {}
        resource_parts: dict[int, tuple[bytes, bytes]] = {}
        scope_parts: dict[int, tuple[bytes, bytes]] = {}
        encode_span = self._span
        for done, span in enumerate(spans, 1):
            canonical_resource, resource_head, resource_tail = self._resource(span.resource)
            rkey = id(canonical_resource)
            resource_parts[rkey] = (resource_head, resource_tail)
            canonical_scope, scope_head, scope_tail = self._scope(span.instrumentation_scope)
            skey = id(canonical_scope)
            scope_parts[skey] = (scope_head, scope_tail)
            by_scope = groups.get(rkey)
            if by_scope is None:
                by_scope = groups[rkey] = {}
            encoded = by_scope.get(skey)
            if encoded is None:
                encoded = by_scope[skey] = []
            encoded.append(_field(b"\x12", encode_span(span)))
            if between is not None and done % slice_spans == 0:
                between()
        out: list[bytes] = []
        for rkey, by_scope in groups.items():
            head, tail = resource_parts[rkey]
            scope_spans = [
                _field(
                    b"\x12",
                    scope_parts[skey][0] + b"".join(encoded) + scope_parts[skey][1],
                )
                for skey, encoded in by_scope.items()
            ]
            out.append(_field(b"\x0a", head + b"".join(scope_spans) + tail))
        return b"".join(out)

    # -- resource and scope ----------------------------------------------------

    def _resource(self, resource: Resource) -> tuple[Resource, bytes, bytes]:
        """Canonical resource (equal resources group together) and its encodings."""
        entry = self._resources.get(id(resource))
        if entry is None or entry[0] is not resource:
            canonical = self._canonical_resources.setdefault(resource, resource)
            head = _field(b"\x0a", self._attributes(b"\x0a", resource.attributes))
            tail = _text(b"\x1a", resource.schema_url) if resource.schema_url else b""
            entry = (resource, canonical, head, tail)
            self._resources[id(resource)] = entry
        return entry[1], entry[2], entry[3]

    def _scope(self, scope: InstrumentationScope | None) -> tuple[object, bytes, bytes]:
        entry = self._scopes.get(id(scope))
        if entry is None or entry[0] is not scope:
            canonical: object
            if scope is None:
                canonical = None
                head = b"\x0a\x00"
                tail = b""
            else:
                canonical = self._canonical_scopes.setdefault(scope, scope)
                body = b""
                if scope.name:
                    body += _text(b"\x0a", scope.name)
                if scope.version:
                    body += _text(b"\x12", scope.version)
                body += self._attributes(b"\x1a", scope.attributes)
                head = _field(b"\x0a", body)
                tail = _text(b"\x1a", scope.schema_url) if scope.schema_url else b""
            entry = (scope, canonical, head, tail)
            self._scopes[id(scope)] = entry
        return entry[1], entry[2], entry[3]

    # -- attributes ------------------------------------------------------------

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        """Every ``KeyValue`` of ``attributes`` as repeated field ``tag``."""
        if not attributes:
            return b""
        cache = self._kv_cache
        unique = self._unique_keys
        parts: list[bytes] = []
        # BoundedAttributes iterates through the Mapping ABC, a call per key;
        # its inner dict holds the same items in the same order.
        plain = attributes._dict if type(attributes) is BoundedAttributes else attributes
        for key, value in plain.items():
            kind = type(value)
            if key in unique:
                # Values that rarely repeat (ids, bookmarks, sizes): the key's
                # encoding is kept, the value is encoded here (str and int inline).
                head = self._key_heads.get(key)
                if head is not None:
                    if type(value) is str and len(value) < 0x80 and value.isascii():
                        any_value = b"\x0a" + _BYTE[len(value)] + value.encode("ascii")
                        parts.append(_field(tag, head + _field(b"\x12", any_value)))
                        continue
                    if type(value) is int and 0 <= value <= _INT64_MAX:
                        any_value = b"\x18" + _varint(value)  # at most 11 bytes
                        parts.append(
                            _field(tag, head + b"\x12" + _BYTE[len(any_value)] + any_value)
                        )
                        continue
            elif kind in _CACHEABLE:
                cache_key = (tag, key, kind, value)
                encoded = cache.get(cache_key)
                if encoded is not None:
                    parts.append(encoded)
                    continue
            try:
                encoded = _field(tag, _key_value(key, value))
            except (ValueError, TypeError, UnicodeError) as exc:
                logger.warning("Failed to encode key %s: %s", key, exc)
                continue
            if kind in _CACHEABLE and key not in unique:
                self._cache_miss(key, (tag, key, kind, value), encoded)
            parts.append(encoded)
        return b"".join(parts)

    def _cache_miss(
        self, key: str, cache_key: tuple[bytes, str, type, object], encoded: bytes
    ) -> None:
        """Remember ``encoded``, unless ``key``'s values rarely repeat (ids, bookmarks).

        A key that missed :data:`_UNIQUE_AFTER_MISSES` times is not cached any
        more: its values would only push the recurring ones out.
        """
        misses = self._key_misses.get(key, 0) + 1
        if misses >= _UNIQUE_AFTER_MISSES:
            self._unique_keys.add(key)
            if key:
                self._key_heads[key] = _text(b"\x0a", key)
            return
        self._key_misses[key] = misses
        cache = self._kv_cache
        if len(cache) >= _CACHE_LIMIT or len(self._key_misses) >= _CACHE_LIMIT:
            cache.clear()
            self._key_misses.clear()
            self._unique_keys.clear()
            self._key_heads.clear()
        cache[cache_key] = encoded

    # -- trace.v1.Span -----------------------------------------------------------

    def _span(self, span: ReadableSpan) -> bytes:
        if type(span) in _SDK_SPAN_TYPES:
            # The SDK's own classes: read the fields their properties copy or wrap.
            ctx = span._context
            parent = span._parent
            name = span._name
            kind = span._kind
            start_time = span._start_time
            end_time = span._end_time
            attributes: Any = span._attributes
            events: Sequence[Event] = span._events
            links: Sequence[Link] = span._links
            dropped_attributes = attributes.dropped if type(attributes) is BoundedAttributes else 0
            dropped_events = events.dropped if type(events) is BoundedList else 0
            dropped_links = links.dropped if type(links) is BoundedList else 0
        else:
            ctx = span.context
            parent = span.parent
            name = span.name
            kind = span.kind
            start_time = span.start_time
            end_time = span.end_time
            attributes = getattr(span, "_attributes", None)
            if attributes is None:
                attributes = span.attributes
            events = span.events
            links = span.links
            dropped_attributes = span.dropped_attributes
            dropped_events = span.dropped_events
            dropped_links = span.dropped_links
        assert ctx is not None
        parts = [
            b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
        ]
        trace_state = ctx.trace_state
        if trace_state:
            parts.append(_text(b"\x1a", ",".join([f"{k}={v}" for k, v in trace_state.items()])))
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        if name:
            parts.append(_text(b"\x2a", name))
        parts.append(_KINDS[kind])
        if start_time:
            parts.append(b"\x39" + _pack_fixed64(start_time))
        if end_time:
            parts.append(b"\x41" + _pack_fixed64(end_time))
        parts.append(self._attributes(b"\x4a", attributes))
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        if events:
            parts.extend([_field(b"\x5a", self._event(event)) for event in events])
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        if links:
            parts.extend([_field(b"\x6a", self._link(link)) for link in links])
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))
        status = span.status
        if status is not None:
            body = _text(b"\x12", status.description) if status.description else b""
            code = status.status_code.value
            if code:
                body += b"\x18" + _BYTE[code]
            parts.append(_field(b"\x7a", body))
        parts.append(b"\x85\x01" + (_FLAGS_REMOTE if parent and parent.is_remote else _FLAGS_LOCAL))
        return b"".join(parts)

    def _event(self, event: Event) -> bytes:
        body = b"\x09" + _pack_fixed64(event.timestamp) if event.timestamp else b""
        if event.name:
            body += _text(b"\x12", event.name)
        body += self._attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        return body

    def _link(self, link: Link) -> bytes:
        ctx: SpanContext = link.context
        body = b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big")
        body += b"\x12\x08" + ctx.span_id.to_bytes(8, "big")
        body += self._attributes(b"\x22", link.attributes)
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        return body + b"\x35" + (_FLAGS_REMOTE if ctx.is_remote else _FLAGS_LOCAL)


_SDK_SPAN_TYPES = frozenset({ReadableSpan, SdkSpan, LeanSpan, LightSpan})
"""Span classes whose fields :meth:`SpanEncoder._span` reads directly."""

_KINDS = {kind: _BYTE[0x30] + _BYTE[kind.value + 1] for kind in SpanKind}
"""Span.kind's field for each kind (OTLP's enum is the API's, plus one)."""


def _yield_gil() -> None:
    """Let a thread waiting for the GIL (the message loop) run now."""
    time.sleep(0)


class OtlpHttpSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP protobuf span exporter with :class:`SpanEncoder` bytes.

    Takes the SDK exporter's arguments and environment variables; sends
    through its HTTP client (headers, compression, timeout, retry with
    backoff). Encoding gives the GIL away every :data:`SLICE_SPANS` spans.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The SDK exporter's HTTP client, size limit and metrics are reused as
        # they are in opentelemetry-exporter-otlp-proto-http 1.4x; another
        # layout falls back to the SDK's own export (and encoder), not a crash.
        self._encoder: SpanEncoder | None = SpanEncoder()
        needed = ("_client", "_max_request_size", "_metrics", "_shutdown")
        if not all(hasattr(self, name) for name in needed) or not callable(
            getattr(getattr(self, "_client", None), "export", None)
        ):
            logger.warning(
                "this opentelemetry-exporter-otlp-proto-http is not the one ampsflow's wire "
                "encoder was built on; spans are encoded by the SDK instead (slower)"
            )
            self._encoder = None

    @property
    def encodes_light_spans(self) -> bool:
        """Whether this exporter encodes spans itself, so it can take a ``LightSpan``."""
        return self._encoder is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._encoder is None:
            return super().export(spans)
        if self._shutdown:
            logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as outcome:
            try:
                data = self._encoder.encode_sliced(spans, SLICE_SPANS, _yield_gil)
            except Exception as exc:
                logger.exception("Failed to encode span batch")
                outcome.error = exc
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(data):
                logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size "
                    "%d bytes.",
                    len(data),
                    self._max_request_size,
                )
                outcome.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(data)} bytes exceeds "
                    f"max_request_size {self._max_request_size} bytes."
                )
                return SpanExportResult.FAILURE
            result = self._client.export(data)
            if not result.success:
                outcome.error = result.error
                outcome.error_attrs = (
                    {HTTP_RESPONSE_STATUS_CODE: result.status_code}
                    if result.status_code is not None
                    else None
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
