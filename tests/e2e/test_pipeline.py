"""The whole pipeline: devbroker, processor and persister subprocesses, traced into Phoenix.

A publisher in the test plays the marker: every message is published with the
official Python client under its own root span ``publish-message`` (service
``react-web-app``), whose CorrelationId travels in the header and the payload.
The test then checks the JSONL file and every span Phoenix stored.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import AMPS
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import SpanKind, Tracer

from ampsflow.core.codec import TraceParent, encode_correlation_id
from tests.support.phoenix import Phoenix, StoredSpan
from tests.support.processes import (
    Daemon,
    Devbroker,
    Processes,
    pipeline_config,
    wait_for,
    write_config,
    written_lines,
)

pytestmark = pytest.mark.slow

SETTLE_S = 120.0
MARKER_SERVICE = "react-web-app"


@dataclass(frozen=True, slots=True)
class Sent:
    """One published message: its id and the ids of its publish-message span."""

    id: str
    trace_id: str
    span_id: str


class MarkerStandIn:
    """Publishes like the marker page: one root PRODUCER span per message."""

    def __init__(self, uri: str, endpoint: str, *, sampled: bool = True) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": MARKER_SERVICE}),
            sampler=ALWAYS_ON if sampled else ALWAYS_OFF,
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"),
                max_queue_size=100_000,
                schedule_delay_millis=200,
            )
        )
        self.tracer: Tracer = self.provider.get_tracer("e2e")
        self.client = AMPS.Client(f"e2e-marker-{uuid.uuid4().hex[:8]}")
        self.client.connect(uri)
        self.client.logon()
        self.run = uuid.uuid4().hex[:8]

    def publish(self, n: int, body: str | None = None) -> Sent:
        ident = f"{self.run}-{n}"
        with self.tracer.start_as_current_span(
            "publish-message",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "amps",
                "messaging.destination.name": "internal",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
            },
        ) as span:
            ctx = span.get_span_context()
            cid = encode_correlation_id(
                TraceParent(0, ctx.trace_id, ctx.span_id, int(ctx.trace_flags))
            )
            data = body if body is not None else json.dumps({"id": ident, "CorrelationId": cid})
            self.client.publish("internal", data, correlation_id=cid)
        return Sent(ident, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))

    def close(self) -> None:
        self.client.publish_flush(30_000)
        self.client.close()
        self.provider.shutdown()


@dataclass
class Pipeline:
    broker: Devbroker
    processor: Daemon
    persister: Daemon
    jsonl: Path
    marker: MarkerStandIn

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in written_lines(self.jsonl) if line.strip()]

    def ids(self) -> list[str]:
        return [line["id"] for line in self.lines() if "id" in line]


@pytest.fixture
def pipeline(processes: Processes, phoenix: Phoenix, tmp_path: Path) -> Iterator[Pipeline]:
    broker = processes.devbroker()
    config = write_config(
        tmp_path / "ampsflow.yaml",
        pipeline_config(tmp_path, broker, otlp_endpoint=phoenix.endpoint),
    )
    persister = processes.service("persister", config)
    processor = processes.service("processor", config)
    marker = MarkerStandIn(broker.uri, phoenix.endpoint)
    yield Pipeline(broker, processor, persister, tmp_path / "messages.jsonl", marker)
    marker.close()


def wait_persisted(pipeline: Pipeline, sent: list[Sent]) -> list[str]:
    wanted = {s.id for s in sent}
    wait_for(
        lambda: wanted <= set(pipeline.ids()),
        timeout_s=SETTLE_S,
        what=f"{len(wanted)} messages in the JSONL file",
    )
    return [i for i in pipeline.ids() if i in wanted]


def chains(phoenix: Phoenix, sent: list[Sent]) -> dict[str, list[StoredSpan]]:
    """Wait until Phoenix holds publish, process and persist spans for every message."""
    traces = {s.trace_id for s in sent}

    def complete(spans: list[StoredSpan]) -> bool:
        names = Counter((s.trace_id, s.name) for s in spans if s.trace_id in traces)
        return all(
            names[(t, n)] >= 1
            for t in traces
            for n in ("publish-message", "process-message", "persist-message")
        )

    spans = phoenix.wait_for_spans(complete, timeout_s=SETTLE_S, what="complete traces")
    by_trace: dict[str, list[StoredSpan]] = {t: [] for t in traces}
    for span in spans:
        if span.trace_id in by_trace:
            by_trace[span.trace_id].append(span)
    return by_trace


def chain_problems(sent: Sent, spans: list[StoredSpan]) -> list[str]:
    """What is wrong with one message's trace (empty when it is right)."""
    problems: list[str] = []
    (publish,) = [s for s in spans if s.name == "publish-message"]
    processes = [s for s in spans if s.name == "process-message"]
    persists = [s for s in spans if s.name == "persist-message"]
    if (publish.span_id, publish.parent_id, publish.service) != (
        sent.span_id,
        None,
        MARKER_SERVICE,
    ):
        problems.append(f"publish-message {publish}")
    for process in processes:
        if (process.parent_id, process.service) != (sent.span_id, "processor"):
            problems.append(f"process-message parent/service {process}")
        expected = {
            "messaging.system": "amps",
            "messaging.destination.name": "internal",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
        }
        if {
            k: process.attributes.get(k) for k in expected
        } != expected or not process.attributes.get("messaging.message.id"):
            problems.append(f"process-message attributes {process.attributes}")
    process_ids = {p.span_id for p in processes}
    for persist in persists:
        if persist.parent_id not in process_ids or persist.service != "persister":
            problems.append(f"persist-message parent/service {persist}")
        if (
            persist.attributes.get("messaging.system"),
            persist.attributes.get("messaging.destination.name"),
        ) != ("amps", "external"):
            problems.append(f"persist-message attributes {persist.attributes}")
    return problems


class TestPipeline:
    def test_thousand_messages_exactly_once_and_fully_traced(
        self, pipeline: Pipeline, phoenix: Phoenix
    ) -> None:
        """1,000 messages: each in the JSONL once, processed, with a complete trace."""
        sent = [pipeline.marker.publish(n) for n in range(1000)]
        pipeline.marker.client.publish_flush(30_000)
        ids = wait_persisted(pipeline, sent)
        lines = {line["id"]: line for line in pipeline.lines() if "id" in line}
        by_trace = chains(phoenix, sent)
        problems = [p for s in sent for p in chain_problems(s, by_trace[s.trace_id])]
        counts = Counter(s.name for spans in by_trace.values() for s in spans)
        persisted_span_ids = {
            s.span_id for spans in by_trace.values() for s in spans if s.name == "persist-message"
        }
        # One exported span per message per hop, nothing else.
        assert (1000, 1000, {True}, [], 1000, 1000, 1000, 3000, True) == (
            len(ids),
            len(set(ids)),
            {lines[s.id]["processed"] for s in sent},
            problems[:5],
            counts["publish-message"],
            counts["process-message"],
            counts["persist-message"],
            counts.total(),
            {lines[s.id]["_ampsflow"]["span_id"] for s in sent} <= persisted_span_ids,
        )

    def test_invalid_json_is_an_error_span_and_a_dead_letter(
        self, pipeline: Pipeline, phoenix: Phoenix
    ) -> None:
        """Invalid JSON: an ERROR span with error.type and a dead letter; valid traffic flows."""
        letters: list[Any] = []
        reader = AMPS.Client(f"e2e-dlq-{uuid.uuid4().hex[:8]}")
        reader.connect(pipeline.broker.uri)
        reader.logon()
        reader.bookmark_subscribe(
            lambda m: letters.append(json.loads(m.get_data())), "internal.dlq", "0"
        )
        try:
            good = [pipeline.marker.publish(n) for n in range(10)]
            bad = pipeline.marker.publish(10, body="{this is not json")
            good += [pipeline.marker.publish(n) for n in range(11, 20)]
            pipeline.marker.client.publish_flush(30_000)
            wait_persisted(pipeline, good)
            wait_for(lambda: len(letters) >= 1, timeout_s=SETTLE_S, what="the dead letter")
            spans = phoenix.wait_for_spans(
                lambda s: any(
                    x.trace_id == bad.trace_id and x.name == "process-message" for x in s
                ),
                timeout_s=SETTLE_S,
                what="the failed process-message span",
            )
        finally:
            reader.close()
        (failed,) = [s for s in spans if s.trace_id == bad.trace_id and s.name == "process-message"]
        assert (
            "ERROR",
            "invalid_json",
            ["exception"],
            bad.span_id,
            ("invalid_json", "{this is not json"),
            True,
        ) == (
            failed.status,
            failed.attributes.get("error.type"),
            [e["name"] for e in failed.events],
            failed.parent_id,
            (letters[0]["reason"], letters[0]["body"]),
            pipeline.processor.running,
        )

    def test_sigterm_under_load_loses_no_span_and_no_message(
        self, pipeline: Pipeline, phoenix: Phoenix
    ) -> None:
        """SIGTERM to both daemons mid-stream, restarts: every message once, every trace whole."""
        sent = [pipeline.marker.publish(n) for n in range(150)]
        wait_for(lambda: len(pipeline.ids()) >= 20, timeout_s=SETTLE_S, what="20 lines")
        assert (pipeline.processor.terminate(), pipeline.persister.terminate()) == (0, 0)
        sent += [pipeline.marker.publish(n) for n in range(150, 300)]
        pipeline.persister.restart()
        pipeline.processor.restart()
        pipeline.marker.client.publish_flush(30_000)
        ids = wait_persisted(pipeline, sent)
        by_trace = chains(phoenix, sent)
        problems = [p for s in sent for p in chain_problems(s, by_trace[s.trace_id])]
        assert (len(ids), len(set(ids)), problems[:5]) == (300, 300, [])

    def test_kill9_restarts_lose_and_duplicate_nothing(self, pipeline: Pipeline) -> None:
        """SIGKILL of the processor, then of the persister, mid-stream: every message once."""
        sent = [pipeline.marker.publish(n) for n in range(100)]
        wait_for(lambda: len(pipeline.ids()) >= 20, timeout_s=SETTLE_S, what="20 lines")
        pipeline.processor.kill()
        sent += [pipeline.marker.publish(n) for n in range(100, 200)]
        pipeline.processor.restart()
        wait_for(lambda: len(pipeline.ids()) >= 120, timeout_s=SETTLE_S, what="120 lines")
        pipeline.persister.kill()
        sent += [pipeline.marker.publish(n) for n in range(200, 300)]
        pipeline.persister.restart()
        pipeline.marker.client.publish_flush(30_000)
        ids = wait_persisted(pipeline, sent)
        # A killed daemon loses the spans still queued in it, so only the
        # messages are checked here; the traces are checked after SIGTERM.
        assert (len(ids), len(set(ids))) == (300, 300)


def test_at_sampler_ratio_zero_only_failures_leave_spans(
    processes: Processes, phoenix: Phoenix, tmp_path: Path
) -> None:
    """Nothing sampled: a bad body still leaves an ERROR span in Phoenix, a good message none.

    The bad body sent to ``internal`` fails in the processor (dead letter), the
    one sent straight to ``external`` fails in the persister (kept raw). Each
    failure span starts its own sampled trace and names the original trace.
    """
    broker = processes.devbroker()
    config = write_config(
        tmp_path / "ampsflow.yaml",
        pipeline_config(
            tmp_path,
            broker,
            otlp_endpoint=phoenix.endpoint,
            overrides={"telemetry": {"sampler_ratio": 0.0}},
        ),
    )
    persister = processes.service("persister", config)
    processor = processes.service("processor", config)
    marker = MarkerStandIn(broker.uri, phoenix.endpoint, sampled=False)
    pipeline = Pipeline(broker, processor, persister, tmp_path / "messages.jsonl", marker)
    try:
        good = [marker.publish(n) for n in range(5)]
        marker.client.publish_flush(30_000)
        wait_persisted(pipeline, good)
        bad_processor = marker.publish(5, body="{this is not json")
        with marker.tracer.start_as_current_span("publish-message") as span:
            ctx = span.get_span_context()
            cid = encode_correlation_id(TraceParent(0, ctx.trace_id, ctx.span_id, 0))
            marker.client.publish("external", "[1, 2]", correlation_id=cid)
        bad_persister = format(ctx.trace_id, "032x")
        marker.client.publish_flush(30_000)
        wait_for(
            lambda: any(line.get("_ampsflow", {}).get("error") for line in pipeline.lines()),
            timeout_s=SETTLE_S,
            what="the raw line of the bad body",
        )
        # A stop flushes every queued span through the tap before the daemon exits.
        assert (processor.terminate(), persister.terminate()) == (0, 0)
        originals = {bad_processor.trace_id: "processor", bad_persister: "persister"}

        def failures(spans: list[StoredSpan]) -> list[StoredSpan]:
            return [s for s in spans if s.attributes.get("ampsflow.original_trace_id") in originals]

        spans = phoenix.wait_for_spans(
            lambda s: len(failures(s)) == 2, timeout_s=SETTLE_S, what="both failure spans"
        )
    finally:
        marker.close()
    found = sorted(
        (
            s.service,
            s.name,
            s.status,
            s.attributes.get("error.type"),
            originals[s.attributes["ampsflow.original_trace_id"]],
            s.trace_id in originals,
        )
        for s in failures(spans)
    )
    assert found == [
        ("persister", "persist-message", "ERROR", "not_an_object", "persister", False),
        ("processor", "process-message", "ERROR", "invalid_json", "processor", False),
    ]
    good_traces = {s.trace_id for s in good}
    assert [s for s in spans if s.trace_id in good_traces] == []
    assert [s for s in spans if s.attributes.get("ampsflow.original_trace_id") in good_traces] == []
