"""Bad messages on the processor's input topic, in the middle of steady good traffic.

Each bad body (invalid JSON, a JSON array, a JSON string, an empty body, a
10 MiB body over ``processor.max_message_bytes``, bytes that are not UTF-8, a
lone surrogate escape, a duplicate key, a number out of range, a body whose
dead letter would be six times its size, a body whose output would be over the
limit) must
give an ERROR ``process-message`` span with ``error.type`` and an exception
event, and a dead-letter envelope on ``internal.dlq`` with the reason, while the
processor keeps running and the good traffic around it reaches the JSONL
unchanged.

A valid JSON object whose CorrelationId is missing or malformed is not bad: it
is processed, and its span starts a new trace with the problem recorded as
``ampsflow.correlation_id.problem``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.faults.harness import (
    AuditResult,
    audit_details,
    audit_summary,
    clean_audit,
    lines,
    publish_raw,
    run_audit,
    search_spans,
    span_id_of,
    start_pipeline,
    topic_reader,
    wait_settled,
)
from tests.support.phoenix import Phoenix, StoredSpan
from tests.support.processes import processes, wait_for

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 1024 * 1024
"""The processor's body limit in this scenario; the large body is ten times that."""

TEN_MIB = 10 * 1024 * 1024

VALID_PARENT = "00" + "4bf92f3577b34da6a3ce929d0e0e4736" + "00f067aa0ba902b7" + "01"
"""A well-formed CorrelationId the bad bodies carry in the header."""

CONTROLS = "900 KiB of control characters (5.4 MB once escaped)"

BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "invalid JSON": (b'{"id": "bad-json", "broken": ', "invalid_json"),
    "a JSON array": (b"[1, 2, 3]", "not_an_object"),
    "a JSON string": (b'"just a string"', "not_an_object"),
    "an empty body": (b"", "invalid_json"),
    "a 10 MiB body": (b'{"id":"bad-big","pad":"' + b"x" * TEN_MIB + b'"}', "too_large"),
    "non-UTF-8 bytes": (b'{"id":"bad-\xff\xfe-bytes"}', "invalid_utf8"),
    "a lone surrogate escape": (b'{"id":"bad-surrogate","s":"\\ud800"}', "invalid_unicode"),
    "a duplicate key": (b'{"id":"bad-duplicate","a":1,"a":2}', "duplicate_key"),
    "a number out of range": (b'{"id":"bad-range","x":1e999}', "number_out_of_range"),
    CONTROLS: (
        b'{"id":"bad-controls","s":"' + b"\x01" * (900 * 1024) + b'"}',
        "invalid_json",
    ),
    "an output over the limit (1e15 is written back as 1000000000000000.0)": (
        b'{"id":"bad-growth","n":[' + b",".join([b"1e15"] * 150_000) + b"]}",
        "output_too_large",
    ),
}
"""Each bad body and the dead-letter reason (= ``error.type``) it must get."""

CUT_SHORT = {"a 10 MiB body", CONTROLS}
"""The bodies whose dead letter cannot carry them whole under ``MAX_MESSAGE_BYTES``."""

CORRELATION_CASES: dict[str, tuple[str | None, str]] = {
    "cid-missing": (None, "missing"),
    "cid-malformed": ("g" * 52, "header:not_hex"),
}
"""Valid objects with a missing or malformed CorrelationId: (header value, problem)."""

RAW_PUBLISHER = "raw"


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class BadInputRun:
    """What one run of bad input amid steady traffic left behind."""

    audit: AuditResult
    dead_letters: list[dict[str, Any]]
    spans: dict[str, StoredSpan]
    lines_by_id: dict[str, dict[str, Any]]
    pid_before: int
    pid_after: int | None
    log: str


@pytest.fixture(scope="module")
def bad_input_run(
    phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BadInputRun]:
    """Steady load with the bad bodies and the CorrelationId cases published in the middle."""
    root = tmp_path_factory.mktemp("bad-input")
    with processes(root) as procs:
        pipeline = start_pipeline(
            procs,
            root,
            otlp_endpoint=phoenix.endpoint,
            overrides={"processor": {"max_message_bytes": MAX_MESSAGE_BYTES}},
            export_from=("processor",),
        )
        since = datetime.now(UTC)
        pid_before = pipeline.processor.pid
        raw_ids = root / "published-raw.txt"
        with (
            topic_reader(pipeline.broker.uri, "internal.dlq") as dead_letters,
            pipeline.publisher() as publisher,
        ):
            publisher.wait_published(300)
            publish_raw(
                pipeline.broker.uri,
                "internal",
                [(body, VALID_PARENT) for body, _ in BAD_BODIES.values()],
            )
            publisher.wait_published(publisher.published + 200)
            publish_raw(
                pipeline.broker.uri,
                "internal",
                [
                    (json.dumps({"id": ident, "CorrelationId": "not-a-correlation-id"}), header)
                    if header
                    else (json.dumps({"id": ident}), None)
                    for ident, (header, _) in CORRELATION_CASES.items()
                ],
            )
            raw_ids.write_text("".join(f"{RAW_PUBLISHER}\t{i}\n" for i in CORRELATION_CASES))
            publisher.wait_published(publisher.published + 200)
            wait_for(
                lambda: len(dead_letters.snapshot()) >= len(BAD_BODIES),
                timeout_s=60,
                what="a dead letter for every bad body",
            )
            received = dead_letters.snapshot()
        combined = root / "published-all.txt"
        combined.write_text(pipeline.published.read_text() + raw_ids.read_text())
        wait_settled(pipeline.jsonl, expected_lines=publisher.published + len(CORRELATION_CASES))
        audit = run_audit(combined, pipeline.jsonl)
        by_id = {line["id"]: line for line in lines(pipeline.jsonl) if "id" in line}
        envelopes = [json.loads(m["data"]) for m in received]
        wanted = [span_id_of(e["CorrelationId"]) for e in envelopes] + [
            span_id_of(by_id[i]["CorrelationId"]) for i in CORRELATION_CASES if i in by_id
        ]
        spans: dict[str, StoredSpan] = {}

        def all_spans_stored() -> bool:
            spans.update(
                {s.span_id: s for s in search_spans(phoenix, since=since, span_ids=wanted)}
            )
            return set(wanted) <= set(spans)

        wait_for(all_spans_stored, timeout_s=60, what="the spans of the bad and odd messages")
        yield BadInputRun(
            audit=audit,
            dead_letters=envelopes,
            spans=spans,
            lines_by_id=by_id,
            pid_before=pid_before,
            pid_after=pipeline.processor.pid if pipeline.processor.running else None,
            log=pipeline.logs(),
        )


def _original_body(envelope: dict[str, Any]) -> bytes:
    if "body_base64" in envelope:
        return base64.b64decode(envelope["body_base64"])
    return str(envelope.get("body", "")).encode("utf-8")


def _envelope_digest(envelope: dict[str, Any]) -> str:
    """The SHA-256 of the original body: as the envelope states it, else of the copy it carries."""
    stated = envelope.get("body_sha256")
    return stated if isinstance(stated, str) else _digest(_original_body(envelope))


class TestBadInput:
    """Bad bodies are dead-lettered and traced as errors; nothing else is disturbed."""

    def test_processor_keeps_running(self, bad_input_run: BadInputRun) -> None:
        """The same processor process is still running after every bad message."""
        assert bad_input_run.pid_before == bad_input_run.pid_after, bad_input_run.log

    def test_good_traffic_around_it_is_all_persisted_in_order(
        self, bad_input_run: BadInputRun
    ) -> None:
        """The audit of the good messages (the CorrelationId cases included) is clean."""
        assert clean_audit() == audit_summary(bad_input_run.audit), audit_details(
            bad_input_run.audit
        )

    def test_bad_bodies_never_reach_the_jsonl(self, bad_input_run: BadInputRun) -> None:
        """No line in the JSONL comes from a bad body (no unknown ids, no raw lines)."""
        report = bad_input_run.audit.report
        expected: dict[str, list[Any]] = {"unexpected": [], "unidentified_lines": []}
        assert expected == {k: report.get(k) for k in expected}

    def test_each_bad_body_is_dead_lettered_with_its_reason(
        self, bad_input_run: BadInputRun
    ) -> None:
        """One dead letter per bad body, identified by its hash, with the expected reason."""
        expected = {_digest(body): reason for body, reason in BAD_BODIES.values()}
        actual = {_envelope_digest(e): e["reason"] for e in bad_input_run.dead_letters}
        assert expected == actual

    def test_each_dead_letter_carries_the_body_or_says_it_is_cut(
        self, bad_input_run: BadInputRun
    ) -> None:
        """The whole body when it fits under max_message_bytes, else a prefix marked truncated."""
        by_digest = {_digest(body): body for body, _ in BAD_BODIES.values()}
        expected = {
            _digest(body): (len(body), name in CUT_SHORT, True)
            for name, (body, _) in BAD_BODIES.items()
        }
        actual = {}
        for envelope in bad_input_run.dead_letters:
            body = by_digest.get(_envelope_digest(envelope), b"")
            kept = _original_body(envelope)
            actual[_envelope_digest(envelope)] = (
                envelope.get("body_bytes"),
                envelope.get("body_truncated"),
                body.startswith(kept) and (envelope.get("body_truncated") or kept == body),
            )
        assert expected == actual

    def test_each_dead_letter_links_to_an_error_span(self, bad_input_run: BadInputRun) -> None:
        """A dead letter names an ERROR process-message span with error.type and an exception."""
        expected = sorted(
            ("process-message", "ERROR", reason, True) for _, reason in BAD_BODIES.values()
        )
        actual = []
        for envelope in bad_input_run.dead_letters:
            span = bad_input_run.spans[span_id_of(envelope["CorrelationId"])]
            actual.append(
                (
                    span.name,
                    span.status,
                    span.attributes.get("error.type"),
                    any(event.get("name") == "exception" for event in span.events),
                )
            )
        assert expected == sorted(actual)

    @pytest.mark.parametrize("ident", sorted(CORRELATION_CASES))
    def test_correlation_id_problem_starts_a_new_trace_and_is_recorded(
        self, bad_input_run: BadInputRun, ident: str
    ) -> None:
        """A valid object with a missing or malformed CorrelationId is processed as a new root."""
        line = bad_input_run.lines_by_id[ident]
        span = bad_input_run.spans[span_id_of(line["CorrelationId"])]
        expected = (True, "process-message", None, "UNSET", CORRELATION_CASES[ident][1])
        actual = (
            line.get("processed"),
            span.name,
            span.parent_id,
            span.status,
            span.attributes.get("ampsflow.correlation_id.problem"),
        )
        assert expected == actual
