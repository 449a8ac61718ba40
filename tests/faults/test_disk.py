"""The persister's disk: full under load, and unwritable at start.

Disk full: the JSONL lives on a small tmpfs that a filler file leaves almost
full. Under steady load the persister hits ENOSPC, marks the spans of the held
batch ERROR with the exception, reports it on ``STATUS=``, counts nothing as
done, and retries; when the filler is deleted it writes everything and the
audit is clean. A second run kills the persister while the disk is full and
restarts it after space returns: since nothing was counted done, nothing is
lost. Mounting needs CAP_SYS_ADMIN; without it these tests skip and say so.

Unwritable output path at start: one clear error line, a non-zero exit, and
the process ends by itself at once (no retry loop).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    AuditResult,
    Pipeline,
    Tmpfs,
    audit_details,
    audit_summary,
    clean_audit,
    lines,
    search_spans,
    start_pipeline,
)
from tests.support.phoenix import Phoenix, StoredSpan
from tests.support.processes import Processes, processes, wait_for, write_config

pytestmark = pytest.mark.slow

TMPFS_KIB = 4096
"""Size of the filesystem holding the JSONL."""

FREE_AT_START_BYTES = 48 * 1024
"""Space the filler leaves: a few seconds of lines at the steady rate."""

NO_SPACE = "ENOSPC"


def _mounted_tmpfs() -> Tmpfs:
    tmpfs = Tmpfs(TMPFS_KIB)
    try:
        tmpfs.mount()
    except PermissionError as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {exc}")
    return tmpfs


def _disk_full_pipeline(procs: Processes, root: Path, tmpfs: Tmpfs, otlp: str | None) -> Pipeline:
    return start_pipeline(
        procs,
        root,
        otlp_endpoint=otlp,
        overrides={
            "persister": {
                "path": str(tmpfs.path / "messages.jsonl"),
                "retry_max_delay_ms": 500,
            }
        },
        export_from=("persister",),
    )


def _status_says_no_space(pipeline: Pipeline) -> bool:
    return any(NO_SPACE in status for status in pipeline.persister.notify.values("STATUS"))


@dataclass
class DiskFullRun:
    """What one disk-full-then-space-returns run under load left behind."""

    audit: AuditResult
    statuses: list[str]
    error_spans: list[StoredSpan]
    line_span_ids: set[str]
    pid_before: int
    pid_after: int | None
    log: str


@pytest.fixture(scope="module")
def disk_full_run(
    phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DiskFullRun]:
    """Fill the disk under load, wait for the error, free the space, settle and audit."""
    tmpfs = _mounted_tmpfs()
    root = tmp_path_factory.mktemp("disk-full")
    try:
        with processes(root) as procs:
            pipeline = _disk_full_pipeline(procs, root, tmpfs, phoenix.endpoint)
            since = datetime.now(UTC)
            pid_before = pipeline.persister.pid
            filler = tmpfs.fill(FREE_AT_START_BYTES)
            with pipeline.publisher() as publisher:
                wait_for(
                    lambda: _status_says_no_space(pipeline),
                    timeout_s=60,
                    what="the persister to report ENOSPC on STATUS",
                )
                # Let a backlog build up behind the full disk.
                publisher.wait_published(publisher.published + 600)
                filler.unlink()
                publisher.wait_published(publisher.published + 300)
            audit = pipeline.settle_and_audit(publisher.published)
            wait_for(
                lambda: (
                    pipeline.persister.notify.values("STATUS")[-1:] != []
                    and pipeline.persister.notify.values("STATUS")[-1].startswith("persisting")
                ),
                timeout_s=30,
                what="STATUS to report persisting again",
            )
            written = lines(pipeline.jsonl)
            line_span_ids = {line["_ampsflow"]["span_id"] for line in written}
            error_spans: list[StoredSpan] = []

            def error_spans_stored() -> bool:
                nonlocal error_spans
                error_spans = search_spans(
                    phoenix, since=since, names=["persist-message"], status="ERROR"
                )
                return bool(error_spans)

            wait_for(error_spans_stored, timeout_s=60, what="ERROR persist-message spans")
            yield DiskFullRun(
                audit=audit,
                statuses=pipeline.persister.notify.values("STATUS"),
                error_spans=error_spans,
                line_span_ids=line_span_ids,
                pid_before=pid_before,
                pid_after=pipeline.persister.pid if pipeline.persister.running else None,
                log=pipeline.logs(),
            )
    finally:
        tmpfs.unmount()


class TestDiskFull:
    """ENOSPC under load: reported, retried, nothing counted done, nothing lost."""

    def test_nothing_is_lost_or_duplicated_once_space_returns(
        self, disk_full_run: DiskFullRun
    ) -> None:
        """After the space returns the JSONL holds every message once, in order."""
        assert clean_audit() == audit_summary(disk_full_run.audit), audit_details(
            disk_full_run.audit
        )

    def test_status_reports_the_full_disk(self, disk_full_run: DiskFullRun) -> None:
        """STATUS= names ENOSPC while the disk is full."""
        assert any(NO_SPACE in s for s in disk_full_run.statuses), disk_full_run.statuses

    def test_status_reports_persisting_again_after_recovery(
        self, disk_full_run: DiskFullRun
    ) -> None:
        """The last STATUS= is the normal one again once writing resumed."""
        expected = "persisting"
        assert expected == disk_full_run.statuses[-1].split()[0], disk_full_run.statuses

    def test_writing_resumes_in_the_same_process(self, disk_full_run: DiskFullRun) -> None:
        """The persister recovers by itself: same pid, still running."""
        assert disk_full_run.pid_before == disk_full_run.pid_after, disk_full_run.log

    def test_error_spans_carry_the_enospc_exception(self, disk_full_run: DiskFullRun) -> None:
        """Every ERROR persist-message span has error.type ENOSPC and an exception event."""
        described = {
            (
                span.attributes.get("error.type"),
                any(
                    event.get("name") == "exception"
                    and NO_SPACE in str((event.get("attributes") or {}).get("exception.message"))
                    for event in span.events
                ),
            )
            for span in disk_full_run.error_spans
        }
        assert {(NO_SPACE, True)} == described

    def test_error_spans_belong_to_messages_written_later(self, disk_full_run: DiskFullRun) -> None:
        """Each message whose write failed was written later: none was counted done and dropped."""
        failed = {span.span_id for span in disk_full_run.error_spans}
        assert set() == failed - disk_full_run.line_span_ids


def test_persister_killed_while_disk_full_loses_nothing(tmp_path: Path) -> None:
    """kill -9 while ENOSPC holds a backlog, restart once space returns: nothing lost."""
    tmpfs = _mounted_tmpfs()
    try:
        with processes(tmp_path) as procs:
            pipeline = _disk_full_pipeline(procs, tmp_path, tmpfs, None)
            filler = tmpfs.fill(FREE_AT_START_BYTES)
            with pipeline.publisher() as publisher:
                wait_for(
                    lambda: _status_says_no_space(pipeline),
                    timeout_s=60,
                    what="the persister to report ENOSPC on STATUS",
                )
                publisher.wait_published(publisher.published + 450)
                pipeline.persister.kill()
                filler.unlink()
                pipeline.persister.restart()
                publisher.wait_published(publisher.published + 300)
            result = pipeline.settle_and_audit(publisher.published)
        assert clean_audit() == audit_summary(result), audit_details(result)
    finally:
        tmpfs.unmount()


@dataclass(frozen=True)
class StartFailure:
    """How ``ampsflow persister`` ended when its output path could not be opened."""

    returncode: int
    stderr_lines: list[str]


def _run_persister(tmp_path: Path, output: Path, uri: str) -> StartFailure:
    config = write_config(
        tmp_path / "ampsflow.yaml",
        {
            "amps": {"uri": uri},
            "telemetry": {"exporter": "none"},
            "persister": {"path": str(output), "state_dir": str(tmp_path / "state")},
        },
    )
    # The timeout is the "no retry storm" check: a retrying persister never exits.
    proc = subprocess.run(
        [sys.executable, "-m", "ampsflow", "persister", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return StartFailure(proc.returncode, proc.stderr.splitlines())


@pytest.fixture(params=["parent_is_a_file", "read_only_filesystem"])
def unwritable_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """An output path the persister cannot create, for each way that happens to root too."""
    if request.param == "parent_is_a_file":
        (tmp_path / "not-a-dir").write_text("")
        yield tmp_path / "not-a-dir" / "messages.jsonl"
        return
    tmpfs = _mounted_tmpfs()
    try:
        tmpfs.remount_read_only()
        yield tmpfs.path / "messages.jsonl"
    finally:
        tmpfs.unmount()


class TestUnwritableOutputAtStart:
    """An output path that cannot be opened stops the persister at once, clearly."""

    def test_exits_non_zero(
        self, pipeline_factory: Any, unwritable_path: Path, tmp_path: Path
    ) -> None:
        """The persister exits by itself with status 1."""
        broker = pipeline_factory(start_services=False).broker
        failure = _run_persister(tmp_path, unwritable_path, broker.uri)
        expected = 1
        assert expected == failure.returncode, failure.stderr_lines

    def test_prints_one_clear_error_line(
        self, pipeline_factory: Any, unwritable_path: Path, tmp_path: Path
    ) -> None:
        """Exactly one stderr line, naming the path."""
        broker = pipeline_factory(start_services=False).broker
        failure = _run_persister(tmp_path, unwritable_path, broker.uri)
        mentions = [line for line in failure.stderr_lines if str(unwritable_path) in line]
        expected = (1, 1)
        assert expected == (len(mentions), len(failure.stderr_lines)), failure.stderr_lines
