"""LeanTracer against the SDK's tracer: the same operations export the same spans.

Two providers with the same sampler, limits and a deterministic id generator
each record one span, one through the SDK's tracer and one through
:class:`~ampsflow.adapters.lean_spans.LeanTracer`, from the same generated
operations. Both exports are encoded by the official OTLP encoder and
compared byte for byte. With a light processor, the lean tracer's spans
(:class:`~ampsflow.adapters.lean_spans.LightSpan`, or the ``LeanSpan`` one
becomes) are encoded by ampsflow's wire encoder, which is all that reads them,
and the decoded request is compared with the official encoding of the SDK's.
"""

from __future__ import annotations

import logging
from collections import UserDict
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)

from ampsflow.adapters.lean_spans import CurrentSpan, LeanSpan, LeanTracer, LightSpan, _copy
from ampsflow.adapters.otlp_wire import SpanEncoder
from ampsflow.adapters.telemetry import FailuresSampled
from ampsflow.testing import in_memory_telemetry

START_NS = 1_700_000_000_000_000_000


class CountingIds(IdGenerator):
    """Ids from a counter: two generators made alike give the same ids."""

    def __init__(self, random: bool) -> None:
        self._next = 0x1234
        self._random = random

    def generate_span_id(self) -> int:
        self._next += 1
        return self._next

    def generate_trace_id(self) -> int:
        self._next += 1
        return self._next << 64 | 0xABCDEF

    def is_trace_id_random(self) -> bool:
        return self._random


def recorder(
    sampler: Sampler, limits: SpanLimits, random_ids: bool
) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource({"service.name": "t"}),
        id_generator=CountingIds(random_ids),
        span_limits=limits,
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


scalars = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
)
values: st.SearchStrategy[Any] = st.one_of(
    scalars,
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(st.integers(min_value=0, max_value=9), max_size=3).map(tuple),
    st.just(None),
    st.binary(max_size=4),
    st.just(object()),
)
keys = st.one_of(st.sampled_from(["a", "b", "messaging.system", "x.y"]), st.text(max_size=6))
attribute_maps = st.dictionaries(keys, st.one_of(scalars, scalars, values), max_size=6)

samplers = st.sampled_from(
    [
        ALWAYS_ON,
        ALWAYS_OFF,
        ParentBased(TraceIdRatioBased(0.5)),
        FailuresSampled(ParentBased(ALWAYS_OFF)),
    ]
)
limits_strategy = st.sampled_from(
    [
        SpanLimits(),
        SpanLimits(max_span_attributes=3),
        SpanLimits(max_attribute_length=4),
        SpanLimits(max_events=1, max_event_attributes=2),
    ]
)
parents = st.sampled_from(["none", "sampled", "unsampled", "invalid", "local", "random"])


def parent_context(kind: str) -> Context | None:
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    contexts = {
        "sampled": SpanContext(trace_id, span_id, True, TraceFlags(TraceFlags.SAMPLED)),
        "unsampled": SpanContext(trace_id, span_id, True, TraceFlags(TraceFlags.DEFAULT)),
        "invalid": SpanContext(0, 0, False),
        "local": SpanContext(trace_id, span_id, False, TraceFlags(TraceFlags.SAMPLED)),
        "random": SpanContext(
            trace_id, span_id, True, TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
        ),
    }
    if kind == "none":
        return None
    return set_span_in_context(NonRecordingSpan(contexts[kind]))


Operation = Callable[[Any], None]


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, tuple[Any, ...]]]:
    ops = st.one_of(
        st.tuples(st.just("set_attribute"), st.tuples(keys, values)),
        st.tuples(st.just("set_attributes"), st.tuples(attribute_maps)),
        st.tuples(
            st.just("add_event"),
            st.tuples(st.text(max_size=5), attribute_maps, st.integers(0, 10**6)),
        ),
        st.tuples(
            st.just("set_status"),
            st.tuples(st.sampled_from(list(StatusCode)), st.one_of(st.none(), st.text(max_size=5))),
        ),
        st.tuples(st.just("record_exception"), st.tuples(st.text(max_size=5))),
        st.tuples(st.just("update_name"), st.tuples(st.text(max_size=5))),
        st.tuples(st.just("add_link"), st.tuples(attribute_maps)),
    )
    return draw(st.lists(ops, max_size=8))


LINKED = SpanContext(0x1111, 0x2222, True, TraceFlags(TraceFlags.SAMPLED))


def apply(span: Any, name: str, args: tuple[Any, ...]) -> None:
    if name == "set_status":
        code, description = args
        span.set_status(Status(code, description) if description is not None else code)
    elif name == "record_exception":
        try:
            raise ValueError(args[0])
        except ValueError as exc:
            span.record_exception(exc, timestamp=START_NS + 5)
    elif name == "add_event":
        event_name, attributes, offset = args
        span.add_event(event_name, attributes, timestamp=START_NS + offset)
    elif name == "add_link":
        span.add_link(LINKED, args[0])
    else:
        getattr(span, name)(*args)


def run(tracer: Any, scenario: dict[str, Any]) -> tuple[Any, bool]:
    span = tracer.start_span(
        scenario["name"],
        context=parent_context(scenario["parent"]),
        kind=scenario["kind"],
        attributes=scenario["attributes"],
        links=[Link(LINKED, {"l": 1})] if scenario["linked"] else (),
        start_time=START_NS,
    )
    for name, args in scenario["ops"]:
        apply(span, name, args)
    span.end(end_time=START_NS + 1000)
    if scenario["after_end"]:
        span.set_attribute("late", 1)
        span.end()
    return span.get_span_context(), span.is_recording()


def run_quietly(tracer: Any, scenario: dict[str, Any]) -> tuple[Any, bool]:
    """:func:`run` without the SDK's warnings (ended spans, full stores, bad values)."""
    logging.disable(logging.WARNING)
    try:
        return run(tracer, scenario)
    finally:
        logging.disable(logging.NOTSET)


scenarios = st.fixed_dictionaries(
    {
        "name": st.text(max_size=8),
        "parent": parents,
        "kind": st.sampled_from(list(SpanKind)),
        "attributes": st.one_of(st.none(), attribute_maps),
        "linked": st.booleans(),
        "ops": operations(),
        "after_end": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sampler=samplers,
    limits=limits_strategy,
    random_ids=st.booleans(),
    scenario=scenarios,
)
def test_exports_what_the_sdk_exports(
    sampler: Sampler, limits: SpanLimits, random_ids: bool, scenario: dict[str, Any]
) -> None:
    """Whatever is done to a span, the lean tracer exports the SDK's span, byte for byte."""
    theirs_provider, theirs = recorder(sampler, limits, random_ids)
    mine_provider, mine = recorder(sampler, limits, random_ids)
    their_result = run_quietly(theirs_provider.get_tracer("t", "1"), scenario)
    my_result = run_quietly(LeanTracer(mine_provider.get_tracer("t", "1")), scenario)
    assert my_result == their_result
    my_spans, their_spans = mine.get_finished_spans(), theirs.get_finished_spans()
    assert len(my_spans) == len(their_spans)
    if my_spans:
        assert encode_spans(my_spans).SerializeToString() == (
            encode_spans(their_spans).SerializeToString()
        )
        assert (my_spans[0].dropped_attributes, my_spans[0].dropped_events) == (
            their_spans[0].dropped_attributes,
            their_spans[0].dropped_events,
        )


def light_recorder(
    sampler: Sampler, limits: SpanLimits, random_ids: bool
) -> tuple[LeanTracer, InMemorySpanExporter]:
    """A lean tracer whose provider's only processor is its light processor."""
    provider, exporter = recorder(sampler, limits, random_ids)
    (processor,) = provider._active_span_processor._span_processors
    return LeanTracer(provider.get_tracer("t", "1"), processor), exporter


def decoded(request: bytes) -> bytes:
    return ExportTraceServiceRequest.FromString(request).SerializeToString(deterministic=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sampler=samplers,
    limits=limits_strategy,
    random_ids=st.booleans(),
    scenario=scenarios,
)
def test_light_spans_export_what_the_sdk_exports(
    sampler: Sampler, limits: SpanLimits, random_ids: bool, scenario: dict[str, Any]
) -> None:
    """Whatever is done to a light span, the wire encoder sends the SDK's span."""
    assert_light_sends_what_the_sdk_sends(sampler, limits, random_ids, scenario)


def assert_light_sends_what_the_sdk_sends(
    sampler: Sampler, limits: SpanLimits, random_ids: bool, scenario: dict[str, Any]
) -> None:
    theirs_provider, theirs = recorder(sampler, limits, random_ids)
    tracer, mine = light_recorder(sampler, limits, random_ids)
    their_result = run_quietly(theirs_provider.get_tracer("t", "1"), scenario)
    my_result = run_quietly(tracer, scenario)
    assert my_result == their_result
    my_spans, their_spans = mine.get_finished_spans(), theirs.get_finished_spans()
    assert len(my_spans) == len(their_spans)
    assert decoded(SpanEncoder().encode(my_spans)) == decoded(
        encode_spans(their_spans).SerializeToString()
    )


few_keys = st.sampled_from(["a", "b", "c", "d"])
plain_maps = st.dictionaries(few_keys, scalars, max_size=4)
plain_operations = st.lists(
    st.one_of(
        st.tuples(st.just("set_attribute"), st.tuples(few_keys, scalars)),
        st.tuples(st.just("set_attributes"), st.tuples(plain_maps)),
        st.tuples(
            st.just("add_event"),
            st.tuples(st.text(max_size=5), st.one_of(st.none(), plain_maps), st.integers(0, 9)),
        ),
        st.tuples(st.just("update_name"), st.tuples(st.text(max_size=5))),
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits=st.sampled_from(
        [SpanLimits(), SpanLimits(max_span_attributes=3, max_events=2, max_event_attributes=1)]
    ),
    attributes=plain_maps,
    ops=plain_operations,
    after_end=st.booleans(),
)
def test_plain_operations_export_what_the_sdk_exports(
    limits: SpanLimits, attributes: dict[str, Any], ops: list[Any], after_end: bool
) -> None:
    """The daemons' kind of operations (plain values, keys set again, limits reached) on a
    light span send the SDK's span."""
    scenario = {
        "name": "s",
        "parent": "sampled",
        "kind": SpanKind.CONSUMER,
        "attributes": attributes,
        "linked": False,
        "ops": ops,
        "after_end": after_end,
    }
    assert_light_sends_what_the_sdk_sends(ALWAYS_ON, limits, True, scenario)


def test_the_daemons_spans_stay_light() -> None:
    """Plain attributes, plain events, a new name and the end keep a span light; a status
    makes it the LeanSpan it would have been, and that one is exported."""
    tracer, exporter = light_recorder(ALWAYS_ON, SpanLimits(), True)
    span = tracer.start_span("s", attributes={"a": 1})
    assert type(span) is LightSpan
    span.set_attribute("b", "x")
    span.set_attributes({"c": 2.5, "a": 3})
    span.add_event("fsync", {"lines": 4}, timestamp=START_NS)
    span.add_event("bare")
    span.update_name("t")
    span.end()
    failed = tracer.start_span("f", attributes={"a": 1})
    failed.set_status(StatusCode.ERROR, "broken")
    failed.end()
    light, promoted = exporter.get_finished_spans()
    assert light is span
    assert type(promoted) is LeanSpan
    assert promoted.status.status_code is StatusCode.ERROR
    assert dict(promoted.attributes or {}) == {"a": 1}
    request = ExportTraceServiceRequest.FromString(SpanEncoder().encode([light]))
    (sent,) = request.resource_spans[0].scope_spans[0].spans
    assert sent.name == "t"
    assert [kv.key for kv in sent.attributes] == ["b", "c", "a"]
    assert [event.name for event in sent.events] == ["fsync", "bare"]


def test_a_processor_added_later_ends_light_spans() -> None:
    """Light spans go to one processor only: another one added makes spans lean again."""
    tracer, _ = light_recorder(ALWAYS_ON, SpanLimits(), True)
    assert type(tracer.start_span("s")) is LightSpan
    tracer._sdk.span_processor.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert type(tracer.start_span("s")) is LeanSpan


def sdk_and_lean_span() -> tuple[SdkSpan, SdkSpan]:
    provider, _ = recorder(ALWAYS_ON, SpanLimits(), True)
    sdk = provider.get_tracer("t")
    return sdk.start_span("s"), LeanTracer(sdk).start_span("s")  # type: ignore[return-value]


def test_common_spans_are_lean() -> None:
    """No links give a LeanSpan (other values cleaned as the SDK cleans them); a link goes
    through the SDK."""
    provider, _ = recorder(ALWAYS_ON, SpanLimits(), True)
    tracer = LeanTracer(provider.get_tracer("t"))
    assert type(tracer.start_span("s", attributes={"a": 1, "b": "x"})) is LeanSpan
    linked = tracer.start_span("s", links=[Link(LINKED)])
    assert isinstance(linked, SdkSpan)
    assert type(linked) is not LeanSpan
    unclean = {"a": [1], "b": None, "": "x"}
    cleaned = tracer.start_span("s", attributes=unclean)
    assert type(cleaned) is LeanSpan
    sdk_span = provider.get_tracer("t").start_span("s", attributes=unclean)
    assert dict(cleaned.attributes or {}) == dict(sdk_span.attributes or {})
    assert dict(cleaned.attributes or {})["a"] == (1,)


def test_a_lean_span_has_every_field_of_an_sdk_span() -> None:
    """The SDK's methods find every field they read (guards SDK upgrades)."""
    theirs, mine = sdk_and_lean_span()
    assert type(mine) is LeanSpan
    assert set(vars(mine)) == set(vars(theirs))
    assert {name: type(value) for name, value in vars(mine).items()} == {
        name: type(value) for name, value in vars(theirs).items()
    }


def test_processors_get_the_ended_span_frozen() -> None:
    """An ended span takes no more attributes, as the SDK's copy would not."""
    provider, exporter = recorder(ALWAYS_ON, SpanLimits(), True)
    span = LeanTracer(provider.get_tracer("t")).start_span("s", attributes={"a": 1})
    span.end()
    span.set_attribute("b", 2)
    (exported,) = exporter.get_finished_spans()
    assert isinstance(exported, ReadableSpan)
    assert dict(exported.attributes or {}) == {"a": 1}
    assert exported.end_time is not None


def test_services_get_the_lean_tracer() -> None:
    """setup_telemetry gives services the lean tracer (and its spans reach the exporter)."""
    memory = in_memory_telemetry()
    assert isinstance(memory.telemetry.tracer, LeanTracer)
    with memory.telemetry.tracer.start_as_current_span("s", attributes={"k": "v"}) as span:
        assert type(span) is LeanSpan
    (exported,) = memory.exporter.get_finished_spans()
    assert dict(exported.attributes or {}) == {"k": "v"}


@pytest.mark.parametrize("value", ["", "disabled"])
def test_without_the_sdk_the_tracer_is_the_sdks(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_SDK_DISABLED gives the SDK's no-op tracer, not a lean one."""
    if value:
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    memory = in_memory_telemetry()
    assert isinstance(memory.telemetry.tracer, LeanTracer) is (not value)


@pytest.mark.parametrize(
    "viewed",
    [{"a": 1, "b": "x"}, BoundedAttributes(4, {"a": 1, "b": "x"}), UserDict({"a": 1, "b": "x"})],
)
def test_sampled_attributes_are_copied_from_any_mapping(viewed: Any) -> None:
    """A sampler's read-only view of any mapping gives the span a dict of its own."""
    copied = _copy(MappingProxyType(viewed))
    assert type(copied) is dict
    assert copied == {"a": 1, "b": "x"}
    assert copied is not viewed


def test_current_span_is_current_inside_and_ended_after() -> None:
    """CurrentSpan does what use_span(end_on_exit=True) without recording does, exception or not."""
    tracer, exporter = light_recorder(ALWAYS_ON, SpanLimits(), True)
    outer = get_current_span()
    span = tracer.start_span("s")
    with CurrentSpan(span) as current:
        assert current is span
        assert get_current_span() is span
    assert get_current_span() is outer
    failing = tracer.start_span("f")
    with pytest.raises(ValueError, match="boom"), CurrentSpan(failing):
        raise ValueError("boom")
    assert get_current_span() is outer
    ended = exporter.get_finished_spans()
    assert [s.name for s in ended] == ["s", "f"]
    assert ended[1].status.status_code is StatusCode.UNSET
    assert not ended[1].events
