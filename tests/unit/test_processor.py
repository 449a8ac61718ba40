"""The processor's per-message logic against in-process fakes."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from ampsflow.adapters.systemd import Notifier
from ampsflow.config import ProcessorConfig, TelemetryConfig
from ampsflow.core.codec import decode_correlation_id
from ampsflow.lifecycle import Daemon
from ampsflow.services.processor import PROCESS_SPAN, Processor
from ampsflow.testing import FakeAmps, InMemoryTelemetry, in_memory_telemetry
from tests.support.processes import wait_for

CID = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"
TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7


@pytest.fixture
def memory() -> Iterator[InMemoryTelemetry]:
    memory = in_memory_telemetry("processor")
    yield memory
    memory.telemetry.shutdown()


@pytest.fixture
def amps() -> FakeAmps:
    return FakeAmps()


def make(
    memory: InMemoryTelemetry, amps: FakeAmps, stop: threading.Event | None = None, **config: object
) -> Processor:
    section = ProcessorConfig(**config)  # type: ignore[arg-type]
    return Processor(section, memory.telemetry, amps, amps, stop or threading.Event())


def handle(processor: Processor, amps: FakeAmps, body: bytes | str, **kwargs: object) -> bool:
    amps.deliver(body, **kwargs)  # type: ignore[arg-type]
    message = amps.receive(0)
    assert message is not None
    return processor.handle(message)


class TestGoodMessage:
    def test_output_is_marked_processed(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """The output on output_topic is the input plus processed and the new CorrelationId."""
        handle(make(memory, amps), amps, '{"mark":1}', correlation_id=CID)
        (out,) = amps.on_topic("external")
        body = json.loads(out.body)
        assert ({"mark": 1, "processed": True}, out.correlation_id) == (
            {k: v for k, v in body.items() if k != "CorrelationId"},
            body["CorrelationId"],
        )

    def test_process_span_is_child_of_header_context(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """process-message is a CONSUMER span whose parent is the header's span."""
        handle(make(memory, amps), amps, '{"mark":1}', correlation_id=CID)
        (span,) = memory.span_named(PROCESS_SPAN)
        assert (
            span.context.trace_id,
            span.parent.span_id if span.parent else None,
            span.kind,
        ) == (TRACE, SPAN, SpanKind.CONSUMER)

    def test_payload_context_is_the_fallback(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """Without a header the payload CorrelationId gives the parent."""
        handle(make(memory, amps), amps, json.dumps({"CorrelationId": CID}))
        (span,) = memory.span_named(PROCESS_SPAN)
        assert (span.context.trace_id, span.parent.span_id if span.parent else 0) == (TRACE, SPAN)

    def test_output_correlation_id_names_process_span(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """The output's CorrelationId carries the process-message span, the persister's parent."""
        handle(make(memory, amps), amps, "{}", correlation_id=CID)
        (span,) = memory.span_named(PROCESS_SPAN)
        (out,) = amps.on_topic("external")
        decoded = decode_correlation_id(out.correlation_id or "")
        assert (span.context.trace_id, span.context.span_id) == (decoded.trace_id, decoded.span_id)

    def test_one_span_per_message_tells_the_publish(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """process-message is the only span; it carries the publish store's sequence, no link."""
        handle(make(memory, amps), amps, "{}", correlation_id=CID)
        (span,) = memory.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert (span.name, span.kind, attributes["ampsflow.amps.sequence"], span.links) == (
            PROCESS_SPAN,
            SpanKind.CONSUMER,
            1,
            (),
        )

    def test_process_span_attributes(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """process-message carries the messaging attributes and the bookmark."""
        handle(make(memory, amps), amps, '{"a":1}', correlation_id=CID)
        (span,) = memory.span_named(PROCESS_SPAN)
        expected = {
            "messaging.system": "amps",
            "messaging.destination.name": "internal",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": "1|1|",
            "messaging.message.body.size": 7,
            "ampsflow.amps.bookmark": "1|1|",
            "ampsflow.amps.sequence": 1,
        }
        assert expected == dict(span.attributes or {})

    def test_discarded_after_publish(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """The input is discarded once its output is published."""
        assert handle(make(memory, amps), amps, "{}")
        assert [m.bookmark for m in amps.discarded] == ["1|1|"]

    def test_header_carrier(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Carrier header puts the CorrelationId in the header only."""
        handle(make(memory, amps, carrier="header"), amps, "{}", correlation_id=CID)
        (out,) = amps.on_topic("external")
        assert (json.loads(out.body), out.correlation_id is not None) == ({"processed": True}, True)

    def test_payload_carrier(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Carrier payload puts the CorrelationId in the payload only."""
        handle(make(memory, amps, carrier="payload"), amps, "{}", correlation_id=CID)
        (out,) = amps.on_topic("external")
        assert (out.correlation_id, "CorrelationId" in json.loads(out.body)) == (None, True)

    def test_consumed_counter(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Each delivery counts once in messaging.client.consumed.messages, each publish once
        in messaging.client.sent.messages, added in one call per flush."""
        processor = make(memory, amps)
        amps.fail_publish.append("store full")
        handle(processor, amps, "{}")
        handle(processor, amps, "{}")
        assert memory.counter_total("messaging.client.consumed.messages") == 0
        processor.flush_metrics()
        assert (
            memory.counter_total("messaging.client.consumed.messages"),
            memory.counter_total("messaging.client.sent.messages"),
        ) == (2, 3)

    def test_run_flushes_the_counts_when_it_returns(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        daemon = Daemon("processor", notifier=RecordingNotifier())
        processor = Processor(ProcessorConfig(), memory.telemetry, amps, amps, daemon.stop)
        for _ in range(3):
            amps.deliver("{}")
        thread = threading.Thread(target=processor.run, args=(daemon,))
        thread.start()
        wait_for(lambda: len(amps.discarded) == 3, timeout_s=10, what="3 messages processed")
        daemon.stop.set()
        thread.join(10)
        assert memory.counter_total("messaging.client.consumed.messages") == 3


class TestCorrelationProblems:
    def test_missing_starts_new_trace(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """No CorrelationId: a new root span with the problem recorded."""
        handle(make(memory, amps), amps, "{}")
        (span,) = memory.span_named(PROCESS_SPAN)
        attributes = span.attributes or {}
        assert (span.parent, attributes["ampsflow.correlation_id.problem"]) == (None, "missing")

    def test_invalid_header_is_recorded(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """An invalid header starts a new trace; the output is still produced."""
        handle(make(memory, amps), amps, "{}", correlation_id="not-a-trace")
        (span,) = memory.span_named(PROCESS_SPAN)
        attributes = span.attributes or {}
        assert (
            attributes["ampsflow.correlation_id.problem"],
            len(amps.on_topic("external")),
        ) == ("header:wrong_length", 1)


class TestBadInput:
    def test_error_span(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Invalid JSON marks process-message ERROR with error.type and an exception event."""
        handle(make(memory, amps), amps, b"{nope", correlation_id=CID)
        (span,) = memory.span_named(PROCESS_SPAN)
        attributes = span.attributes or {}
        assert (
            span.status.status_code,
            attributes["error.type"],
            [e.name for e in span.events],
        ) == (StatusCode.ERROR, "invalid_json", ["exception"])

    def test_dead_letter(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """The original body goes to the dead-letter topic with the reason."""
        handle(make(memory, amps), amps, b"[1,2]", correlation_id=CID)
        (letter,) = amps.on_topic("internal.dlq")
        envelope = json.loads(letter.body)
        assert ("not_an_object", "[1,2]", letter.correlation_id) == (
            envelope["reason"],
            envelope["body"],
            envelope["CorrelationId"],
        )

    def test_bad_input_is_discarded_and_counted(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """A rejected message is discarded, counted, and produces no output."""
        handle(make(memory, amps), amps, b"\xff")
        assert (
            len(amps.discarded),
            memory.counter_total("ampsflow.messages.rejected"),
            amps.on_topic("external"),
        ) == (1, 1, [])

    def test_no_dead_letter_topic(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """With dead_letter_topic null, a rejected message is logged, counted and discarded."""
        handle(make(memory, amps, dead_letter_topic=None), amps, b"{")
        assert (len(amps.discarded), len(amps.published)) == (1, 0)

    def test_good_traffic_continues(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Good messages after a bad one are processed."""
        processor = make(memory, amps)
        for body in ("{}", "{bad", '{"b":2}'):
            handle(processor, amps, body)
        assert (len(amps.on_topic("external")), len(amps.on_topic("internal.dlq"))) == (2, 1)


class TestNeverDiesOnAMessage:
    """Any exception while handling one message becomes that message's rejection."""

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b'{"id":"p","s":"\\ud800"}', "invalid_unicode"),
            (b'{"id":"d","a":1,"a":2}', "duplicate_key"),
            (b'{"id":"n","x":1e999}', "number_out_of_range"),
        ],
    )
    def test_rejected_to_the_dead_letter_topic(
        self, memory: InMemoryTelemetry, amps: FakeAmps, body: bytes, reason: str
    ) -> None:
        """A lone surrogate, a duplicate key, an out-of-range number: dead-lettered, discarded."""
        processor = make(memory, amps)
        finished = handle(processor, amps, body)
        (letter,) = amps.on_topic("internal.dlq")
        envelope = json.loads(letter.body)
        assert (finished, envelope["reason"], envelope["body"].encode(), len(amps.discarded)) == (
            True,
            reason,
            body,
            1,
        )

    def test_unexpected_exception_is_an_internal_error_rejection(
        self, memory: InMemoryTelemetry, amps: FakeAmps, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug hit by one message: ERROR span, counter, dead letter, and the next one passes."""

        def broken(*args: object, **kwargs: object) -> object:
            raise KeyError("boom")

        processor = make(memory, amps)
        monkeypatch.setattr("ampsflow.core.transform.render_output", broken)
        handle(processor, amps, b'{"id":"bug"}')
        monkeypatch.undo()
        handle(processor, amps, b'{"id":"next"}')
        (span, _) = memory.span_named(PROCESS_SPAN)
        (letter,) = amps.on_topic("internal.dlq")
        assert (
            span.status.status_code,
            (span.attributes or {}).get("error.type"),
            json.loads(letter.body)["reason"],
            json.loads(letter.body)["detail"],
            memory.counter_total("ampsflow.messages.rejected"),
            [json.loads(m.body)["id"] for m in amps.on_topic("external")],
            len(amps.discarded),
        ) == (
            StatusCode.ERROR,
            "internal_error",
            "internal_error",
            "KeyError: 'boom'",
            1,
            ["next"],
            2,
        )

    def test_a_failing_dead_letter_leaves_the_message_unfinished(
        self, memory: InMemoryTelemetry, amps: FakeAmps, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When even the dead letter cannot be built, the message is not discarded (redelivered)."""

        def broken(*args: object, **kwargs: object) -> object:
            raise RuntimeError("no envelope")

        monkeypatch.setattr("ampsflow.core.transform.dead_letter_body", broken)
        processor = make(memory, amps)
        amps.deliver(b"{bad")
        message = amps.receive(0)
        assert message is not None
        assert (processor.handle_safely(message), amps.discarded) == (False, [])

    def test_output_over_the_limit_is_dead_lettered_not_sent(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """An output that would exceed max_message_bytes is dead-lettered as output_too_large."""
        body = b'{"id":"grow","n":[' + b",".join([b"1e15"] * 2000) + b"]}"
        handle(make(memory, amps, max_message_bytes=16 * 1024), amps, body)
        (letter,) = amps.on_topic("internal.dlq")
        envelope = json.loads(letter.body)
        assert (amps.on_topic("external"), envelope["reason"], envelope["body_truncated"]) == (
            [],
            "output_too_large",
            False,
        )

    def test_dead_letter_fits_max_message_bytes(
        self, memory: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """A body of control characters (six bytes each once escaped) gives a bounded envelope."""
        limit = 64 * 1024
        body = b'{"s":"' + b"\x01" * (limit - 100) + b'"}'
        handle(make(memory, amps, max_message_bytes=limit), amps, body)
        (letter,) = amps.on_topic("internal.dlq")
        envelope = json.loads(letter.body)
        assert (
            len(letter.body) <= limit - 1024 - len("internal.dlq"),
            envelope["body_truncated"],
            envelope["body_bytes"],
            envelope["body_sha256"],
        ) == (True, True, len(body), hashlib.sha256(body).hexdigest())


class TestPublishFailure:
    def test_retried_until_stored(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """A publish that cannot be stored is retried, then the input is discarded."""
        amps.fail_publish.append("store full")
        assert handle(make(memory, amps), amps, "{}")
        (span,) = memory.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert (
            span.status.status_code,
            attributes["error.type"],
            attributes["ampsflow.amps.publish_attempts"],
            attributes["ampsflow.amps.sequence"],
            len(amps.on_topic("external")),
            len(amps.discarded),
        ) == (StatusCode.ERROR, "publish_failed", 2, 1, 1, 1)

    def test_not_discarded_when_stopping(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """Stopping while a publish fails leaves the input undiscarded (redelivered later)."""
        stop = threading.Event()
        stop.set()
        amps.fail_publish.append("store full")
        assert not handle(make(memory, amps, stop), amps, "{}")
        assert amps.discarded == []

    def test_retry_reports_status(self, memory: InMemoryTelemetry, amps: FakeAmps) -> None:
        """While a publish is retried the daemon's STATUS says so."""
        notifier = RecordingNotifier()
        daemon = Daemon("processor", notifier=notifier)
        processor = Processor(
            ProcessorConfig(), memory.telemetry, amps, amps, daemon.stop, daemon=daemon
        )
        amps.fail_publish.append("store full")
        handle(processor, amps, "{}")
        assert ["STATUS=cannot store publishes to external: store full; retrying"] == [
            m for m in notifier.sent if m.startswith("STATUS=")
        ]


class RecordingNotifier(Notifier):
    """A notifier that records what it would send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def _send(self, message: str) -> None:
        self.sent.append(message)


UNSAMPLED_CID = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b700"


class TestFailuresAlwaysTraced:
    """At sampler ratio 0 (and an unsampled parent) only failures leave spans."""

    @pytest.fixture
    def unsampled(self) -> Iterator[InMemoryTelemetry]:
        memory = in_memory_telemetry(
            "processor", TelemetryConfig(exporter="none", sampler_ratio=0.0)
        )
        yield memory
        memory.telemetry.shutdown()

    def test_a_good_unsampled_message_leaves_no_span(
        self, unsampled: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        assert handle(make(unsampled, amps), amps, "{}", correlation_id=UNSAMPLED_CID)
        assert handle(make(unsampled, amps), amps, "{}")
        assert unsampled.exporter.get_finished_spans() == ()

    def test_a_bad_body_leaves_an_error_span_in_a_new_trace(
        self, unsampled: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """New sampled trace linked to the message's context; the dead letter continues it."""
        assert handle(make(unsampled, amps), amps, "not json", correlation_id=UNSAMPLED_CID)
        (span,) = unsampled.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert (span.name, span.status.status_code, span.parent) == (
            PROCESS_SPAN,
            StatusCode.ERROR,
            None,
        )
        assert span.context.trace_flags.sampled
        assert span.context.trace_id != TRACE
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
            (TRACE, SPAN)
        ]
        assert (
            attributes["ampsflow.original_trace_id"],
            attributes["messaging.message.id"],
            attributes["error.type"],
            attributes["ampsflow.dead_letter.topic"],
        ) == (format(TRACE, "032x"), "1|1|", "invalid_json", "internal.dlq")
        (letter,) = amps.on_topic("internal.dlq")
        decoded = decode_correlation_id(letter.correlation_id or "")
        assert (decoded.trace_id, decoded.span_id) == (span.context.trace_id, span.context.span_id)

    def test_a_publish_that_cannot_be_stored_leaves_an_error_span(
        self, unsampled: InMemoryTelemetry, amps: FakeAmps
    ) -> None:
        """The output still continues the original trace; the failure is traced on its own."""
        amps.fail_publish.append("store full")
        assert handle(make(unsampled, amps), amps, "{}", correlation_id=UNSAMPLED_CID)
        (span,) = unsampled.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert (attributes["error.type"], attributes["ampsflow.amps.publish_attempts"]) == (
            "publish_failed",
            2,
        )
        (out,) = amps.on_topic("external")
        assert decode_correlation_id(out.correlation_id or "").trace_id == TRACE
