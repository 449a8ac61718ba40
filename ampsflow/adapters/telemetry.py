"""OpenTelemetry setup for the daemons: traces and metrics from the config.

One call, :func:`setup_telemetry`, builds a tracer provider and a meter provider
for a service:

- Resource ``service.name`` (``OTEL_SERVICE_NAME`` overrides the config) and
  ``service.version``, merged with ``OTEL_RESOURCE_ATTRIBUTES``.
- Sampler ``ParentBased(TraceIdRatioBased(sampler_ratio))``: the marker's
  sampling decision travels in the CorrelationId flags and is followed.
  ``OTEL_TRACES_SAMPLER`` replaces it as the SDK defines. Either way a
  failure is always traced: :func:`failure_span` gives a message whose trace
  was not sampled a new, sampled trace for its ERROR span, linked to the
  original context (:class:`FailuresSampled`).
- A :class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor` sized from the
  config (``OTEL_BSP_*`` variables win over the file when set).
- Exporter ``otlp`` (``http/protobuf`` to ``endpoint + /v1/traces`` and
  ``/v1/metrics``, or ``grpc`` to ``endpoint``), ``console`` or ``none``.
  Spans over ``http/protobuf`` go through
  :class:`~ampsflow.adapters.otlp_wire.OtlpHttpSpanExporter`: the SDK's
  exporter with a direct wire encoder that never holds the GIL for long.
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the per-signal
  ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`` override the config endpoint;
  ``OTEL_METRICS_EXPORTER=none`` turns metric export off (for trace-only
  backends).

:meth:`Telemetry.shutdown` flushes every queued span; services call it last on
SIGTERM so no span is lost when systemd stops them. Spans the batch queue had
to drop and spans whose export failed are counted
(``ampsflow.telemetry.spans.dropped``) and reported by a rate-limited warning.

The trace context of a message travels in the AMPS CorrelationId (see
:mod:`ampsflow.core.codec`); :func:`extract_context` and
:func:`correlation_id_of` translate between it and OpenTelemetry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
    get_current_span,
)
from opentelemetry.util.types import Attributes, AttributeValue

from ampsflow import __version__
from ampsflow.config import TelemetryConfig
from ampsflow.core.codec import TraceParent, decode_correlation_id, encode_correlation_id
from ampsflow.errors import CorrelationIdError

logger = logging.getLogger(__name__)

MESSAGING_SYSTEM = "amps"
"""Value of ``messaging.system`` on every span and metric."""

PROBLEM_ATTRIBUTE = "ampsflow.correlation_id.problem"
"""Span attribute naming why a message's CorrelationId could not be used."""

BOOKMARK_ATTRIBUTE = "ampsflow.amps.bookmark"
"""Span attribute holding the AMPS bookmark of the message."""

ORIGINAL_TRACE_ATTRIBUTE = "ampsflow.original_trace_id"
"""On a failure span that had to start its own trace (its message's trace was
not sampled): the message's trace id, 32 hex digits. The sampler always
samples a span started with this attribute."""

DURATION_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Histogram buckets for the duration metrics (semconv advice, 0.5 ms .. 10 s)."""

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Histogram buckets for ``ampsflow.persister.batch.size``."""

_DROP_WARNING_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Instruments:
    """Every metric instrument the daemons record, built once from a meter.

    Attributes (all carry ``messaging.system`` and ``messaging.operation.name``
    where semantic conventions require it; the caller passes them):
        consumed: ``messaging.client.consumed.messages`` (``{message}``), once per delivery.
        sent: ``messaging.client.sent.messages`` (``{message}``), once per publish attempt.
        process_duration: ``messaging.process.duration`` (``s``), per processed message.
        operation_duration: ``messaging.client.operation.duration`` (``s``), per send.
        rejected: ``ampsflow.messages.rejected`` (``{message}``), bad input by ``error.type``.
        dead_lettered: ``ampsflow.messages.dead_lettered`` (``{message}``).
        correlation_problems: ``ampsflow.correlation_id.problems`` (``{message}``), by problem.
        batch_size: ``ampsflow.persister.batch.size`` (``{message}``), lines per group commit.
        fsync_duration: ``ampsflow.persister.fsync.duration`` (``s``).
        write_errors: ``ampsflow.persister.write.errors`` (``{error}``), by ``error.type``.
        reconnects: ``ampsflow.amps.reconnects`` (``{reconnect}``).
    """

    consumed: Counter
    sent: Counter
    process_duration: Histogram
    operation_duration: Histogram
    rejected: Counter
    dead_lettered: Counter
    correlation_problems: Counter
    batch_size: Histogram
    fsync_duration: Histogram
    write_errors: Counter
    reconnects: Counter

    @classmethod
    def from_meter(cls, meter: Meter) -> Instruments:
        """Create every instrument on ``meter``."""
        return cls(
            consumed=meter.create_counter(
                "messaging.client.consumed.messages",
                unit="{message}",
                description="Messages delivered to the application.",
            ),
            sent=meter.create_counter(
                "messaging.client.sent.messages",
                unit="{message}",
                description="Messages the producer attempted to send to the broker.",
            ),
            process_duration=meter.create_histogram(
                "messaging.process.duration",
                unit="s",
                description="Duration of processing one message.",
            ),
            operation_duration=meter.create_histogram(
                "messaging.client.operation.duration",
                unit="s",
                description="Duration of a messaging operation initiated by the client.",
            ),
            rejected=meter.create_counter(
                "ampsflow.messages.rejected",
                unit="{message}",
                description="Input messages that could not be processed, by error.type.",
            ),
            dead_lettered=meter.create_counter(
                "ampsflow.messages.dead_lettered",
                unit="{message}",
                description="Rejected messages sent to the dead-letter topic.",
            ),
            correlation_problems=meter.create_counter(
                "ampsflow.correlation_id.problems",
                unit="{message}",
                description="Messages whose CorrelationId was missing or invalid.",
            ),
            batch_size=meter.create_histogram(
                "ampsflow.persister.batch.size",
                unit="{message}",
                description="Lines written per group commit.",
            ),
            fsync_duration=meter.create_histogram(
                "ampsflow.persister.fsync.duration",
                unit="s",
                description="Duration of one fdatasync of the JSONL file.",
            ),
            write_errors=meter.create_counter(
                "ampsflow.persister.write.errors",
                unit="{error}",
                description="Failed writes or fsyncs of the JSONL file, by error.type.",
            ),
            reconnects=meter.create_counter(
                "ampsflow.amps.reconnects",
                unit="{reconnect}",
                description="Connections to AMPS lost and re-established.",
            ),
        )


class SpanLossCounter:
    """Counts spans the pipeline lost: queue overflow and failed exports.

    Shared by :class:`_CountingProcessor` and :class:`_CountingExporter`; reports
    through a counter and a warning log at most every 10 seconds.
    """

    def __init__(self, max_queue_size: int) -> None:
        self._lock = threading.Lock()
        self._max_queue_size = max_queue_size
        self.ended = 0
        self.taken = 0
        self.exported = 0
        self.dropped_queue_full = 0
        self.failed_export = 0
        self._reported = 0
        self._last_warning = 0.0
        self._counter: Counter | None = None

    def bind(self, meter: Meter) -> None:
        """Report losses through ``ampsflow.telemetry.spans.dropped`` on ``meter``."""
        self._counter = meter.create_counter(
            "ampsflow.telemetry.spans.dropped",
            unit="{span}",
            description="Spans lost before reaching the backend, by reason.",
        )

    @property
    def lost(self) -> int:
        """Spans dropped on a full queue plus spans whose export failed."""
        return self.dropped_queue_full + self.failed_export

    def on_end(self) -> None:
        """One span ended and goes into the batch queue."""
        with self._lock:
            self.ended += 1
            if self.ended - self.taken - self.dropped_queue_full > self._max_queue_size:
                self.dropped_queue_full += 1
                self._count(1, "queue_full")

    def on_export(self, count: int, ok: bool) -> None:
        """``count`` spans were handed to the exporter, which succeeded or failed."""
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.failed_export += count
                self._count(count, "export_failed")

    def on_take(self, count: int) -> None:
        """``count`` spans left the queue for the exporter."""
        with self._lock:
            self.taken += count

    def _count(self, count: int, reason: str) -> None:
        if self._counter is not None:
            self._counter.add(count, {"reason": reason})
        now = time.monotonic()
        if now - self._last_warning >= _DROP_WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "telemetry lost %d span(s) so far (%d on a full queue, %d in failed exports)",
                self.lost,
                self.dropped_queue_full,
                self.failed_export,
            )


class _CountingExporter(SpanExporter):
    """Wraps an exporter and tells the loss counter what became of each batch."""

    def __init__(self, inner: SpanExporter, losses: SpanLossCounter) -> None:
        self._inner = inner
        self._losses = losses

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._losses.on_take(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:
            self._losses.on_export(len(spans), ok=False)
            raise
        self._losses.on_export(len(spans), ok=result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _CountingProcessor(SpanProcessor):
    """Wraps the batch processor and counts every span that ends."""

    def __init__(self, inner: SpanProcessor, losses: SpanLossCounter) -> None:
        self._inner = inner
        self._losses = losses

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self._losses.on_end()
        self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


@dataclass(slots=True)
class Telemetry:
    """The providers of one service, with its tracer, meter and instruments."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Tracer
    meter: Meter
    instruments: Instruments
    losses: SpanLossCounter
    span_exporter: SpanExporter | None = None
    """The exporter spans go to (``None`` when export is off)."""
    shutdown_timeout_s: float = 10.0
    _shut_down: bool = False

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Export every queued span and metric now; false if it did not finish in time."""
        millis = int((self.shutdown_timeout_s if timeout_s is None else timeout_s) * 1000)
        spans_ok = self.tracer_provider.force_flush(millis)
        metrics_ok = self.meter_provider.force_flush(millis)
        return bool(spans_ok and metrics_ok)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush and stop both providers (idempotent); logs spans lost, if any.

        Call last when a service stops, after its final spans have ended.
        """
        if self._shut_down:
            return
        self._shut_down = True
        timeout = self.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        self.tracer_provider.force_flush(int(timeout * 1000))
        self.tracer_provider.shutdown()
        remaining = max(0.1, deadline - time.monotonic())
        try:
            self.meter_provider.shutdown(timeout_millis=remaining * 1000)
        except Exception:
            logger.exception("metric provider shutdown failed")
        if self.losses.lost:
            logger.warning(
                "telemetry lost %d span(s) (%d on a full queue, %d in failed exports)",
                self.losses.lost,
                self.losses.dropped_queue_full,
                self.losses.failed_export,
            )


ExporterKind = Literal["otlp", "console", "none"]


def setup_telemetry(
    config: TelemetryConfig,
    service_name: str,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    simple_processor: bool = False,
    set_global: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build the tracer and meter providers of ``service_name`` from ``config``.

    Args:
        config: The ``telemetry`` section.
        service_name: ``service.name`` of the resource (``OTEL_SERVICE_NAME`` wins).
        span_exporter: Use this exporter instead of the configured one (tests).
        metric_reader: Use this reader instead of the configured one (tests).
        simple_processor: Export each span as it ends (tests with in-memory
            exporters only; it blocks the caller on a network exporter).
        set_global: Also install the providers as the global ones, so that
            ``trace.get_tracer`` and log correlation see them.
        environ: The environment to read ``OTEL_*`` variables from (default
            ``os.environ``).

    Returns:
        The telemetry handle; call :meth:`Telemetry.shutdown` when stopping.
    """
    env = os.environ if environ is None else environ
    name = env.get("OTEL_SERVICE_NAME") or service_name
    resource = Resource.create({SERVICE_NAME: name, SERVICE_VERSION: __version__})
    if env.get("OTEL_SERVICE_NAME"):
        resource = resource.merge(Resource({SERVICE_NAME: name}))
    if env.get("OTEL_TRACES_SAMPLER"):
        # The SDK reads OTEL_TRACES_SAMPLER(_ARG) when given no sampler.
        base = TracerProvider(resource=resource, shutdown_on_exit=False).sampler
    else:
        base = ParentBased(TraceIdRatioBased(config.sampler_ratio))
    tracer_provider = TracerProvider(resource=resource, sampler=FailuresSampled(base))

    max_queue_size = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", config.max_queue_size)
    losses = SpanLossCounter(max_queue_size)
    exporter = span_exporter if span_exporter is not None else _span_exporter(config, env)
    if exporter is not None:
        counted = _CountingExporter(exporter, losses)
        processor: SpanProcessor
        if simple_processor:
            processor = SimpleSpanProcessor(counted)
        else:
            processor = BatchSpanProcessor(
                counted,
                max_queue_size=max_queue_size,
                schedule_delay_millis=_env_int(
                    env, "OTEL_BSP_SCHEDULE_DELAY", config.schedule_delay_ms
                ),
                max_export_batch_size=min(
                    max_queue_size,
                    _env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", config.max_export_batch_size),
                ),
                export_timeout_millis=_env_int(
                    env, "OTEL_BSP_EXPORT_TIMEOUT", config.export_timeout_ms
                ),
            )
        tracer_provider.add_span_processor(_CountingProcessor(processor, losses))

    readers: list[MetricReader] = []
    if metric_reader is not None:
        readers.append(metric_reader)
    else:
        metric_exporter = _metric_exporter(config, env)
        if metric_exporter is not None:
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter, export_interval_millis=config.metrics_interval_ms
                )
            )
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=readers,
        views=[
            View(
                instrument_name="messaging.*duration",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
            ),
            View(
                instrument_name="ampsflow.persister.fsync.duration",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
            ),
            View(
                instrument_name="ampsflow.persister.batch.size",
                aggregation=ExplicitBucketHistogramAggregation(BATCH_SIZE_BUCKETS),
            ),
        ],
    )
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    meter = meter_provider.get_meter("ampsflow", __version__)
    losses.bind(meter)
    return Telemetry(
        service_name=name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        tracer=tracer_provider.get_tracer("ampsflow", __version__),
        meter=meter,
        instruments=Instruments.from_meter(meter),
        losses=losses,
        span_exporter=exporter,
        shutdown_timeout_s=config.shutdown_timeout_ms / 1000,
    )


class FailuresSampled(Sampler):
    """``inner``'s decisions, except that a failure span is always sampled.

    A span started with :data:`ORIGINAL_TRACE_ATTRIBUTE` (see
    :func:`failure_span`) is recorded and sampled whatever the ratio.
    """

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(  # noqa: PLR0917 - the SDK Sampler signature
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if attributes and ORIGINAL_TRACE_ATTRIBUTE in attributes:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"FailuresSampled{{{self._inner.get_description()}}}"


def failure_span(
    tracer: Tracer,
    span: Span,
    name: str,
    *,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue],
    parent: Context,
    start_time: int | None = None,
) -> Span:
    """The span to record a message's failure on: ``span``, if it is recorded.

    When ``span`` was not sampled (it records nothing), a new span ``name``
    starts a new trace that is always sampled. It links to the message's
    context (``parent`` when valid, else ``span``'s own, unexported one) and
    carries the original trace id as :data:`ORIGINAL_TRACE_ATTRIBUTE` plus
    ``attributes`` (the message id among them). The caller records the failure
    on the returned span and ends it; ending the unsampled ``span`` is harmless.
    """
    if span.is_recording():
        return span
    original = get_current_span(parent).get_span_context()
    if not original.is_valid:
        original = span.get_span_context()
    return tracer.start_span(
        name,
        context=Context(),
        kind=kind,
        attributes={**attributes, ORIGINAL_TRACE_ATTRIBUTE: format(original.trace_id, "032x")},
        links=[Link(original)] if original.is_valid else [],
        start_time=start_time,
    )


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    try:
        parsed = int(value)
    except ValueError:
        logger.warning("ignoring malformed %s=%r, using %d", name, value, default)
        return default
    if parsed <= 0:
        logger.warning("ignoring non-positive %s=%r, using %d", name, value, default)
        return default
    return parsed


def otlp_endpoint(config: TelemetryConfig, env: Mapping[str, str], signal: str) -> str | None:
    """The URL an OTLP exporter of ``signal`` (``traces``/``metrics``) is given.

    ``None`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or the per-signal variable is
    set: the SDK then reads it (appending ``/v1/<signal>`` to the generic one).
    Otherwise ``endpoint + /v1/<signal>`` for http/protobuf, ``endpoint`` for grpc.
    """
    if env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return None
    base = config.endpoint.rstrip("/")
    if config.protocol == "grpc":
        return base
    return f"{base}/v1/{signal}"


def _protocol(config: TelemetryConfig, env: Mapping[str, str], signal: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or config.protocol
    )


def _span_exporter(config: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter | None:
    kind = env.get("OTEL_TRACES_EXPORTER") or config.exporter
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    url = otlp_endpoint(config, env, "traces")
    timeout_s = config.export_timeout_ms / 1000
    if _protocol(config, env, "traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=url, timeout=timeout_s)
    from ampsflow.adapters.otlp_wire import OtlpHttpSpanExporter  # noqa: PLC0415

    return OtlpHttpSpanExporter(endpoint=url, timeout=timeout_s)


def _metric_exporter(config: TelemetryConfig, env: Mapping[str, str]) -> MetricExporter | None:
    kind = env.get("OTEL_METRICS_EXPORTER") or config.exporter
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleMetricExporter()
    url = otlp_endpoint(config, env, "metrics")
    timeout_s = config.export_timeout_ms / 1000
    if _protocol(config, env, "metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter(endpoint=url, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=url, timeout=timeout_s)


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
    """The CorrelationId that makes ``span`` the parent of the next hop."""
    ctx = span.get_span_context()
    return encode_correlation_id(
        TraceParent(version=0, trace_id=ctx.trace_id, span_id=ctx.span_id, flags=ctx.trace_flags)
    )


def record_failure(span: Span, exc: BaseException, error_type: str) -> None:
    """Mark ``span`` failed: status ERROR, ``error.type`` and an exception event."""
    span.set_attribute("error.type", error_type)
    span.record_exception(exc)
    text = str(exc)
    description = text if text.startswith(error_type) else f"{error_type}: {text}"
    span.set_status(Status(StatusCode.ERROR, description))


def messaging_attributes(
    *,
    destination: str,
    operation_type: str,
    operation_name: str,
    message_id: str | None = None,
    body_size: int | None = None,
    bookmark: str | None = None,
) -> dict[str, AttributeValue]:
    """The semantic-convention attributes of an AMPS messaging span.

    ``messaging.system``, ``messaging.destination.name``,
    ``messaging.operation.type`` and ``messaging.operation.name`` always;
    ``messaging.message.id``, ``messaging.message.body.size`` and
    ``ampsflow.amps.bookmark`` when given.
    """
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": destination,
        "messaging.operation.type": operation_type,
        "messaging.operation.name": operation_name,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if body_size is not None:
        attributes["messaging.message.body.size"] = body_size
    if bookmark:
        attributes[BOOKMARK_ATTRIBUTE] = bookmark
    return attributes


def metric_attributes(
    destination: str, operation_name: str, error_type: str | None = None
) -> dict[str, AttributeValue]:
    """The attributes the messaging metrics carry (semconv required set)."""
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.name": operation_name,
        "messaging.destination.name": destination,
    }
    if error_type is not None:
        attributes["error.type"] = error_type
    return attributes
