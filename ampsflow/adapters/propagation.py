"""Trace context across AMPS: the CorrelationId <-> an OpenTelemetry context.

The CorrelationId format itself is :mod:`ampsflow.core.codec`; this module
turns it into the parent context of a span (:func:`extract_context`, header
preferred, payload as fallback) and a span into the CorrelationId of the next
hop (:func:`correlation_id_of`).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

from ampsflow.core.codec import TraceParent, decode_correlation_id, encode_span_ids
from ampsflow.errors import CorrelationIdError

PROBLEM_ATTRIBUTE = "ampsflow.correlation_id.problem"
"""Span attribute naming why a message's CorrelationId could not be used."""


def context_of(tp: TraceParent) -> Context:
    """An OpenTelemetry context whose current span is the remote span ``tp``."""
    span_context = SpanContext(
        trace_id=tp.trace_id,
        span_id=tp.span_id,
        is_remote=True,
        trace_flags=TraceFlags(tp.flags),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), Context())


def extract_context(header_cid: str | None, payload_cid: str | None) -> tuple[Context, str | None]:
    """The parent context carried by a message, and why it could not be used.

    The header CorrelationId is preferred; the payload's ``CorrelationId`` field
    is the fallback (AMPS views drop the header). Never raises.

    Returns:
        ``(context, problem)``. ``problem`` is ``None`` when a valid context was
        found (in the header, or in the payload when the header is absent);
        otherwise a short code for the ``ampsflow.correlation_id.problem`` span
        attribute: ``missing`` when neither carries one, ``header:<reason>``
        when the header is invalid (the payload may still have given the
        context), ``payload:<reason>`` when only an invalid payload value
        exists. ``reason`` is a :class:`~ampsflow.errors.CorrelationIdError`
        reason. With no valid value the context is empty: the span becomes a
        new root.
    """
    problem: str | None = None
    for source, value in (("header", header_cid), ("payload", payload_cid)):
        if value is None or value == "":
            continue
        try:
            tp = decode_correlation_id(value)
        except CorrelationIdError as exc:
            if problem is None:
                problem = f"{source}:{exc.reason}"
            continue
        return context_of(tp), problem
    return Context(), problem or "missing"


def correlation_id_of(span: Span) -> str:
    """The CorrelationId that makes ``span`` the parent of the next hop.

    Raises:
        CorrelationIdError: ``span`` has no valid context (no span the services start).
    """
    ctx = span.get_span_context()
    if not ctx.is_valid:
        raise CorrelationIdError("out_of_range", "the span has no valid trace and span id")
    return encode_span_ids(ctx.trace_id, ctx.span_id, ctx.trace_flags)
