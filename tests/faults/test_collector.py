"""The trace collector goes away under load, then comes back on the same port.

The daemons export through a relay in front of Phoenix; switching the relay
off makes the collector's port refuse connections, switching it on again
restores it. With a deliberately small span queue the daemons must drop spans
(counted by ``ampsflow.telemetry.spans.dropped``, read from a metrics capture
endpoint that stays up, and logged in two lines: one warning when export starts
failing, one with the number lost when it recovers) instead of stalling the
pipeline or growing without bound; messages keep flowing (the audit is clean);
and once the collector is back, the spans of new messages arrive.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from tests.faults.harness import (
    AuditResult,
    MetricsCapture,
    RssSampler,
    TcpRelay,
    audit_details,
    audit_summary,
    clean_audit,
    lines,
    start_pipeline,
    wait_for_span_ids,
)
from tests.support.phoenix import Phoenix
from tests.support.processes import processes, wait_for

pytestmark = pytest.mark.slow

OUTAGE_MESSAGES = 1800
"""Messages published while the collector is away (six seconds at the steady rate)."""

MAX_QUEUE_SIZE = 1024
"""The span queue of each daemon in this scenario: small, so the outage overflows it."""

RSS_GROWTH_LIMIT_KIB = 32 * 1024
"""How much a daemon's resident memory may grow during the outage."""

FAILING = re.compile(r"telemetry: span export is failing")
RECOVERED = re.compile(
    r"telemetry: span export recovered after \d+ s; (\d+) span\(s\) lost meanwhile"
)
EXPORTER_NOISE = re.compile(
    r"(?:WARNING|ERROR) opentelemetry\.|telemetry lost \d+ span\(s\) so far"
)

DROP_COUNTER = "ampsflow.telemetry.spans.dropped"

DAEMONS = ("processor", "persister")


@dataclass
class OutageRun:
    """What one collector outage under load left behind."""

    audit: AuditResult
    outage_s: float
    logs: dict[str, str]
    rss_before_kib: dict[str, int]
    rss_peak_during_kib: dict[str, int]
    missing_after_return: set[str]
    checked_after_return: int
    dropped_counted: dict[str, float]


@pytest.fixture(scope="module")
def outage_run(phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRun]:
    """Steady load; the collector goes away for a while and comes back; settle and audit."""
    root = tmp_path_factory.mktemp("collector")
    tap = urllib.parse.urlsplit(phoenix.endpoint)
    relay = TcpRelay((tap.hostname or "127.0.0.1", tap.port or 80))
    metrics = MetricsCapture()
    try:
        with processes(root) as procs:
            pipeline = start_pipeline(
                procs,
                root,
                otlp_endpoint=relay.endpoint,
                overrides={
                    "telemetry": {
                        "max_queue_size": MAX_QUEUE_SIZE,
                        "max_export_batch_size": 256,
                        "export_timeout_ms": 1000,
                        "metrics_interval_ms": 1000,
                    }
                },
                # Metrics go to their own capture endpoint, which stays up, so the
                # drop counter can be read while the trace collector is away.
                env={
                    "OTEL_METRICS_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": metrics.endpoint,
                },
            )
            since = datetime.now(UTC)
            daemons = {"processor": pipeline.processor, "persister": pipeline.persister}
            sampler = RssSampler({name: d.pid for name, d in daemons.items()}).start()
            with pipeline.publisher() as publisher:
                publisher.wait_published(300)
                before = {name: len(samples) for name, samples in sampler.samples.items()}
                relay.down()
                down_at = time.monotonic()
                publisher.wait_published(publisher.published + OUTAGE_MESSAGES)
                during = {name: len(samples) for name, samples in sampler.samples.items()}
                relay.up()
                outage_s = time.monotonic() - down_at
                returned_at = publisher.published
                publisher.wait_published(returned_at + 600)
            samples = sampler.stop()
            dropped: dict[str, float] = {}

            def drops_counted() -> bool:
                dropped.update({name: metrics.total(name, DROP_COUNTER) for name in DAEMONS})
                return all(dropped.values())

            with contextlib.suppress(AssertionError):
                wait_for(drops_counted, timeout_s=30, what="the span drop counters")
            audit = pipeline.settle_and_audit(publisher.published)
            # Spans of messages published a second after the return must all arrive.
            late = [
                line["_ampsflow"]["span_id"]
                for line in lines(pipeline.jsonl)
                if int(line.get("seq", 0)) > returned_at + 300
            ]
            missing = wait_for_span_ids(phoenix, late, since=since, timeout_s=60)
            run = OutageRun(
                audit=audit,
                outage_s=outage_s,
                logs={name: d.log_text() for name, d in daemons.items()},
                rss_before_kib={
                    name: max(samples[name][: before[name]] or [0]) for name in daemons
                },
                rss_peak_during_kib={
                    name: max(samples[name][before[name] : during[name]] or [0]) for name in daemons
                },
                missing_after_return=missing,
                checked_after_return=len(late),
                dropped_counted=dropped,
            )
            print(
                f"collector outage {run.outage_s:.1f}s; RSS KiB before {run.rss_before_kib}, "
                f"peak during {run.rss_peak_during_kib}; dropped {run.dropped_counted}; warnings "
                f"{ {n: RECOVERED.findall(t) for n, t in run.logs.items()} }; "
                f"log lines { {n: len(t.splitlines()) for n, t in run.logs.items()} }"
            )
            yield run
    finally:
        relay.close()
        metrics.close()


class TestCollectorOutage:
    """A dead collector costs spans, never messages, throughput or unbounded memory."""

    def test_every_message_is_persisted_once_in_order(self, outage_run: OutageRun) -> None:
        """The audit is clean: the outage did not stall or lose any message."""
        assert clean_audit() == audit_summary(outage_run.audit), audit_details(outage_run.audit)

    @pytest.mark.parametrize("daemon", DAEMONS)
    def test_dropped_spans_are_counted(self, outage_run: OutageRun, daemon: str) -> None:
        """The ampsflow.telemetry.spans.dropped counter of each daemon counts the lost spans."""
        assert outage_run.dropped_counted[daemon] > 0, outage_run.dropped_counted

    @pytest.mark.parametrize("daemon", DAEMONS)
    def test_outage_is_one_warning_and_one_recovery_line(
        self, outage_run: OutageRun, daemon: str
    ) -> None:
        """Each daemon warns once when export fails and once, with the loss, when it is back."""
        log = outage_run.logs[daemon]
        lost = [int(n) for n in RECOVERED.findall(log)]
        expected = (1, 1, True, [])
        actual = (
            len(FAILING.findall(log)),
            len(lost),
            bool(lost) and lost[0] > 0,
            EXPORTER_NOISE.findall(log),
        )
        assert expected == actual, log[-3000:]

    @pytest.mark.parametrize("daemon", DAEMONS)
    def test_memory_stays_bounded_during_the_outage(
        self, outage_run: OutageRun, daemon: str
    ) -> None:
        """Resident memory grows by less than the limit while spans cannot be exported."""
        growth = outage_run.rss_peak_during_kib[daemon] - outage_run.rss_before_kib[daemon]
        assert growth < RSS_GROWTH_LIMIT_KIB, (
            outage_run.rss_before_kib,
            outage_run.rss_peak_during_kib,
        )

    def test_spans_arrive_again_once_the_collector_is_back(self, outage_run: OutageRun) -> None:
        """Every persist-message span of the messages published after the return is stored."""
        expected: tuple[bool, set[str]] = (True, set())
        actual = (outage_run.checked_after_return > 0, outage_run.missing_after_return)
        assert expected == actual
