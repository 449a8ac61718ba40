"""SIGTERM under steady load, to each daemon in turn.

The daemon must drain and exit 0 by itself; once it is started again and the
load has stopped, the audit shows that nothing it had acknowledged was lost
and nothing was written twice; and every span the pipeline finished reached
the trace backend (for every line in the JSONL, Phoenix holds its
``persist-message`` span when the persister is the one stopped, the
``process-message`` span that the line's CorrelationId names when it is the
processor, and both across a devbroker stop).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from tests.faults.harness import (
    AuditResult,
    audit_details,
    audit_summary,
    clean_audit,
    lines,
    span_id_of,
    start_pipeline,
    torn_lines,
    wait_for_span_ids,
)
from tests.support.phoenix import Phoenix
from tests.support.processes import processes

pytestmark = pytest.mark.slow

TARGETS = ("processor", "persister", "devbroker")

EXPORTERS = {
    "processor": ("processor",),
    "persister": ("persister",),
    "devbroker": ("processor", "persister"),
}
"""Whose spans each run reads back (only those services export, to spare the backend)."""


@dataclass
class SigtermRun:
    """What SIGTERM to one daemon under load, then its restart, left behind."""

    target: str
    returncode: int
    stopping: list[str]
    torn_at_exit: list[int]
    audit: AuditResult
    lines_checked: int
    missing_spans: set[str]
    log: str


@pytest.fixture(scope="module", params=TARGETS)
def sigterm_run(
    request: pytest.FixtureRequest, phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SigtermRun]:
    """SIGTERM one daemon mid-stream, restart it, stop the load, settle, audit, read spans."""
    target: str = request.param
    root = tmp_path_factory.mktemp(f"sigterm-{target}")
    with processes(root) as procs:
        pipeline = start_pipeline(
            procs, root, otlp_endpoint=phoenix.endpoint, export_from=EXPORTERS[target]
        )
        daemon = {
            "processor": pipeline.processor,
            "persister": pipeline.persister,
            "devbroker": pipeline.broker,
        }[target]
        since = datetime.now(UTC)
        with pipeline.publisher() as publisher:
            publisher.wait_published(300)
            returncode = daemon.terminate()
            stopping = daemon.notify.values("STOPPING")
            torn_at_exit = torn_lines(pipeline.jsonl)
            daemon.restart()
            publisher.wait_published(publisher.published + 300)
        audit = pipeline.settle_and_audit(publisher.published)
        written = lines(pipeline.jsonl)
        expected_spans: list[str] = []
        if "persister" in EXPORTERS[target]:
            expected_spans += [line["_ampsflow"]["span_id"] for line in written]
        if "processor" in EXPORTERS[target]:
            expected_spans += [span_id_of(line["CorrelationId"]) for line in written]
        yield SigtermRun(
            target=target,
            returncode=returncode,
            stopping=stopping,
            torn_at_exit=torn_at_exit,
            audit=audit,
            lines_checked=len(written),
            missing_spans=wait_for_span_ids(phoenix, expected_spans, since=since, timeout_s=90),
            log=daemon.log_tail(30),
        )


class TestSigtermUnderLoad:
    """SIGTERM drains: exit 0, nothing acknowledged lost, every finished span exported."""

    def test_exits_zero(self, sigterm_run: SigtermRun) -> None:
        """The daemon drains and exits with status 0."""
        expected = 0
        assert expected == sigterm_run.returncode, sigterm_run.log

    def test_nothing_is_lost_or_duplicated_across_the_restart(
        self, sigterm_run: SigtermRun
    ) -> None:
        """After the restart the JSONL holds every published message once, in order."""
        assert clean_audit() == audit_summary(sigterm_run.audit), audit_details(sigterm_run.audit)

    def test_jsonl_has_no_torn_line_at_exit(self, sigterm_run: SigtermRun) -> None:
        """Right after the exit every line in the JSONL is complete."""
        expected: list[int] = []
        assert expected == sigterm_run.torn_at_exit

    def test_every_finished_span_is_exported(self, sigterm_run: SigtermRun) -> None:
        """Phoenix holds the span of every line from each exporting daemon.

        The persister's is the line's ``persist-message`` span; the processor's
        is the ``process-message`` span that the line's CorrelationId names.
        """
        expected: tuple[bool, set[str]] = (True, set())
        actual = (sigterm_run.lines_checked > 0, sigterm_run.missing_spans)
        assert expected == actual

    def test_service_announces_stopping(self, sigterm_run: SigtermRun) -> None:
        """The daemon tells systemd it is stopping (STOPPING=1) before it exits."""
        expected = ["1"]
        assert expected == sigterm_run.stopping
