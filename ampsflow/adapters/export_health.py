"""Telemetry export health in the log: one warning when export fails, one line when it is back.

Without a collector the OpenTelemetry exporters log a warning or an error for every
failed batch (spans every ``schedule_delay_ms``, metrics every ``metrics_interval_ms``)
and the span-loss counter adds its own warnings: about 190 lines in five minutes per
service. Instead, per signal (``spans``, ``metrics``):

- the first failed export logs one WARNING: ``telemetry: span export is failing (REASON);
  further export errors are not logged until it recovers``;
- the first successful export after that logs one INFO line: ``telemetry: span export
  recovered after 63 s; 1234 span(s) lost meanwhile`` (``ampsflow.telemetry.spans.dropped``
  counts them too); for metrics, the number of failed exports.

:class:`ExportLogFilter` (installed on the root handler by
:func:`ampsflow.logs.configure_logging`) drops the exporters' own WARNING and ERROR
records, keeping the text of the latest as the REASON, and drops the span-loss
warnings while an export is failing. The exporter wrappers report every export's
outcome: :class:`~ampsflow.adapters.span_loss.CountingExporter` for spans,
:class:`HealthReportingMetricExporter` for metrics. One :data:`EXPORT_HEALTH` per
process, since the log filter and the exporters are set up apart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

logger = logging.getLogger(__name__)

EXPORTER_LOGGERS = (
    "opentelemetry.exporter.",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk.trace.export",
)
"""Loggers (prefixes) of the OpenTelemetry exporters and their batch workers."""

LOSS_WARNING_PREFIX = "telemetry lost %d span(s) so far"
"""How the span-loss counter's periodic warning starts (dropped while an export is
failing; the summary at shutdown is kept)."""

_MAX_REASON = 300
_NOUNS = {"spans": ("span", "span(s)"), "metrics": ("metric", "export(s)")}


@dataclass(slots=True)
class _Outage:
    since: float
    lost_at_start: int
    failed_items: int = 0


class ExportHealth:
    """Remembers, per signal, whether export is failing, and logs the transitions.

    Args:
        clock: Monotonic seconds (tests pass a fake).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._outages: dict[str, _Outage] = {}
        self._reason = ""

    @property
    def failing(self) -> bool:
        """Whether any signal's export is failing now."""
        return bool(self._outages)

    def note_reason(self, text: str) -> None:
        """Remember an exporter's own error text, to name it in the failing warning."""
        self._reason = " ".join(text.split())[:_MAX_REASON]

    def report(self, signal: str, *, ok: bool, items: int, lost_total: int | None = None) -> None:
        """One export of ``items`` (spans, or metric points) succeeded or failed.

        Args:
            signal: ``spans`` or ``metrics``.
            ok: Whether the export succeeded.
            items: What the export carried.
            lost_total: For spans, every span lost so far (full queue included); the
                recovery line reports the difference. ``None`` counts failed exports.
        """
        noun, counted = _NOUNS.get(signal, (signal, "item(s)"))
        with self._lock:
            outage = self._outages.get(signal)
            if not ok:
                if outage is None:
                    self._outages[signal] = outage = _Outage(self._clock(), lost_total or 0)
                    logger.warning(
                        "telemetry: %s export is failing (%s); further export errors are not "
                        "logged until it recovers",
                        noun,
                        self._reason or "no reason given",
                    )
                outage.failed_items += items if lost_total is not None else 1
                return
            if outage is None:
                return
            del self._outages[signal]
            lost = (
                lost_total - outage.lost_at_start if lost_total is not None else outage.failed_items
            )
            logger.info(
                "telemetry: %s export recovered after %.0f s; %d %s lost meanwhile",
                noun,
                self._clock() - outage.since,
                lost,
                counted,
            )


EXPORT_HEALTH = ExportHealth()
"""The process's export health, shared by the log filter and the exporter wrappers."""


class ExportLogFilter(logging.Filter):
    """Drops exporter errors (keeping the latest as the reason) and loss warnings in an outage.

    Args:
        health: Where reasons go and whether an export is failing.
    """

    def __init__(self, health: ExportHealth = EXPORT_HEALTH) -> None:
        super().__init__()
        self._health = health

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the records the two summary lines replace."""
        if record.levelno >= logging.WARNING and record.name.startswith(EXPORTER_LOGGERS):
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text = f"{text} {record.exc_info[1]!r}"
            self._health.note_reason(text)
            return False
        return not (
            self._health.failing
            and isinstance(record.msg, str)
            and record.msg.startswith(LOSS_WARNING_PREFIX)
        )


class HealthReportingMetricExporter(MetricExporter):
    """Wraps a metric exporter and reports each export's outcome to :data:`EXPORT_HEALTH`.

    Args:
        inner: The exporter that sends.
        health: Where outcomes go.
    """

    def __init__(self, inner: MetricExporter, health: ExportHealth = EXPORT_HEALTH) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._health = health

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export through the inner exporter and report whether it worked."""
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            self._health.report("metrics", ok=False, items=1)
            raise
        self._health.report("metrics", ok=result is MetricExportResult.SUCCESS, items=1)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the inner exporter."""
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the inner exporter down."""
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
