"""Span-loss accounting: spans dropped on a full queue or lost in a failed export.

:class:`CountingProcessor` wraps the batch span processor and
:class:`CountingExporter` wraps the exporter; both report to one
:class:`SpanLossCounter`, which counts ``ampsflow.telemetry.spans.dropped`` by
``reason`` and logs a rate-limited warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Meter
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ampsflow.adapters.export_health import EXPORT_HEALTH

logger = logging.getLogger(__name__)


DROP_WARNING_INTERVAL_S = 10.0
"""Shortest time between two warnings about lost spans."""


class SpanLossCounter:
    """Counts spans the pipeline lost: queue overflow and failed exports.

    Shared by :class:`CountingProcessor` and :class:`CountingExporter`; reports
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
        if now - self._last_warning >= DROP_WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "telemetry lost %d span(s) so far (%d on a full queue, %d in failed exports)",
                self.lost,
                self.dropped_queue_full,
                self.failed_export,
            )


class CountingExporter(SpanExporter):
    """Wraps an exporter and tells the loss counter what became of each batch."""

    def __init__(self, inner: SpanExporter, losses: SpanLossCounter) -> None:
        self._inner = inner
        self._losses = losses

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._losses.on_take(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:
            EXPORT_HEALTH.report("spans", ok=False, items=len(spans), lost_total=self._losses.lost)
            self._losses.on_export(len(spans), ok=False)
            raise
        ok = result is SpanExportResult.SUCCESS
        # Health first: once it knows export is failing, the loss warning below is held back.
        EXPORT_HEALTH.report("spans", ok=ok, items=len(spans), lost_total=self._losses.lost)
        self._losses.on_export(len(spans), ok=ok)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingProcessor(SpanProcessor):
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
