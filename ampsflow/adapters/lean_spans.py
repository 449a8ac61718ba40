"""The SDK's spans, started and ended with less of the SDK's per-span work.

The daemons start one span per message. Through the SDK's tracer, one span's
life on the message loop (start, made current, CorrelationId, one attribute,
end) costs 21.8 µs of Python on the 2-core VM, and 16.2 µs through this one
(``benchmarks/span_lifecycle.py``, BENCHMARKS.md). The difference is work a
daemon's span does not need: every attribute value checked again (recursively,
through the ``Sequence`` ABC) and a copy of the whole span made at ``end`` for
the processors.

:class:`LeanTracer` wraps the SDK tracer of a provider. For a span with no
links, under limits with no value-length limit, it does what
``Tracer.start_span`` does (the same parent rule, sampler call, id generation,
trace flags and ``on_start``) and returns a :class:`LeanSpan`. When the
attributes the sampler returns are all plain ``str``/``int``/``float``/``bool``
values under non-empty keys, within the attribute-count limit, they go straight
into the span's store; any others are cleaned by the SDK's own attribute store,
as the SDK tracer would. Anything else (links, ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``
set, a disabled tracer, the SDK's own span metrics switched on) starts through
the SDK tracer itself.

:class:`LeanSpan` *is* an SDK ``Span``: every method after the start is the
SDK's, so status, events, exceptions, limits and the "ended span" warnings
behave as they do there. Two things differ:

- plain attributes are put straight into the span's attribute store, since the
  tracer checked they need no cleaning;
- ``end`` hands the span itself to the processors instead of a
  ``ReadableSpan`` copy. An ended span accepts no more changes (the SDK's own
  checks refuse them), so the processors see exactly what the copy would hold;
- the event and link lists are made at the first event or link (most spans
  have no link, and many no event).

``tests/unit/test_lean_spans.py`` drives the SDK tracer and this one with the
same generated operations and compares the exported spans byte for byte (official encoder).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from time import time_ns
from typing import Any, cast

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    use_span,
)
from opentelemetry.util._decorator import _agnosticcontextmanager
from opentelemetry.util.types import Attributes

_PLAIN_TYPES = frozenset({str, int, float, bool})
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_NOT_SAMPLED_RANDOM = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)


def _plain(attributes: Mapping[str, Any]) -> bool:
    """Whether every item is a non-empty ``str`` key with a plain scalar value."""
    for key, value in attributes.items():
        if type(value) not in _PLAIN_TYPES or type(key) is not str or not key:
            return False
    return True


_NONE_YET: BoundedList[Any] = BoundedList(0)
"""The events and links of every span that has none yet (holds nothing, is never added to)."""


def _no_end_metrics() -> None:
    """What a span records at its end while the SDK's own span metrics are off."""


class LeanSpan(SdkSpan):
    """An SDK span built without re-checking its attributes; ends without a copy.

    Only :class:`LeanTracer` creates these.
    """

    def __init__(
        self,
        tracer: SdkTracer,
        name: str,
        *,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: BoundedAttributes,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        # Every field SdkSpan.__init__ sets (test_lean_spans checks the names).
        limits = tracer._span_limits
        self._name = name
        self._context = context
        self._kind = kind
        self._instrumentation_info = tracer.instrumentation_info
        self._instrumentation_scope = tracer._instrumentation_scope
        self._parent = parent
        self._start_time = None
        self._end_time = None
        self._attributes = attributes
        self._events = _NONE_YET  # a list of its own at the first event (_add_event)
        self._links = _NONE_YET  # and at the first link (_add_link)
        self._resource = tracer.resource
        self._status = _UNSET
        self._sampler = tracer.sampler
        self._trace_config = None
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._span_processor = tracer.span_processor
        self._limits = limits
        self._lock = threading.Lock()
        self._record_end_metrics = _no_end_metrics  # the SDK's span metrics are off

    def _add_event(self, event: Any) -> None:
        with self._lock:
            if self._events is _NONE_YET:
                self._events = BoundedList(self._limits.max_events)
        super()._add_event(event)

    def _add_link(self, link: Link) -> None:
        with self._lock:
            if self._links is _NONE_YET:
                self._links = BoundedList(self._limits.max_links)
        super()._add_link(link)

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the processors (itself: it is frozen now)."""
        with self._lock:
            ended = self._end_time is not None
            if self._start_time is not None and not ended:
                self._end_time = end_time if end_time is not None else time_ns()
                cast(BoundedAttributes, self._attributes)._immutable = True
        if ended or self._start_time is None:
            super().end(end_time)  # the SDK's error or warning
            return
        processor = self._span_processor
        processor._on_ending(self)
        processor.on_end(self)


class LeanTracer(trace_api.Tracer):
    """``tracer`` (an SDK tracer), starting its common spans as :class:`LeanSpan`."""

    def __init__(self, tracer: SdkTracer) -> None:
        self._sdk = tracer
        limits = tracer._span_limits
        self._max_attributes = limits.max_span_attributes
        self._lean = limits.max_span_attribute_length is None and isinstance(
            tracer._tracer_metrics, NoOpTracerMetrics
        )

    def start_span(  # noqa: PLR0917 - the Tracer.start_span signature
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        sdk = self._sdk
        if links or not self._lean or not sdk._is_enabled():
            return sdk.start_span(
                name,
                context,
                kind,
                attributes,
                links,
                start_time,
                record_exception,
                set_status_on_exception,
            )
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        generator = sdk.id_generator
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = generator.generate_trace_id()
            random_trace_id = generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        result = sdk.sampler.should_sample(context, trace_id, name, kind, attributes, ())
        sampled = result.decision is Decision.RECORD_AND_SAMPLE
        if random_trace_id:
            flags = _SAMPLED_RANDOM if sampled else _NOT_SAMPLED_RANDOM
        else:
            flags = _SAMPLED if sampled else _NOT_SAMPLED
        span_context = SpanContext(
            trace_id,
            generator.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=result.trace_state,
        )
        if result.decision is Decision.DROP:
            return NonRecordingSpan(span_context)
        given = result.attributes
        if (self._max_attributes is None or len(given) <= self._max_attributes) and _plain(given):
            store = BoundedAttributes(self._max_attributes, immutable=False, max_value_len=None)
            store._dict.update(given)
        else:  # values to clean, or more than the limit: the SDK's own store does it
            store = BoundedAttributes(
                self._max_attributes, given, immutable=False, max_value_len=None
            )
        span = LeanSpan(
            sdk,
            name,
            context=span_context,
            parent=parent,
            kind=kind,
            attributes=store,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        )
        span.start(start_time=start_time, parent_context=context)
        return span

    @_agnosticcontextmanager
    def start_as_current_span(  # noqa: PLR0917 - the Tracer signature
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current
