"""The CorrelationId codec: W3C trace context <-> the AMPS CorrelationId header.

AMPS allows only base64-alphabet characters in a CorrelationId, and a W3C
``traceparent`` contains dashes, so ampsflow carries the traceparent with the
dashes removed: ``version(2) trace-id(32) span-id(16) flags(2)``, 52 lowercase
hex characters. Decoding also accepts upper case and the dashed 55-character
``traceparent`` form. Pure: no I/O, no OpenTelemetry SDK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ampsflow.errors import CorrelationIdError

CORRELATION_ID_LENGTH = 52
"""Length of an encoded CorrelationId."""

TRACEPARENT_LENGTH = 55
"""Length of a dashed W3C ``traceparent``."""

_HEX = re.compile(r"[0-9a-f]*")
_TRACE_ID_MAX = (1 << 128) - 1
_SPAN_ID_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A decoded W3C trace context: version, trace id, span id and trace flags."""

    version: int
    trace_id: int
    span_id: int
    flags: int

    def __post_init__(self) -> None:
        if not 0 <= self.version <= 0xFE:
            raise CorrelationIdError("out_of_range", f"version must be 0..0xfe, got {self.version}")
        if not 0 < self.trace_id <= _TRACE_ID_MAX:
            raise CorrelationIdError("out_of_range", "trace id must be a non-zero 128-bit integer")
        if not 0 < self.span_id <= _SPAN_ID_MAX:
            raise CorrelationIdError("out_of_range", "span id must be a non-zero 64-bit integer")
        if not 0 <= self.flags <= 0xFF:
            raise CorrelationIdError("out_of_range", f"flags must be 0..0xff, got {self.flags}")

    @property
    def sampled(self) -> bool:
        """Whether the sampled flag (bit 0) is set."""
        return bool(self.flags & 0x01)

    def traceparent(self) -> str:
        """The dashed W3C ``traceparent`` header value."""
        return f"{self.version:02x}-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


def encode_correlation_id(tp: TraceParent) -> str:
    """Encode a trace context as a 52-character lowercase hex CorrelationId."""
    return f"{tp.version:02x}{tp.trace_id:032x}{tp.span_id:016x}{tp.flags:02x}"


def encode_span_ids(trace_id: int, span_id: int, flags: int) -> str:
    """The version-00 CorrelationId of ids already known to be valid (a live span's).

    :func:`encode_correlation_id` of the same :class:`TraceParent`, without building and
    checking one: half the cost, once per processed message.
    """
    return f"00{trace_id:032x}{span_id:016x}{flags:02x}"


def decode_correlation_id(value: str) -> TraceParent:
    """Decode a CorrelationId (52 hex, any case) or a dashed ``traceparent``.

    Raises:
        CorrelationIdError: ``reason`` says why: ``empty``, ``wrong_length``,
            ``bad_separator``, ``not_hex``, ``version_ff``, ``zero_trace_id``,
            ``zero_span_id`` or ``not_a_string``.
    """
    if not isinstance(value, str):
        raise CorrelationIdError("not_a_string", f"got {type(value).__name__}")
    if not value:
        raise CorrelationIdError("empty", "no value")
    if len(value) == TRACEPARENT_LENGTH:
        parts = value.split("-")
        if len(parts) != 4 or [len(p) for p in parts] != [2, 32, 16, 2]:
            raise CorrelationIdError(
                "bad_separator", "dashed form must be VV-TRACEID(32)-SPANID(16)-FF"
            )
        compact = "".join(parts)
    elif len(value) == CORRELATION_ID_LENGTH:
        compact = value
    else:
        raise CorrelationIdError(
            "wrong_length",
            f"got {len(value)} characters (expected {CORRELATION_ID_LENGTH}, "
            f"or {TRACEPARENT_LENGTH} with dashes)",
        )
    compact = compact.lower()
    if _HEX.fullmatch(compact) is None:
        raise CorrelationIdError("not_hex", "only 0-9 a-f A-F are allowed")
    version = int(compact[0:2], 16)
    trace_id = int(compact[2:34], 16)
    span_id = int(compact[34:50], 16)
    flags = int(compact[50:52], 16)
    if version == 0xFF:
        raise CorrelationIdError("version_ff", "version ff is forbidden by W3C trace context")
    if trace_id == 0:
        raise CorrelationIdError("zero_trace_id", "the trace id is all zeros")
    if span_id == 0:
        raise CorrelationIdError("zero_span_id", "the span id is all zeros")
    return TraceParent(version=version, trace_id=trace_id, span_id=span_id, flags=flags)
