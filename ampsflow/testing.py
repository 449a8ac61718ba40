"""Test doubles shipped with ampsflow, for its own tests and for integrators.

- :func:`in_memory_telemetry`: a real :class:`~ampsflow.adapters.telemetry.Telemetry`
  whose spans go to an in-memory exporter (exported as each span ends) and
  whose metrics can be collected on demand.
- :class:`FakeAmps`: an in-process stand-in for
  :class:`~ampsflow.adapters.amps.AmpsClient` implementing both
  :class:`~ampsflow.messaging.MessageSource` and
  :class:`~ampsflow.messaging.MessageSink`.

Importing this module does not load the AMPS client.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ampsflow.adapters.telemetry import Telemetry, setup_telemetry
from ampsflow.config import TelemetryConfig
from ampsflow.errors import AmpsError
from ampsflow.messaging import Received


@dataclass(slots=True)
class InMemoryTelemetry:
    """A :class:`Telemetry` plus the in-memory exporter and metric reader behind it."""

    telemetry: Telemetry
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        """Every span finished so far, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def span_named(self, name: str) -> list[ReadableSpan]:
        """The finished spans called ``name``."""
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def metric_points(self, name: str) -> list[Any]:
        """The data points of metric ``name`` collected now (empty if never recorded)."""
        data = self.reader.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for resource_metrics in data.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        points.extend(metric.data.data_points)
        return points

    def counter_total(self, name: str) -> int | float:
        """The sum of every data point of counter ``name`` (0 if never recorded)."""
        total: int | float = 0
        for point in self.metric_points(name):
            total += point.value
        return total


def in_memory_telemetry(
    service_name: str = "test", config: TelemetryConfig | None = None
) -> InMemoryTelemetry:
    """Telemetry that keeps spans and metrics in memory (not installed globally)."""
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(
        config or TelemetryConfig(exporter="none"),
        service_name,
        span_exporter=exporter,
        metric_reader=reader,
        simple_processor=True,
        set_global=False,
        environ={},
    )
    return InMemoryTelemetry(telemetry=telemetry, exporter=exporter, reader=reader)


@dataclass(frozen=True, slots=True)
class Published:
    """One message a :class:`FakeAmps` was asked to publish."""

    topic: str
    body: bytes
    correlation_id: str | None


@dataclass(slots=True)
class FakeAmps:
    """In-process AMPS stand-in: feed messages in, read publishes and discards out.

    ``fail_publish`` makes the next publishes raise
    :class:`~ampsflow.errors.AmpsError` (one per entry, with that message).
    """

    published: list[Published] = field(default_factory=list)
    discarded: list[Received] = field(default_factory=list)
    fail_publish: list[str] = field(default_factory=list)
    _inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _sequence: int = 0

    def deliver(
        self,
        body: bytes | str,
        *,
        topic: str = "internal",
        correlation_id: str | None = None,
        sub_id: str | None = None,
    ) -> Received:
        """Queue one message for :meth:`receive`, with the next bookmark."""
        with self._lock:
            self._sequence += 1
            seq = self._sequence
        message = Received(
            topic=topic,
            body=body.encode("utf-8") if isinstance(body, str) else body,
            correlation_id=correlation_id,
            bookmark=f"1|{seq}|",
            sub_id=sub_id or topic,
            seq_no=seq,
        )
        self._inbox.put(message)
        return message

    def deliver_all(self, bodies: Iterable[bytes | str], *, topic: str = "internal") -> None:
        """Queue several messages without CorrelationId headers."""
        for body in bodies:
            self.deliver(body, topic=topic)

    def receive(self, timeout_s: float) -> Received | None:
        """The next delivered message, or ``None`` after ``timeout_s``."""
        try:
            return self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def pending(self) -> int:
        """Messages delivered but not yet received."""
        return self._inbox.qsize()

    def discard(self, message: Received) -> None:
        """Record the discard."""
        with self._lock:
            self.discarded.append(message)

    def publish(self, topic: str, body: bytes | str, correlation_id: str | None) -> int:
        """Record the publish (or raise the next queued failure)."""
        with self._lock:
            if self.fail_publish:
                raise AmpsError(self.fail_publish.pop(0))
            data = body.encode("utf-8") if isinstance(body, str) else body
            self.published.append(Published(topic, data, correlation_id))
            return len(self.published)

    def flush(self, timeout_s: float) -> bool:
        """Always flushed: publishes are recorded synchronously."""
        return True

    def on_topic(self, topic: str) -> list[Published]:
        """The publishes to ``topic``, in order."""
        with self._lock:
            return [p for p in self.published if p.topic == topic]
