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
  exporter with a direct wire encoder that never holds the GIL for long,
  and the tracer starts the services' spans as
  :class:`~ampsflow.adapters.lean_spans.LightSpan` for it.
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the per-signal
  ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT`` override the config endpoint;
  ``OTEL_METRICS_EXPORTER=none`` turns metric export off (for trace-only
  backends); with no metric reader at all, the instruments are the API's
  no-op ones and cost nothing per message.

:meth:`Telemetry.shutdown` flushes every queued span; services call it last on
SIGTERM so no span is lost when systemd stops them. Spans the batch queue had
to drop and spans whose export failed are counted
(``ampsflow.telemetry.spans.dropped``, :mod:`ampsflow.adapters.span_loss`). An
unreachable collector is logged once when export starts failing and once when it
recovers, with the count lost in between (:mod:`ampsflow.adapters.export_health`).

The rest of the telemetry is one module per concept: the instruments and span
attributes in :mod:`ampsflow.adapters.instruments`, the trace context carried
in the AMPS CorrelationId in :mod:`ampsflow.adapters.propagation`, the span
encoder in :mod:`ampsflow.adapters.otlp_wire`, the tracer's cheaper spans in
:mod:`ampsflow.adapters.lean_spans`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter, NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Tracer,
    TraceState,
    get_current_span,
)
from opentelemetry.util.types import Attributes, AttributeValue

from ampsflow import __version__
from ampsflow.adapters.export_health import HealthReportingMetricExporter
from ampsflow.adapters.instruments import BATCH_SIZE_BUCKETS, DURATION_BUCKETS_S, Instruments
from ampsflow.adapters.lean_spans import LeanTracer
from ampsflow.adapters.sampling import RatioSampler
from ampsflow.adapters.span_loss import CountingExporter, CountingProcessor, SpanLossCounter
from ampsflow.config import TelemetryConfig

logger = logging.getLogger(__name__)


ORIGINAL_TRACE_ATTRIBUTE = "ampsflow.original_trace_id"
"""On a failure span that had to start its own trace (its message's trace was
not sampled): the message's trace id, 32 hex digits. The sampler always
samples a span started with this attribute."""


@dataclass(slots=True)
class Telemetry:
    """The providers of one service, with its tracer, meter and instruments."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Tracer
    """The service's tracer: a :class:`~ampsflow.adapters.lean_spans.LeanTracer`
    (the SDK's no-op tracer when ``OTEL_SDK_DISABLED`` is set)."""
    meter: Meter
    instruments: Instruments
    losses: SpanLossCounter
    span_exporter: SpanExporter | None = None
    """The exporter spans go to (``None`` when export is off)."""
    shutdown_timeout_s: float = 10.0
    sampler: RatioSampler | None = None
    """The ratio sampler a reload adjusts (``None`` when ``OTEL_TRACES_SAMPLER`` is set)."""
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
    ratio_sampler: RatioSampler | None = None
    if env.get("OTEL_TRACES_SAMPLER"):
        # The SDK reads OTEL_TRACES_SAMPLER(_ARG) when given no sampler.
        base = TracerProvider(resource=resource, shutdown_on_exit=False).sampler
    else:
        # ParentBased(TraceIdRatioBased(ratio)) whose ratio a reload may change.
        base = ratio_sampler = RatioSampler(config.sampler_ratio)
    tracer_provider = TracerProvider(resource=resource, sampler=FailuresSampled(base))

    max_queue_size = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", config.max_queue_size)
    losses = SpanLossCounter(max_queue_size)
    exporter = span_exporter if span_exporter is not None else _span_exporter(config, env)
    light_processor: SpanProcessor | None = None  # spans only ampsflow's encoder reads
    if exporter is not None:
        counted = CountingExporter(exporter, losses)
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
        counting = CountingProcessor(processor, losses)
        tracer_provider.add_span_processor(counting)
        from ampsflow.adapters.otlp_wire import OtlpHttpSpanExporter  # noqa: PLC0415

        if isinstance(exporter, OtlpHttpSpanExporter) and exporter.encodes_light_spans:
            light_processor = counting

    readers: list[MetricReader] = []
    if metric_reader is not None:
        readers.append(metric_reader)
    else:
        metric_exporter = _metric_exporter(config, env)
        if metric_exporter is not None:
            readers.append(
                PeriodicExportingMetricReader(
                    HealthReportingMetricExporter(metric_exporter),
                    export_interval_millis=config.metrics_interval_ms,
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
    # With no reader nothing is ever read: the API's no-op meter costs nothing per
    # measurement, where the SDK's still checks the attributes of each (~9 µs a
    # histogram record on the 2-core VM, two per processed message).
    meter = (
        meter_provider.get_meter("ampsflow", __version__)
        if readers
        else NoOpMeter("ampsflow", __version__)
    )
    losses.bind(meter)
    tracer = tracer_provider.get_tracer("ampsflow", __version__)
    if isinstance(tracer, SdkTracer):  # not when OTEL_SDK_DISABLED=true
        tracer = LeanTracer(tracer, light_processor)
    return Telemetry(
        service_name=name,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        tracer=tracer,
        meter=meter,
        instruments=Instruments.from_meter(meter),
        losses=losses,
        span_exporter=exporter,
        shutdown_timeout_s=config.shutdown_timeout_ms / 1000,
        sampler=ratio_sampler,
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
