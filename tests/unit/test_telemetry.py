"""Telemetry setup and the trace-context helpers (in-memory exporters only)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import pytest
from opentelemetry.context import Context
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, get_current_span

from ampsflow.adapters.instruments import messaging_attributes
from ampsflow.adapters.propagation import correlation_id_of, extract_context
from ampsflow.adapters.telemetry import (
    failure_span,
    otlp_endpoint,
    setup_telemetry,
)
from ampsflow.config import TelemetryConfig
from ampsflow.core.codec import decode_correlation_id
from ampsflow.testing import in_memory_telemetry

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
SAMPLED = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"
UNSAMPLED = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b700"
OTHER = "000af7651916cd43dd8448eb211c80319cb7ad6b716920333101"


def parent_ids(header: str | None, payload: str | None) -> tuple[int, int]:
    context, _ = extract_context(header, payload)
    span_context = get_current_span(context).get_span_context()
    return span_context.trace_id, span_context.span_id


class TestExtractContext:
    def test_header_is_preferred(self) -> None:
        """A valid header wins over a valid payload value."""
        assert parent_ids(SAMPLED, OTHER) == (TRACE, SPAN)

    def test_payload_is_the_fallback(self) -> None:
        """Without a header the payload's CorrelationId gives the parent."""
        assert parent_ids(None, SAMPLED) == (TRACE, SPAN)

    def test_dashed_header_is_accepted(self) -> None:
        """A dashed traceparent in the header is decoded too."""
        assert parent_ids("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None) == (
            TRACE,
            SPAN,
        )

    def test_valid_context_has_no_problem(self) -> None:
        """A usable header reports no problem."""
        assert extract_context(SAMPLED, None)[1] is None

    def test_invalid_header_falls_back_and_reports(self) -> None:
        """An invalid header falls back to the payload and names the header's reason."""
        context, problem = extract_context("zz" * 26, SAMPLED)
        span_context = get_current_span(context).get_span_context()
        assert (
            (span_context.trace_id, span_context.span_id),
            problem,
        ) == ((TRACE, SPAN), "header:not_hex")

    def test_missing_gives_new_root(self) -> None:
        """No CorrelationId at all gives an empty context and the problem missing."""
        context, problem = extract_context(None, None)
        assert (
            get_current_span(context).get_span_context().is_valid,
            problem,
        ) == (False, "missing")

    def test_invalid_payload_only(self) -> None:
        """Only an invalid payload value gives a new root and its reason."""
        context, problem = extract_context("", "00" * 26)
        assert (
            get_current_span(context).get_span_context().is_valid,
            problem,
        ) == (False, "payload:zero_trace_id")

    def test_extracted_context_is_remote_with_flags(self) -> None:
        """The extracted parent is remote and keeps the sampled flag."""
        context, _ = extract_context(UNSAMPLED, None)
        span_context = get_current_span(context).get_span_context()
        assert (span_context.is_remote, span_context.trace_flags.sampled) == (True, False)


class TestSpans:
    def test_child_span_parentage(self) -> None:
        """A span started in the extracted context is its child, in the same trace."""
        memory = in_memory_telemetry()
        context, _ = extract_context(SAMPLED, None)
        with memory.telemetry.tracer.start_as_current_span(
            "process-message", context=context, kind=SpanKind.CONSUMER
        ):
            pass
        (span,) = memory.spans()
        assert (
            span.context.trace_id,
            span.parent.span_id if span.parent else None,
            span.kind,
        ) == (TRACE, SPAN, SpanKind.CONSUMER)

    def test_correlation_id_of_names_the_span(self) -> None:
        """correlation_id_of encodes the span's own trace id, span id and flags."""
        memory = in_memory_telemetry()
        context, _ = extract_context(SAMPLED, None)
        with memory.telemetry.tracer.start_as_current_span("s", context=context) as span:
            decoded = decode_correlation_id(correlation_id_of(span))
            expected = span.get_span_context()
        assert (expected.trace_id, expected.span_id, True) == (
            decoded.trace_id,
            decoded.span_id,
            decoded.sampled,
        )

    def test_unsampled_parent_is_followed(self) -> None:
        """ParentBased sampling: a child of an unsampled parent is not recorded."""
        memory = in_memory_telemetry()
        context, _ = extract_context(UNSAMPLED, None)
        with memory.telemetry.tracer.start_as_current_span("s", context=context) as span:
            recording = span.is_recording()
        assert (recording, memory.spans()) == (False, [])

    def test_sampled_parent_beats_ratio_zero(self) -> None:
        """ParentBased sampling: a sampled parent is followed even at ratio 0."""
        memory = in_memory_telemetry(config=TelemetryConfig(exporter="none", sampler_ratio=0.0))
        context, _ = extract_context(SAMPLED, None)
        with memory.telemetry.tracer.start_as_current_span("s", context=context):
            pass
        assert len(memory.spans()) == 1

    def test_ratio_zero_drops_roots(self) -> None:
        """Ratio 0 records no new root span."""
        memory = in_memory_telemetry(config=TelemetryConfig(exporter="none", sampler_ratio=0.0))
        with memory.telemetry.tracer.start_as_current_span("s"):
            pass
        assert memory.spans() == []

    def test_resource_names_the_service(self) -> None:
        """Spans carry service.name from the setup call."""
        memory = in_memory_telemetry("processor")
        with memory.telemetry.tracer.start_as_current_span("s"):
            pass
        assert memory.spans()[0].resource.attributes["service.name"] == "processor"

    def test_messaging_attributes(self) -> None:
        """The messaging helper yields the semconv attribute names and values."""
        expected = {
            "messaging.system": "amps",
            "messaging.destination.name": "internal",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": "1|2|",
            "messaging.message.body.size": 7,
            "ampsflow.amps.bookmark": "1|2|",
        }
        assert expected == messaging_attributes(
            destination="internal",
            operation_type="process",
            operation_name="process",
            message_id="1|2|",
            body_size=7,
            bookmark="1|2|",
        )


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return None


class TestSetup:
    def test_service_name_from_env_wins(self) -> None:
        """OTEL_SERVICE_NAME overrides the configured service name."""
        telemetry = setup_telemetry(
            TelemetryConfig(exporter="none"),
            "processor",
            set_global=False,
            environ={"OTEL_SERVICE_NAME": "renamed"},
        )
        with telemetry.tracer.start_as_current_span("s") as span:
            resource = span.resource  # type: ignore[attr-defined]
        telemetry.shutdown()
        assert (
            telemetry.service_name,
            resource.attributes["service.name"],
        ) == ("renamed", "renamed")

    def test_metrics_reach_a_reader_and_are_not_recorded_without_one(self) -> None:
        """With a reader a duration arrives; with none, the instruments are no-ops."""
        reader = InMemoryMetricReader()
        read = setup_telemetry(
            TelemetryConfig(exporter="none"),
            "processor",
            metric_reader=reader,
            set_global=False,
            environ={},
        )
        read.instruments.process_duration.record(0.002, {"messaging.system": "amps"})
        data = reader.get_metrics_data()
        assert data is not None
        counts = {
            metric.name: point.count
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            for point in metric.data.data_points
        }
        unread = setup_telemetry(
            TelemetryConfig(exporter="none"), "processor", set_global=False, environ={}
        )
        unread.instruments.process_duration.record(0.002, {"messaging.system": "amps"})
        read.shutdown()
        unread.shutdown()
        assert counts == {"messaging.process.duration": 1}
        assert isinstance(unread.meter, NoOpMeter)

    def test_shutdown_flushes_the_batch_queue(self) -> None:
        """shutdown exports spans still waiting in the batch processor."""
        exporter = InMemorySpanExporter()
        config = TelemetryConfig(exporter="none", schedule_delay_ms=3_600_000)
        telemetry = setup_telemetry(
            config, "processor", span_exporter=exporter, set_global=False, environ={}
        )
        with telemetry.tracer.start_as_current_span("queued"):
            pass
        telemetry.shutdown(timeout_s=5)
        assert [s.name for s in exporter.get_finished_spans()] == ["queued"]

    def test_failed_exports_are_counted(self) -> None:
        """Spans in a failed export are counted as lost."""
        telemetry = setup_telemetry(
            TelemetryConfig(exporter="none"),
            "processor",
            span_exporter=FailingExporter(),
            simple_processor=True,
            set_global=False,
            environ={},
        )
        for _ in range(3):
            with telemetry.tracer.start_as_current_span("s"):
                pass
        telemetry.shutdown()
        assert telemetry.losses.failed_export == 3

    def test_queue_overflow_is_counted(self) -> None:
        """Spans the full batch queue drops are counted, matching what never arrives."""
        exporter = BlockingExporter()
        config = TelemetryConfig(
            exporter="none", max_queue_size=4, max_export_batch_size=4, schedule_delay_ms=3_600_000
        )
        telemetry = setup_telemetry(
            config, "processor", span_exporter=exporter, set_global=False, environ={}
        )
        for _ in range(4):
            with telemetry.tracer.start_as_current_span("s"):
                pass
        assert exporter.entered.wait(10), "the batch processor never exported"
        for _ in range(5):
            with telemetry.tracer.start_as_current_span("s"):
                pass
        exporter.release.set()
        telemetry.shutdown(timeout_s=10)
        assert (telemetry.losses.dropped_queue_full, exporter.count) == (1, 8)


class BlockingExporter(SpanExporter):
    """Blocks its first export until released, counting exported spans."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


class TestOtlpEndpoint:
    def test_http_appends_signal_path(self) -> None:
        """http/protobuf sends to endpoint + /v1/traces."""
        config = TelemetryConfig(endpoint="http://collector:4318/")
        assert otlp_endpoint(config, {}, "traces") == "http://collector:4318/v1/traces"

    def test_grpc_uses_endpoint(self) -> None:
        """grpc sends to the endpoint itself."""
        config = TelemetryConfig(protocol="grpc", endpoint="http://collector:4317")
        assert otlp_endpoint(config, {}, "metrics") == "http://collector:4317"

    def test_env_endpoint_overrides(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT leaves the URL to the SDK."""
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://elsewhere:4318"}
        assert otlp_endpoint(TelemetryConfig(), env, "traces") is None

    def test_signal_env_endpoint_overrides(self) -> None:
        """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT leaves the traces URL to the SDK."""
        env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://elsewhere:4318/v1/traces"}
        assert otlp_endpoint(TelemetryConfig(), env, "traces") is None


class TestFailureSpans:
    def test_a_failure_span_is_sampled_whatever_the_sampler(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_TRACES_SAMPLER=always_off drops spans, but not a message's failure span."""
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
        exporter = InMemorySpanExporter()
        telemetry = setup_telemetry(
            TelemetryConfig(exporter="none"),
            "processor",
            span_exporter=exporter,
            simple_processor=True,
            set_global=False,
            environ=dict(os.environ),
        )
        parent, _ = extract_context(SAMPLED, None)
        span = telemetry.tracer.start_span("process-message", context=parent)
        failed = failure_span(
            telemetry.tracer,
            span,
            "process-message",
            kind=SpanKind.CONSUMER,
            attributes={"messaging.message.id": "1|2|"},
            parent=parent,
        )
        assert failed is not span
        failed.end()
        span.end()
        (exported,) = exporter.get_finished_spans()
        assert exported.attributes == {
            "messaging.message.id": "1|2|",
            "ampsflow.original_trace_id": format(TRACE, "032x"),
        }
        assert [(link.context.trace_id, link.context.span_id) for link in exported.links] == [
            (TRACE, SPAN)
        ]

    def test_a_recorded_span_is_its_own_failure_span(self) -> None:
        memory = in_memory_telemetry()
        span = memory.telemetry.tracer.start_span("persist-message")
        same = failure_span(
            memory.telemetry.tracer,
            span,
            "persist-message",
            kind=SpanKind.CONSUMER,
            attributes={},
            parent=Context(),
        )
        assert same is span
