"""The processor's queue mode: acks after the output is stored, redeliveries on the span."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest

from ampsflow.config import ProcessorConfig
from ampsflow.services.processor import PROCESS_SPAN, REDELIVERED_ATTRIBUTE, Processor
from ampsflow.testing import FakeAmps, InMemoryTelemetry, in_memory_telemetry

CID = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"
TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736


@pytest.fixture
def memory() -> Iterator[InMemoryTelemetry]:
    memory = in_memory_telemetry("processor")
    yield memory
    memory.telemetry.shutdown()


def processor(memory: InMemoryTelemetry, amps: FakeAmps, stop: threading.Event) -> Processor:
    config = ProcessorConfig(input_mode="queue", input_topic="internal-queue")
    return Processor(config, memory.telemetry, amps, amps, stop)


def test_a_redelivery_is_marked_on_its_span_with_the_same_parent(
    memory: InMemoryTelemetry,
) -> None:
    """The first delivery has no mark; the redelivery has it; both are children of the
    message's own context."""
    amps = FakeAmps()
    proc = processor(memory, amps, threading.Event())
    first = amps.deliver('{"id":"m1"}', topic="internal-queue", correlation_id=CID)
    first = dataclasses.replace(first, queued=True)
    again = dataclasses.replace(first, redelivered=True)
    assert amps.receive(0) is not None
    assert proc.handle(first)
    assert proc.handle(again)
    spans = memory.span_named(PROCESS_SPAN)
    expected = [(None, TRACE), (True, TRACE)]
    assert expected == [
        ((s.attributes or {}).get(REDELIVERED_ATTRIBUTE), s.context.trace_id) for s in spans
    ]
    assert [first.bookmark, first.bookmark] == [m.bookmark for m in amps.discarded]


def test_a_queue_message_is_not_acked_while_its_output_is_not_stored(
    memory: InMemoryTelemetry,
) -> None:
    """A publish that cannot be stored leaves the message unacknowledged (it is redelivered
    once its lease runs out)."""
    amps = FakeAmps(fail_publish=["store full"])
    stop = threading.Event()
    stop.set()
    proc = processor(memory, amps, stop)
    message = dataclasses.replace(amps.deliver("{}", topic="internal-queue"), queued=True)
    assert not proc.handle(message)
    assert [] == amps.discarded
