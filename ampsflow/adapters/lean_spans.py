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

When the tracer is given its provider's only span processor, and that
processor's exporter is ampsflow's wire encoder
(:class:`~ampsflow.adapters.otlp_wire.OtlpHttpSpanExporter`, as in the daemons
exporting OTLP/HTTP protobuf), it goes one step further: a span that starts
with plain attributes is a :class:`LightSpan`, plain fields and no SDK span at
all, until something only the SDK's span does is asked of it. One daemon span's
life on the loop: 13.8 µs lean, 10.8 µs light (`benchmarks/span_lifecycle.py`,
BENCHMARKS.md "Tracing, fifth pass").

``tests/unit/test_lean_spans.py`` drives the SDK tracer and this one with the
same generated operations and compares the exported spans byte for byte (official
encoder), and the light spans' wire encoding with the official encoding of the
SDK's spans.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from time import time_ns
from types import MappingProxyType, TracebackType
from typing import Any, cast

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context, attach, detach
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
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
from opentelemetry.util.types import Attributes, AttributeValue

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


def _copy(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A ``dict`` of ``attributes``.

    A sampler returns the attributes as a read-only view of the caller's dict;
    its ``copy`` copies that dict (0.06 µs for the daemons' seven), where
    ``dict(view)`` goes key by key through the view (0.5 µs).
    """
    if type(attributes) is MappingProxyType:
        try:
            copied = attributes.copy()  # the viewed mapping's own copy
        except AttributeError:  # a mapping without one
            copied = None
        if type(copied) is dict:
            return copied
    return dict(attributes)


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


_sdk_logger = logging.getLogger("opentelemetry.sdk.trace")
"""The SDK span's logger: a light span's warnings read as the SDK's would."""


class LightSpan(trace_api.Span):
    """A recording span kept as plain fields, for the services' own export chain.

    :class:`LeanTracer` starts one instead of a :class:`LeanSpan` when it was
    given the provider's only span processor (``light_processor``) and the span
    starts with plain attributes within the limit. The daemons' spans live their
    whole life here: plain attributes set, events with plain attributes, the name
    changed, and the end. That costs no attribute store with its lock, no
    ``on_start`` call (the chain's does nothing) and no processor fan-out at the
    end: the span itself goes to ``light_processor``, and the wire encoder
    (:mod:`ampsflow.adapters.otlp_wire`) reads its fields.

    Anything else (a status, an exception, a link, a value the SDK would clean,
    a limit reached, any call after the end) first turns the span into the
    :class:`LeanSpan` it would have been, holding everything recorded so far,
    and from then on every call is that span's: the SDK's own rules and
    warnings apply, and that span is the one handed to the processors.

    Every change and the end hold the span's lock, as the SDK's span does: once
    ended, a span that the export thread reads changes no more.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_kind",
        "_lock",
        "_max_attributes",
        "_name",
        "_parent",
        "_processor",
        "_record_exception",
        "_sdk",
        "_set_status_on_exception",
        "_start_time",
        "_tracer",
    )

    _links: Sequence[Link] = ()
    """A light span never has links (a link makes it a :class:`LeanSpan`)."""

    def __init__(
        self,
        tracer: SdkTracer,
        processor: SpanProcessor,
        name: str,
        *,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        max_attributes: int | None,
        start_time: int,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        self._tracer = tracer
        self._processor = processor
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._max_attributes = max_attributes
        self._events: list[Event] | tuple[()] = ()
        self._start_time = start_time
        self._end_time: int | None = None
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._sdk: LeanSpan | None = None
        self._lock = threading.Lock()

    # -- what the processors and the encoder read (ReadableSpan's properties) --

    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def resource(self) -> Any:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self._tracer._instrumentation_scope

    @property
    def status(self) -> Status:
        return _UNSET  # setting a status makes the span a LeanSpan

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> SpanKind:
        return self._kind

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def start_time(self) -> int:
        return self._start_time

    @property
    def end_time(self) -> int | None:
        return self._end_time

    @property
    def attributes(self) -> Mapping[str, Any]:
        return MappingProxyType(self._attributes)

    @property
    def events(self) -> Sequence[Event]:
        return tuple(self._events)

    @property
    def links(self) -> Sequence[Link]:
        return ()

    dropped_attributes = dropped_events = dropped_links = 0
    """A light span never drops anything (a limit reached makes it a LeanSpan)."""

    # -- the span API ------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        sdk = self._sdk
        return sdk.is_recording() if sdk is not None else self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        with self._lock:
            if self._sdk is None and self._end_time is None:
                attributes = self._attributes
                if type(value) in _PLAIN_TYPES and type(key) is str and key:
                    if key in attributes:
                        del attributes[key]  # the SDK's store moves a key set again to the end
                        attributes[key] = value
                        return
                    if self._max_attributes is None or len(attributes) < self._max_attributes:
                        attributes[key] = value
                        return
        self._promote().set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        with self._lock:
            mine = self._attributes
            if (
                self._sdk is None
                and self._end_time is None
                and _plain(attributes)
                and (
                    self._max_attributes is None
                    or len(mine) + len(attributes) <= self._max_attributes
                )
            ):
                for key, value in attributes.items():
                    if key in mine:
                        del mine[key]
                    mine[key] = value
                return
        self._promote().set_attributes(attributes)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        limits = self._tracer._span_limits
        with self._lock:
            events = self._events
            if (
                self._sdk is None
                and self._end_time is None
                and (limits.max_events is None or len(events) < limits.max_events)
                and (
                    not attributes
                    or (
                        _plain(attributes)
                        and (
                            limits.max_event_attributes is None
                            or len(attributes) <= limits.max_event_attributes
                        )
                    )
                )
            ):
                event = Event(name, dict(attributes) if attributes else None, timestamp)
                if events:
                    events.append(event)
                else:
                    self._events = [event]
                return
        self._promote().add_event(name, attributes, timestamp)

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        self._promote().add_link(context, attributes)

    def update_name(self, name: str) -> None:
        with self._lock:
            if self._sdk is None and self._end_time is None:
                self._name = name
                return
        self._promote().update_name(name)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        self._promote().set_status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self._promote().record_exception(exception, attributes, timestamp, escaped)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._sdk is not None or (exc_val is not None and self.is_recording()):
            self._promote().__exit__(exc_type, exc_val, exc_tb)
            return
        self.end()

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the processor (or end its LeanSpan)."""
        with self._lock:
            ending = self._sdk is None and self._end_time is None
            if ending:
                self._end_time = end_time if end_time is not None else time_ns()
        if ending:
            self._processor.on_end(cast(ReadableSpan, self))
            return
        self._promote().end(end_time)

    def _promote(self) -> LeanSpan:
        """The :class:`LeanSpan` this span is from now on, made at the first call."""
        with self._lock:
            sdk = self._sdk
            if sdk is not None:
                return sdk
            tracer = self._tracer
            store = BoundedAttributes(self._max_attributes, immutable=False, max_value_len=None)
            store._dict.update(self._attributes)
            sdk = LeanSpan(
                tracer,
                self._name,
                context=self._context,
                parent=self._parent,
                kind=self._kind,
                attributes=store,
                record_exception=self._record_exception,
                set_status_on_exception=self._set_status_on_exception,
            )
            sdk._start_time = self._start_time
            for event in self._events:
                sdk._add_event(event)
            if self._end_time is not None:  # ended and exported: the SDK refuses changes now
                sdk._end_time = self._end_time
                store._immutable = True
            self._sdk = sdk
            return sdk


class CurrentSpan:
    """``with CurrentSpan(span):`` makes ``span`` current in the block and ends it after.

    What ``use_span(span, end_on_exit=True, record_exception=False,
    set_status_on_exception=False)`` does, without its generator-based context
    manager: 1.0 µs instead of 2.1 µs per message on the loop, of which attaching
    and detaching the context are 0.6 µs (``timeit``). An exception leaving the
    block is not recorded on the span (the caller records failures).
    """

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace_api.Span) -> None:
        self._span = span

    def __enter__(self) -> trace_api.Span:
        self._token = attach(trace_api.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        try:
            detach(self._token)
        finally:
            self._span.end()


class LeanTracer(trace_api.Tracer):
    """``tracer`` (an SDK tracer), starting its common spans as :class:`LeanSpan`.

    Given ``light_processor``, the provider's only span processor, it starts them
    as :class:`LightSpan` instead. That processor's ``on_start`` is not called for
    them, and whatever it hands them to must read them through the fields
    :class:`~ampsflow.adapters.otlp_wire.SpanEncoder` reads (or ``ReadableSpan``'s
    properties): ``setup_telemetry`` passes its processor only when its exporter
    is ampsflow's wire encoder.
    """

    def __init__(self, tracer: SdkTracer, light_processor: SpanProcessor | None = None) -> None:
        self._sdk = tracer
        limits = tracer._span_limits
        self._max_attributes = limits.max_span_attributes
        self._lean = limits.max_span_attribute_length is None and isinstance(
            tracer._tracer_metrics, NoOpTracerMetrics
        )
        # Light spans while light_processor is the provider's only processor (a
        # processor added later makes a new tuple, and spans are lean again).
        chain = getattr(tracer.span_processor, "_span_processors", None)
        self._light = light_processor
        self._light_chain = (
            chain if light_processor is not None and chain == (light_processor,) else None
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
        fits = self._max_attributes is None or len(given) <= self._max_attributes
        plain = fits and _plain(given)  # within the limit, nothing for the SDK to clean
        if (
            plain
            and self._light_chain is not None
            and getattr(sdk.span_processor, "_span_processors", None) is self._light_chain
        ):
            return LightSpan(
                sdk,
                cast(SpanProcessor, self._light),
                name,
                context=span_context,
                parent=parent,
                kind=kind,
                attributes=_copy(given),
                max_attributes=self._max_attributes,
                start_time=start_time if start_time is not None else time_ns(),
                record_exception=record_exception,
                set_status_on_exception=set_status_on_exception,
            )
        if plain:
            store = BoundedAttributes(self._max_attributes, immutable=False, max_value_len=None)
            store._dict.update(_copy(given))
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
