"""The journey model: states, errors and latency from spans, and the bounded index."""

from __future__ import annotations

from typing import Any

from ampsflow.core.journeys import JourneyIndex, SpanRecord, summarise

T0 = 1_700_000_000_000_000_000
TRACE = "ab" * 16


def _span(name: str, span_id: str, start_ms: float, ms: float, **kw: Any) -> SpanRecord:
    fields: dict[str, Any] = {
        "trace_id": TRACE,
        "span_id": span_id,
        "parent_id": None,
        "service": {"publish-message": "react-web-app", "persist-message": "persister"}.get(
            name, "processor"
        ),
        "name": name,
        "kind": "CONSUMER",
        "start_ns": T0 + int(start_ms * 1e6),
        "end_ns": T0 + int((start_ms + ms) * 1e6),
        "status": "UNSET",
        "status_message": "",
        "error_type": None,
        "error_message": None,
        "attributes": {},
    }
    fields.update(kw)
    return SpanRecord(**fields)


def test_persisted_total_runs_from_publish_to_the_fsync() -> None:
    """The total is publish start to persist end, even when the publish ack ends later."""
    spans = [
        _span("publish-message", "1" * 16, 0, 100),
        _span("process-message", "2" * 16, 5, 1),
        _span("persist-message", "3" * 16, 8, 4, events=("fsync",)),
    ]
    journey = summarise(spans, dead_letter_topic=None)
    assert (journey["state"], journey["total_ms"], journey["hops"][2]["fsynced"]) == (
        "persisted",
        12.0,
        True,
    )


def test_failed_persist_is_not_called_fsynced() -> None:
    """A persist-message that failed is not shown as fsync'd, even after an fsync event."""
    span = _span(
        "persist-message",
        "3" * 16,
        0,
        1,
        status="ERROR",
        status_message="ENOSPC: No space left on device",
        events=("fsync",),
    )
    journey = summarise([span], dead_letter_topic=None)
    assert (journey["state"], journey["hops"][0]["fsynced"]) == ("failed", False)


def test_dead_letter_attribute_makes_it_dead_lettered() -> None:
    """A failed process-message naming the dead-letter topic reads as dead-lettered."""
    span = _span(
        "process-message",
        "2" * 16,
        0,
        1,
        status="ERROR",
        status_message="invalid_json: Expecting value",
        attributes={"ampsflow.dead_letter.topic": "internal.dlq"},
    )
    journey = summarise([span], dead_letter_topic=None)
    assert (journey["state"], journey["error"]) == (
        "dead-lettered",
        "process-message: invalid_json: Expecting value, dead-lettered to internal.dlq",
    )


def test_no_hops_no_total() -> None:
    """Until persisted there is no end-to-end total."""
    journey = summarise([_span("process-message", "2" * 16, 0, 1)], dead_letter_topic=None)
    assert (journey["state"], journey["total_ms"]) == ("processed", None)


def test_same_span_twice_is_kept_once() -> None:
    """A span uploaded again (an exporter retry) replaces its copy."""
    index = JourneyIndex(max_spans=10, max_bytes=10**6)
    span = _span("process-message", "2" * 16, 0, 1)
    index.add([span])
    index.add([span])
    assert (index.stats.spans, len(index.spans(TRACE))) == (1, 1)


def test_eviction_forgets_message_ids() -> None:
    """An evicted journey is no longer found by its message id."""
    index = JourneyIndex(max_spans=1, max_bytes=10**6)
    first = _span("persist-message", "3" * 16, 0, 1, attributes={"ampsflow.message.id": "m"})
    index.add([first])
    index.add([_span("x", "4" * 16, 0, 1, trace_id="cd" * 16)])
    assert (index.traces_of_message("m"), index.stats.evicted_traces) == ([], 1)


def test_a_replaced_span_leaves_no_message_entry_behind() -> None:
    """A span id seen again under another name: once evicted, nothing of it is kept."""
    index = JourneyIndex(max_spans=1, max_bytes=10**6)
    index.add([_span("publish-message", "1" * 16, 0, 1, attributes={"messaging.message.id": "m"})])
    index.add([_span("process-message", "1" * 16, 0, 1)])
    index.add([_span("x", "4" * 16, 0, 1, trace_id="cd" * 16)])
    assert (index.traces_of_message("m"), index._by_message) == ([], {})
