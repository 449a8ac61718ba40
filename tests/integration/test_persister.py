"""The persister daemon as a subprocess against the devbroker, fed by the official client.

Each test starts its own devbroker and persister (``tests.support.processes``)
in a fresh directory, publishes uniquely identified messages to ``external``
with ``tests.support.load.SteadyPublisher`` (official Python client, durable
publish store), and checks the JSONL with the audit
(:func:`ampsflow.core.audit.reconcile`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ampsflow.core.audit import AuditReport, reconcile
from tests.support.load import LoadConfig, SteadyPublisher
from tests.support.processes import (
    REPO,
    Daemon,
    Devbroker,
    Processes,
    pipeline_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

WAIT_S = 60.0


class Pipeline:
    """A devbroker, a persister config and the files the tests read."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.root = processes.root
        self.broker: Devbroker = processes.devbroker()
        self.jsonl = self.root / "out" / "messages.jsonl"
        self.jsonl.parent.mkdir()
        self.config = write_config(
            self.root / "ampsflow.yaml",
            pipeline_config(
                self.root,
                self.broker,
                overrides={
                    "amps": {"client_name": "test-persister"},
                    "persister": {"path": str(self.jsonl)},
                    "logging": {"level": "debug"},
                },
            ),
        )
        self.published = self.root / "published.txt"

    def persister(self) -> Daemon:
        """A started (READY=1) persister."""
        return self.processes.service("persister", self.config)

    def publisher(self, rate_per_s: float = 400.0) -> SteadyPublisher:
        return SteadyPublisher(
            LoadConfig(
                uri=self.broker.uri,
                published_path=self.published,
                store_path=self.root / "publisher.store",
                topic="external",
                rate_per_s=rate_per_s,
            )
        )

    def lines(self, path: Path | None = None) -> list[dict[str, object]]:
        target = path or self.jsonl
        if not target.exists():
            return []
        with target.open("rb") as f:
            return [json.loads(line) for line in f if line.endswith(b"\n")]

    def line_count(self, path: Path | None = None) -> int:
        target = path or self.jsonl
        if not target.exists():
            return 0
        with target.open("rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))

    def published_count(self) -> int:
        if not self.published.exists():
            return 0
        return len(self.published.read_text(encoding="utf-8").splitlines())

    def wait_all_persisted(self, *paths: Path) -> None:
        total = self.published_count()
        wait_for(
            lambda: sum(self.line_count(p) for p in paths or (self.jsonl,)) >= total,
            timeout_s=WAIT_S,
            what=f"{total} lines",
        )

    def audit(self, *paths: Path) -> AuditReport:
        def persisted() -> Iterator[bytes]:
            for path in paths or (self.jsonl,):
                with path.open("rb") as f:
                    yield from f

        with self.published.open(encoding="utf-8") as published:
            return reconcile(published, persisted())


@pytest.fixture
def pipeline(processes: Processes) -> Pipeline:
    return Pipeline(processes)


def lines_at_least(pipeline: Pipeline, count: int) -> Callable[[], bool]:
    """A condition: the JSONL holds at least ``count`` whole lines."""
    return lambda: pipeline.line_count() >= count


def assert_clean(report: AuditReport) -> None:
    """The audit found nothing lost, duplicated, reordered, torn or invalid."""
    problems = {
        "lost": report.lost[:10],
        "duplicated": dict(list(report.duplicated.items())[:10]),
        "out_of_order": report.out_of_order[:10],
        "torn": report.torn_last_line,
        "invalid": report.invalid_lines[:10],
    }
    expected = {"lost": [], "duplicated": {}, "out_of_order": [], "torn": False, "invalid": []}
    assert expected == problems


class TestDelivery:
    def test_published_messages_land_exactly_once(self, pipeline: Pipeline) -> None:
        """Messages published with the official client are each in the JSONL once, in order."""
        pipeline.persister()
        with pipeline.publisher() as publisher:
            publisher.wait_published(300)
        pipeline.wait_all_persisted()
        assert_clean(pipeline.audit())

    def test_restart_mid_stream_loses_and_duplicates_nothing(self, pipeline: Pipeline) -> None:
        """kill -9 and SIGTERM restarts while messages flow: every message exactly once."""
        persister = pipeline.persister()
        with pipeline.publisher() as publisher:
            for target, graceful in ((150, False), (400, True), (650, False)):
                wait_for(lines_at_least(pipeline, target), timeout_s=WAIT_S, what=f"{target} lines")
                if graceful:
                    persister.terminate()
                else:
                    persister.kill()
                persister.restart()
            publisher.wait_published(900)
        pipeline.wait_all_persisted()
        assert_clean(pipeline.audit())


class TestSignals:
    def test_sighup_after_rename_writes_to_new_file(self, pipeline: Pipeline) -> None:
        """After a rename and SIGHUP, later messages go to a new file; none lost or doubled."""
        persister = pipeline.persister()
        rotated = pipeline.jsonl.with_name("messages.jsonl.1")
        with pipeline.publisher(rate_per_s=200) as publisher:
            wait_for(lines_at_least(pipeline, 50), timeout_s=WAIT_S, what="50 lines")
            pipeline.jsonl.rename(rotated)
            persister.signal(signal.SIGHUP)
            wait_for(lambda: "reopened" in persister.log_text(), timeout_s=WAIT_S, what="reopen")
            wait_for(lines_at_least(pipeline, 50), timeout_s=WAIT_S, what="50 new-file lines")
            publisher.wait_published(pipeline.line_count(rotated) + 100)
        pipeline.wait_all_persisted(rotated, pipeline.jsonl)
        assert_clean(pipeline.audit(rotated, pipeline.jsonl))

    def test_sighup_reports_reloading_then_ready(self, pipeline: Pipeline) -> None:
        """SIGHUP is announced to systemd as RELOADING=1 followed by READY=1."""
        persister = pipeline.persister()
        persister.notify.clear()
        persister.signal(signal.SIGHUP)
        wait_for(lambda: bool(persister.notify.values("READY")), timeout_s=WAIT_S, what="READY=1")
        expected = (1, 1)
        assert expected == (
            len(persister.notify.values("RELOADING")),
            len(persister.notify.values("READY")),
        )

    def test_sigterm_under_load_exits_zero_with_acked_on_disk(self, pipeline: Pipeline) -> None:
        """SIGTERM while busy: exit 0, and the resume point is a message already on disk."""
        persister = pipeline.persister()
        with pipeline.publisher(rate_per_s=600) as publisher:
            wait_for(lines_at_least(pipeline, 200), timeout_s=WAIT_S, what="200 lines")
            status = persister.terminate()
            on_disk = {
                meta["bookmark"]
                for meta in (line["_ampsflow"] for line in pipeline.lines())
                if isinstance(meta, dict)
            }
            persister.restart()
            resumed = [
                line.split("resuming after ", 1)[1].strip()
                for line in persister.log_text().splitlines()
                if "resuming after " in line
            ][-1]
            publisher.wait_published(publisher.published + 50)
        pipeline.wait_all_persisted()
        resume_points = [b + ("" if b.endswith("|") else "|") for b in resumed.split(",")]
        expected: tuple[int, list[str]] = (0, [])
        assert expected == (status, [b for b in resume_points if b not in on_disk])
        assert_clean(pipeline.audit())

    def test_unwritable_path_is_one_error_and_exit(self, pipeline: Pipeline) -> None:
        """A JSONL path in a missing directory: one stderr line, exit 1, no retries."""
        config = pipeline.config.read_text(encoding="utf-8")
        pipeline.config.write_text(
            config.replace(str(pipeline.jsonl), str(pipeline.root / "absent" / "m.jsonl")),
            encoding="utf-8",
        )
        result = subprocess.run(
            [sys.executable, "-m", "ampsflow", "persister", "--config", str(pipeline.config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        lines = result.stderr.strip().splitlines()
        expected = (1, 1, True)
        assert expected == (result.returncode, len(lines), "cannot open" in lines[-1])
