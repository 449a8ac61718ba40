"""Reading OTLP/HTTP protobuf span uploads for the journey index.

:func:`decompress` undoes ``Content-Encoding: gzip`` with a cap on the
decompressed size (a gzip bomb stops at the cap instead of filling memory).
:func:`span_records` decodes an ``ExportTraceServiceRequest`` with the
official ``opentelemetry-proto`` classes into
:class:`~ampsflow.core.journeys.SpanRecord` values. Either the whole request
decodes, or :class:`~ampsflow.errors.OtlpBodyError` is raised and nothing of
it is used.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ampsflow.core.journeys import MAX_ATTRIBUTES, AttributeValue, SpanRecord, clip
from ampsflow.errors import OtlpBodyError

KEPT_ATTRIBUTE_PREFIXES = ("messaging.", "ampsflow.", "error.", "exception.", "server.")
"""Span attributes the index keeps (the rest still reach the upstream)."""

_KINDS = {
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUS = {Status.STATUS_CODE_OK: "OK", Status.STATUS_CODE_ERROR: "ERROR"}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from ``encoding`` (``identity`` or ``gzip``).

    Raises:
        OtlpBodyError: ``too_large`` when the result would exceed ``limit``
            bytes, ``bad_gzip`` when the body is not one complete gzip stream.
    """
    if encoding == "identity":
        if len(body) > limit:
            raise OtlpBodyError("too_large", f"over {limit} bytes")
        return body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OtlpBodyError("bad_gzip", str(exc)) from exc
    if len(data) > limit:
        raise OtlpBodyError("too_large", f"decompresses to over {limit} bytes")
    if not inflater.eof:
        raise OtlpBodyError("bad_gzip", "the gzip stream is truncated")
    return data


def _value(value: AnyValue) -> AttributeValue:
    which = value.WhichOneof("value")
    if which == "string_value":
        return clip(value.string_value)
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        return value.double_value
    if which == "bytes_value":
        return value.bytes_value.hex()[:64]
    if which == "array_value":
        return clip(", ".join(str(_value(v)) for v in value.array_value.values[:20]))
    return ""


def _attributes(items: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for item in items:
        if len(out) >= MAX_ATTRIBUTES:
            break
        if item.key.startswith(KEPT_ATTRIBUTE_PREFIXES):
            out[clip(item.key, 128)] = _value(item.value)
    return out


def _hex(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or not any(raw):
        raise OtlpBodyError("malformed", f"a span has an invalid {what} ({len(raw)} bytes)")
    return raw.hex()


def span_records(data: bytes) -> list[SpanRecord]:
    """Every span of an ``ExportTraceServiceRequest``.

    Raises:
        OtlpBodyError: ``malformed`` when the bytes are not a valid request,
            or a span has no valid trace or span id.
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise OtlpBodyError("malformed", f"not an OTLP ExportTraceServiceRequest: {exc}") from exc
    records: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        service = "unknown_service"
        for item in resource_spans.resource.attributes:
            if item.key == "service.name":
                service = clip(str(_value(item.value)), 128)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = _attributes(span.attributes)
                error_message = None
                events: list[str] = []
                for event in span.events[:20]:
                    events.append(clip(event.name, 64))
                    if event.name == "exception" and error_message is None:
                        for item in event.attributes:
                            if item.key == "exception.message":
                                error_message = clip(str(_value(item.value)))
                error_type = attributes.get("error.type")
                records.append(
                    SpanRecord(
                        trace_id=_hex(span.trace_id, 16, "trace id"),
                        span_id=_hex(span.span_id, 8, "span id"),
                        parent_id=span.parent_span_id.hex() if span.parent_span_id else None,
                        service=service,
                        name=clip(span.name, 128),
                        kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        status=_STATUS.get(span.status.code, "UNSET"),  # type: ignore[arg-type]
                        status_message=clip(span.status.message),
                        error_type=str(error_type) if error_type is not None else None,
                        error_message=error_message,
                        attributes=attributes,
                        events=tuple(events),
                    )
                )
    return records
