"""Telemetry export health: one warning when export fails, one line when it recovers."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.adapters.export_health import ExportHealth, ExportLogFilter
from ampsflow.adapters.span_loss import SpanLossCounter
from ampsflow.adapters.telemetry import setup_telemetry
from ampsflow.config import TelemetryConfig


class Clock:
    """A monotonic clock the test advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Collected(logging.Handler):
    """Keeps the records that pass its filters (like the journal would get them)."""

    def __init__(self, health: ExportHealth) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(ExportLogFilter(health))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.fixture
def collected() -> Iterator[tuple[ExportHealth, Collected, Clock]]:
    clock = Clock()
    health = ExportHealth(clock)
    handler = Collected(health)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield health, handler, clock
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


class TestTransitions:
    def test_one_warning_then_one_recovery_line(
        self, collected: tuple[ExportHealth, Collected, Clock]
    ) -> None:
        """Failures log once; the first success logs the recovery with the spans lost."""
        health, handler, clock = collected
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").warning(
            "Failed to export span batch code: %s", "Connection refused"
        )
        for lost in (10, 20, 30):
            health.report("spans", ok=False, items=10, lost_total=lost)
            logging.getLogger("ampsflow.adapters.span_loss").warning(
                "telemetry lost %d span(s) so far (%d on a full queue, %d in failed exports)",
                lost,
                0,
                lost,
            )
        clock.now += 63
        health.report("spans", ok=True, items=5, lost_total=30)
        assert [
            "WARNING ampsflow.adapters.export_health: telemetry: span export is failing "
            "(Failed to export span batch code: Connection refused); further export errors "
            "are not logged until it recovers",
            "INFO ampsflow.adapters.export_health: telemetry: span export recovered after 63 s; "
            "20 span(s) lost meanwhile",
        ] == handler.lines

    def test_signals_are_tracked_apart(
        self, collected: tuple[ExportHealth, Collected, Clock]
    ) -> None:
        """Metrics failing while spans succeed neither flaps nor reports a span recovery."""
        health, handler, _ = collected
        for _ in range(3):
            health.report("metrics", ok=False, items=1)
            health.report("spans", ok=True, items=1, lost_total=0)
        health.report("metrics", ok=True, items=1)
        assert (2, True, True) == (
            len(handler.lines),
            "metric export is failing" in handler.lines[0],
            handler.lines[1].endswith("3 export(s) lost meanwhile"),
        )

    def test_loss_warnings_pass_while_export_works(
        self, collected: tuple[ExportHealth, Collected, Clock]
    ) -> None:
        """Spans dropped on a full queue while exports succeed are still warned about."""
        _, handler, _ = collected
        counter = SpanLossCounter(max_queue_size=0)
        counter.on_end()
        assert 1 == len([line for line in handler.lines if "telemetry lost 1 span(s)" in line])

    @given(outcomes=st.lists(st.booleans(), max_size=60))
    def test_lines_alternate_failing_and_recovered(self, outcomes: list[bool]) -> None:
        """Whatever the outcomes, lines alternate failing/recovered, one per change of state."""
        health = ExportHealth(Clock())
        handler = Collected(health)
        logger = logging.getLogger("ampsflow.adapters.export_health")
        level, propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            for ok in outcomes:
                health.report("spans", ok=ok, items=1, lost_total=0)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        kinds = ["failing" if "is failing" in line else "recovered" for line in handler.lines]
        changes = sum(
            1 for before, after in zip([True, *outcomes], outcomes, strict=False) if before != after
        )
        expected = (["failing", "recovered"] * len(kinds))[: len(kinds)]
        assert (expected, changes) == (kinds, len(kinds))


class TestRealExporter:
    def test_unreachable_collector_logs_one_warning(
        self, collected: tuple[ExportHealth, Collected, Clock], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A closed port gives one warning: no exporter line, no periodic span-loss warning."""
        health, handler, _ = collected
        monkeypatch.setattr("ampsflow.adapters.span_loss.EXPORT_HEALTH", health)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        telemetry = setup_telemetry(
            TelemetryConfig(endpoint=f"http://127.0.0.1:{port}", export_timeout_ms=500),
            "t",
            set_global=False,
            environ={"OTEL_METRICS_EXPORTER": "none"},
        )
        for _ in range(3):
            with telemetry.tracer.start_as_current_span("s"):
                pass
            telemetry.force_flush(2)
        telemetry.shutdown(2)
        failing = [line for line in handler.lines if "span export is failing" in line]
        assert ([], [], 1) == (
            [line for line in handler.lines if "opentelemetry" in line.split(":")[0]],
            [line for line in handler.lines if "span(s) so far" in line],
            len(failing),
        )
