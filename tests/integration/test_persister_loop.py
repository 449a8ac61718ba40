"""The persister loop in-process: fake AMPS, real JSONL file, in-memory telemetry."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from ampsflow.adapters.sink import JsonlSink, OsSyscalls
from ampsflow.adapters.systemd import Notifier
from ampsflow.adapters.telemetry import ORIGINAL_TRACE_ATTRIBUTE
from ampsflow.config import TelemetryConfig
from ampsflow.core.codec import TraceParent, encode_correlation_id
from ampsflow.lifecycle import Daemon
from ampsflow.messaging import Received
from ampsflow.services.persister import Persister
from ampsflow.testing import FakeAmps, InMemoryTelemetry, in_memory_telemetry

WHEN = datetime(2026, 11, 24, 16, 30, tzinfo=UTC)
PARENT = TraceParent(version=0, trace_id=0xABC, span_id=0xDEF, flags=1)
OTHER = TraceParent(version=0, trace_id=0x123, span_id=0x456, flags=1)
UNSAMPLED = TraceParent(version=0, trace_id=0xABC, span_id=0xDEF, flags=0)


def _parent_span_id(span: ReadableSpan) -> int | None:
    """The span id of ``span``'s parent, ``None`` for a root span."""
    return span.parent.span_id if span.parent is not None else None


class FailingSyscalls(OsSyscalls):
    """Real system calls whose next ``failures`` fdatasyncs fail with ``code``."""

    def __init__(self) -> None:
        self.failures = 0
        self.code = errno.ENOSPC

    def fdatasync(self, fd: int) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(self.code, os.strerror(self.code))
        super().fdatasync(fd)


class RecordingNotifier(Notifier):
    """A notifier that remembers every STATUS= line (and sends nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    def status(self, status: str) -> None:
        self.statuses.append(status)


class Harness:
    """A persister over a fake broker and a real file, run on a thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_batch_lines: int = 100,
        persister: type[Persister] = Persister,
        max_message_bytes: int = 16 * 1024 * 1024,
        sampler_ratio: float = 1.0,
        max_batch_delay_s: float = 0.005,
    ) -> None:
        self.path = path
        self.amps = FakeAmps()
        self.syscalls = FailingSyscalls()
        self.sink = JsonlSink(path, syscalls=self.syscalls)
        self.sink.open()
        self.otel: InMemoryTelemetry = in_memory_telemetry(
            "persister", TelemetryConfig(exporter="none", sampler_ratio=sampler_ratio)
        )
        self.notifier = RecordingNotifier()
        self.daemon = Daemon("persister", notifier=self.notifier)
        self.persister = persister(
            source=self.amps,
            sink=self.sink,
            telemetry=self.otel.telemetry,
            topic="external",
            max_batch_lines=max_batch_lines,
            max_batch_delay_s=max_batch_delay_s,
            retry_max_delay_s=0.01,
            drain_timeout_s=0.0,
            max_message_bytes=max_message_bytes,
            now=lambda: WHEN,
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.persister.run, args=(self.daemon,))
        self._thread.start()

    def deliver(self, body: object, *, cid: TraceParent | None = None) -> None:
        text = body if isinstance(body, str | bytes) else json.dumps(body)
        header = encode_correlation_id(cid) if cid is not None else None
        self.amps.deliver(text, topic="external", correlation_id=header)

    def wait_discarded(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.amps.discarded) < count:
            assert time.monotonic() < deadline, f"only {len(self.amps.discarded)} discarded"
            time.sleep(0.005)

    def stop(self) -> None:
        self.daemon.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            assert not self._thread.is_alive()
        self.sink.close()

    def lines(self, path: Path | None = None) -> list[dict[str, object]]:
        text = (path or self.path).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "messages.jsonl")
    try:
        yield h
    finally:
        h.stop()


class TestWrite:
    def test_messages_become_lines_in_order(self, harness: Harness) -> None:
        """Each message is one line, in delivery order, with processed kept."""
        harness.start()
        for i in range(5):
            harness.deliver({"id": f"m{i}", "processed": True})
        harness.wait_discarded(5)
        expected = [(f"m{i}", True) for i in range(5)]
        assert expected == [(line["id"], line["processed"]) for line in harness.lines()]

    def test_line_carries_provenance_of_its_span(self, harness: Harness) -> None:
        """_ampsflow holds the span's ids, topic, bookmark and time."""
        harness.start()
        harness.deliver({"id": "m1"}, cid=PARENT)
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = {
            "trace_id": format(span.context.trace_id, "032x"),
            "span_id": format(span.context.span_id, "016x"),
            "topic": "external",
            "bookmark": "1|1|",
            "persisted_at": "2026-11-24T16:30:00.000000Z",
        }
        assert expected == harness.lines()[0]["_ampsflow"]

    def test_every_message_is_discarded_in_order(self, harness: Harness) -> None:
        """All messages are discarded from the bookmark store, in delivery order."""
        harness.start()
        for i in range(7):
            harness.deliver({"id": f"m{i}"})
        harness.wait_discarded(7)
        expected = [f"1|{i}|" for i in range(1, 8)]
        assert expected == [m.bookmark for m in harness.amps.discarded]


class TestBatching:
    def test_batches_are_at_most_max_lines(self, tmp_path: Path) -> None:
        """Seven queued messages with max_batch_lines=3 take three commits."""
        h = Harness(tmp_path / "m.jsonl", max_batch_lines=3)
        try:
            for i in range(7):
                h.deliver({"id": f"m{i}"})
            h.start()
            h.wait_discarded(7)
        finally:
            h.stop()
        expected = (3, 7)
        assert expected == (h.persister.batches, len(h.lines()))

    def test_consumed_and_process_duration_are_recorded(self, harness: Harness) -> None:
        """Every delivery counts as consumed and records a process duration."""
        for i in range(5):
            harness.deliver({"id": f"m{i}"})
        harness.start()
        harness.wait_discarded(5)
        durations = harness.otel.metric_points("messaging.process.duration")
        expected = (5, 5)
        actual = (
            harness.otel.counter_total("messaging.client.consumed.messages"),
            sum(p.count for p in durations),
        )
        assert expected == actual

    def test_batch_size_and_fsync_metrics_are_recorded(self, harness: Harness) -> None:
        """Each commit records its size and fsync duration."""
        for i in range(4):
            harness.deliver({"id": f"m{i}"})
        harness.start()
        harness.wait_discarded(4)
        sizes = harness.otel.metric_points("ampsflow.persister.batch.size")
        fsyncs = harness.otel.metric_points("ampsflow.persister.fsync.duration")
        expected = (4, harness.persister.batches)
        assert expected == (sum(p.sum for p in sizes), sum(p.count for p in fsyncs))


class TestSpans:
    def test_span_is_consumer_child_of_header_context(self, harness: Harness) -> None:
        """persist-message is a CONSUMER span whose parent is the CorrelationId's span."""
        harness.start()
        harness.deliver({"id": "m1"}, cid=PARENT)
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = (SpanKind.CONSUMER, 0xABC, 0xDEF)
        assert expected == (span.kind, span.context.trace_id, _parent_span_id(span))

    def test_payload_correlation_id_is_the_fallback(self, harness: Harness) -> None:
        """Without the header, the payload's CorrelationId gives the parent."""
        harness.start()
        harness.deliver({"id": "m1", "CorrelationId": encode_correlation_id(OTHER)})
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = (0x123, 0x456)
        assert expected == (span.context.trace_id, _parent_span_id(span))

    def test_header_wins_over_payload(self, harness: Harness) -> None:
        """With both, the header's context is the parent."""
        harness.start()
        harness.deliver({"id": "m1", "CorrelationId": encode_correlation_id(OTHER)}, cid=PARENT)
        harness.wait_discarded(1)
        expected = 0xDEF
        assert expected == _parent_span_id(harness.otel.span_named("persist-message")[0])

    def test_semconv_attributes(self, harness: Harness) -> None:
        """The span carries the messaging attributes and the bookmark."""
        harness.start()
        harness.deliver({"id": "m1"}, cid=PARENT)
        harness.wait_discarded(1)
        attributes = dict(harness.otel.span_named("persist-message")[0].attributes or {})
        expected = {
            "messaging.system": "amps",
            "messaging.destination.name": "external",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": "1|1|",
            "ampsflow.amps.bookmark": "1|1|",
            "ampsflow.message.id": "m1",
        }
        assert expected == {k: attributes.get(k) for k in expected}

    def test_with_no_delay_every_queued_message_joins_one_commit(self, tmp_path: Path) -> None:
        """max_batch_delay 0 (the default) commits at once, with everything already queued."""
        h = Harness(tmp_path / "m.jsonl", max_batch_delay_s=0.0)
        try:
            for i in range(5):
                h.deliver({"id": f"m{i}"})
            h.start()
            h.wait_discarded(5)
            assert (h.persister.batches, [line["id"] for line in h.lines()]) == (
                1,
                [f"m{i}" for i in range(5)],
            )
            h.deliver({"id": "m5"})
            h.wait_discarded(6)
            assert h.persister.batches == 2
        finally:
            h.stop()

    def test_batch_facts_are_told_once_per_batch(self, harness: Harness) -> None:
        """Every span has its fsync event; the commit's facts are on the first one only."""
        for i in range(3):
            harness.deliver({"id": f"m{i}"}, cid=PARENT)
        harness.start()
        harness.wait_discarded(3)
        spans = harness.otel.span_named("persist-message")
        events = [e for s in spans for e in s.events if e.name == "fsync"]
        assert (len(events), harness.persister.batches) == (3, 1)
        assert [dict(e.attributes or {}) for e in events[1:]] == [{}, {}]
        assert events[0].attributes == {
            "ampsflow.persister.batch.lines": 3,
            "ampsflow.persister.fsync.duration_s": events[0].attributes[
                "ampsflow.persister.fsync.duration_s"
            ],
        }
        assert all(events[0].timestamp <= (s.end_time or 0) for s in spans)

    def test_span_ends_after_fsync_event(self, harness: Harness) -> None:
        """The span has an fsync event and ends no earlier than it."""
        harness.start()
        harness.deliver({"id": "m1"}, cid=PARENT)
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        events = [e for e in span.events if e.name == "fsync"]
        expected = (1, True)
        assert expected == (len(events), events[0].timestamp <= (span.end_time or 0))

    def test_missing_correlation_id_starts_a_new_trace(self, harness: Harness) -> None:
        """No CorrelationId anywhere: a root span with the problem recorded."""
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = (None, "missing")
        actual = (span.parent, (span.attributes or {}).get("ampsflow.correlation_id.problem"))
        assert expected == actual


class TestBadInput:
    def test_invalid_json_is_kept_raw(self, harness: Harness) -> None:
        """A body that is not JSON is written with the raw text and the reason."""
        harness.start()
        harness.deliver("{oops")
        harness.wait_discarded(1)
        meta = harness.lines()[0]["_ampsflow"]
        assert isinstance(meta, dict)
        expected = ("{oops", "invalid_json")
        assert expected == (meta["raw"], meta["error"])

    def test_invalid_json_span_is_error(self, harness: Harness) -> None:
        """The span of a bad body is ERROR with error.type and an exception event."""
        harness.start()
        harness.deliver("[1, 2]")
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = (StatusCode.ERROR, "not_an_object", True)
        actual = (
            span.status.status_code,
            (span.attributes or {}).get("error.type"),
            any(e.name == "exception" for e in span.events),
        )
        assert expected == actual

    def test_bad_body_is_counted_and_good_traffic_continues(self, harness: Harness) -> None:
        """The rejected counter counts it; the next good message is written."""
        harness.start()
        harness.deliver("not json")
        harness.deliver({"id": "ok"})
        harness.wait_discarded(2)
        expected = (1, "ok")
        actual = (
            harness.otel.counter_total("ampsflow.messages.rejected"),
            harness.lines()[1].get("id"),
        )
        assert expected == actual

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            ('{"id": NaN}', "invalid_json"),
            ('{"id": "inf", "x": 1e999}', "number_out_of_range"),
            ('{"id": "dup", "a": 1, "a": 2}', "duplicate_key"),
            ('{"id": "sur", "s": "\\ud800"}', "invalid_unicode"),
        ],
    )
    def test_processor_rules_apply_and_the_body_is_kept_raw(
        self, harness: Harness, body: str, reason: str
    ) -> None:
        """The processor's parsing rules apply here too; a rejected body is kept raw, not lost."""
        harness.start()
        harness.deliver(body)
        harness.wait_discarded(1)
        line = harness.path.read_bytes()
        meta = json.loads(line)["_ampsflow"]
        assert (meta["raw"], meta["error"], line.decode("utf-8").count("\n")) == (body, reason, 1)

    def test_body_over_max_message_bytes_is_kept_raw(self, tmp_path: Path) -> None:
        """A body over persister.max_message_bytes is not parsed but still written, raw."""
        h = Harness(tmp_path / "m.jsonl", max_message_bytes=4096)
        body = json.dumps({"id": "big", "pad": "x" * 5000})
        try:
            h.start()
            h.deliver(body)
            h.deliver({"id": "ok"})
            h.wait_discarded(2)
        finally:
            h.stop()
        lines = h.lines()
        meta = lines[0]["_ampsflow"]
        assert isinstance(meta, dict)
        assert (meta["raw"], meta["error"], lines[1]["id"]) == (body, "too_large", "ok")

    def test_unexpected_error_keeps_message_raw_and_continues(self, tmp_path: Path) -> None:
        """A message that trips an unexpected error is kept raw; the next one is written."""

        class Exploding(Persister):
            def _prepare(self, received: Received, batch_keys: set[str]) -> Any:
                if received.body == b"boom":
                    raise RuntimeError("bug")
                return super()._prepare(received, batch_keys)

        h = Harness(tmp_path / "m.jsonl", persister=Exploding)
        try:
            h.start()
            h.deliver("boom")
            h.deliver({"id": "ok"})
            h.wait_discarded(2)
        finally:
            h.stop()
        lines = h.lines()
        expected = ("internal_error", "ok")
        assert expected == (lines[0]["_ampsflow"]["error"], lines[1]["id"])  # type: ignore[index]


class TestReplays:
    def test_same_id_twice_is_written_once(self, harness: Harness) -> None:
        """A re-published message (same id, new bookmark) is skipped but discarded."""
        harness.start()
        harness.deliver({"id": "m1"})
        harness.deliver({"id": "m1"})
        harness.deliver({"id": "m2"})
        harness.wait_discarded(3)
        expected = (["m1", "m2"], 1)
        actual = (
            [line["id"] for line in harness.lines()],
            harness.otel.counter_total("ampsflow.persister.duplicates"),
        )
        assert expected == actual

    def test_lines_already_in_file_are_not_written_again(self, tmp_path: Path) -> None:
        """After a restart, replays of messages already in the file are skipped."""
        first = Harness(tmp_path / "m.jsonl")
        try:
            first.start()
            first.deliver({"id": "m1"})
            first.wait_discarded(1)
        finally:
            first.stop()
        second = Harness(tmp_path / "m.jsonl")
        try:
            second.start()
            second.deliver({"id": "m1"})
            second.deliver({"id": "m2"})
            second.wait_discarded(2)
        finally:
            second.stop()
        expected = ["m1", "m2"]
        assert expected == [line["id"] for line in second.lines()]


class TestFailuresAlwaysTraced:
    """At sampler ratio 0 (and an unsampled parent) only failures leave spans."""

    @pytest.fixture
    def unsampled(self, tmp_path: Path) -> Iterator[Harness]:
        h = Harness(tmp_path / "messages.jsonl", sampler_ratio=0.0)
        try:
            yield h
        finally:
            h.stop()

    def test_a_good_unsampled_message_leaves_no_span(self, unsampled: Harness) -> None:
        unsampled.start()
        unsampled.deliver({"id": "m1"}, cid=UNSAMPLED)
        unsampled.deliver({"id": "m2"})
        unsampled.wait_discarded(2)
        assert unsampled.otel.exporter.get_finished_spans() == ()
        assert [line["id"] for line in unsampled.lines()] == ["m1", "m2"]

    def test_a_bad_body_leaves_an_error_span_in_a_new_trace(self, unsampled: Harness) -> None:
        """New sampled trace, linked to the message's context, carrying its trace id."""
        unsampled.start()
        unsampled.deliver("not json", cid=UNSAMPLED)
        unsampled.wait_discarded(1)
        (span,) = unsampled.otel.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert span.name == "persist-message"
        assert span.status.status_code is StatusCode.ERROR
        assert span.context.trace_flags.sampled
        assert span.parent is None
        assert span.context.trace_id != UNSAMPLED.trace_id
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
            (UNSAMPLED.trace_id, UNSAMPLED.span_id)
        ]
        assert attributes[ORIGINAL_TRACE_ATTRIBUTE] == format(UNSAMPLED.trace_id, "032x")
        assert (attributes["messaging.message.id"], attributes["error.type"]) == (
            "1|1|",
            "invalid_json",
        )
        (line,) = unsampled.lines()
        assert line["_ampsflow"]["trace_id"] == format(span.context.trace_id, "032x")

    def test_a_failed_fsync_leaves_an_error_span(self, unsampled: Harness) -> None:
        unsampled.syscalls.failures = 2
        unsampled.start()
        unsampled.deliver({"id": "m1"}, cid=UNSAMPLED)
        unsampled.wait_discarded(1)
        (span,) = unsampled.otel.exporter.get_finished_spans()
        attributes = span.attributes or {}
        assert (span.status.status_code, attributes["error.type"]) == (StatusCode.ERROR, "ENOSPC")
        assert attributes[ORIGINAL_TRACE_ATTRIBUTE] == format(UNSAMPLED.trace_id, "032x")
        assert attributes["ampsflow.message.id"] == "m1"
        assert span.context.trace_id != UNSAMPLED.trace_id


class TestWriteFailures:
    def test_failed_fsync_is_retried_and_written_once(self, harness: Harness) -> None:
        """After two failed fsyncs the batch is written exactly once."""
        harness.syscalls.failures = 2
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        expected = ["m1"]
        assert expected == [line["id"] for line in harness.lines()]

    def test_failure_marks_span_error_with_exception(self, harness: Harness) -> None:
        """The span of a message whose fsync failed is ERROR with error.type ENOSPC."""
        harness.syscalls.failures = 1
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        span = harness.otel.span_named("persist-message")[0]
        expected = (StatusCode.ERROR, "ENOSPC", 1)
        actual = (
            span.status.status_code,
            (span.attributes or {}).get("error.type"),
            sum(1 for e in span.events if e.name == "exception"),
        )
        assert expected == actual

    def test_failure_and_recovery_are_reported_as_status(self, harness: Harness) -> None:
        """STATUS= names the error while failing, then says it is persisting again."""
        harness.syscalls.failures = 1
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        statuses = harness.notifier.statuses
        expected = (True, f"persisting external to {harness.path}")
        assert expected == ("(ENOSPC)" in statuses[0], statuses[-1])

    def test_failures_are_counted(self, harness: Harness) -> None:
        """Each failed attempt counts in ampsflow.persister.write.errors."""
        harness.syscalls.failures = 3
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        expected = 3
        assert expected == harness.otel.counter_total("ampsflow.persister.write.errors")

    def test_nothing_is_discarded_when_stop_gives_up(self, harness: Harness) -> None:
        """A stop while the disk keeps failing discards nothing."""
        harness.syscalls.failures = 10**9
        harness.deliver({"id": "m1"})
        harness.daemon.stop.set()
        batch = harness.persister.collect(threading.Event())
        done = harness.persister.commit(batch, harness.daemon)
        expected: tuple[bool, list[object], int] = (False, [], 1)
        actual = (done, harness.amps.discarded, harness.persister.stopped_with_unwritten)
        assert expected == actual


class TestReopen:
    def test_sighup_after_rename_writes_to_new_file(self, harness: Harness) -> None:
        """After a rename and SIGHUP, new lines go to a new file at the path."""
        harness.start()
        harness.deliver({"id": "m1"})
        harness.wait_discarded(1)
        rotated = harness.path.with_suffix(".1")
        harness.path.rename(rotated)
        harness.daemon.handle_signal(signal.SIGHUP)
        harness.deliver({"id": "m2"})
        harness.wait_discarded(2)
        expected = (["m1"], ["m2"])
        actual = (
            [line["id"] for line in harness.lines(rotated)],
            [line["id"] for line in harness.lines()],
        )
        assert expected == actual
