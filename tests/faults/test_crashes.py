"""Crashes under steady load: ``kill -9`` of the persister, the processor, the devbroker.

Each test publishes a few hundred traced messages per second with the official
client through a durable publish store, kills one component with SIGKILL at
moments chosen by a seeded random generator (the seed is printed), restarts it,
and finally reconciles every published id against the JSONL with
``ampsflow audit``: nothing lost, nothing duplicated, publish order kept, no
torn line.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.faults.harness import Pipeline, audit_details, audit_summary, clean_audit
from tests.support.processes import Daemon

pytestmark = pytest.mark.slow

KILLS = 5
"""SIGKILLs per run."""

BROKER_KILLS = 3
"""SIGKILLs of the devbroker per run (each restart replays its log: slower)."""


def _rng() -> random.Random:
    seed = int(os.environ.get("AMPSFLOW_FAULT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"fault seed: AMPSFLOW_FAULT_SEED={seed}")
    return random.Random(seed)


def _kill_repeatedly(
    pipeline: Pipeline, daemon: Daemon, *, kills: int, gap: tuple[int, int]
) -> None:
    """kill -9 and restart ``daemon`` ``kills`` times under load, each after a random number
    of further publishes in ``gap``; then assert the audit is clean."""
    rng = _rng()
    with pipeline.publisher() as publisher:
        for _ in range(kills):
            publisher.wait_published(publisher.published + rng.randint(*gap))
            daemon.kill()
            daemon.restart()
        publisher.wait_published(publisher.published + 300)
    result = pipeline.settle_and_audit(publisher.published)
    assert clean_audit() == audit_summary(result), audit_details(result)


class TestKill9:
    """SIGKILL at random moments, restarted each time, loses and duplicates nothing."""

    def test_persister_killed_repeatedly_loses_and_duplicates_nothing(
        self, pipeline: Pipeline
    ) -> None:
        """Five kill -9 of the persister mid-stream leave every message in the JSONL once."""
        _kill_repeatedly(pipeline, pipeline.persister, kills=KILLS, gap=(100, 450))

    def test_processor_killed_repeatedly_loses_and_duplicates_nothing(
        self, pipeline: Pipeline
    ) -> None:
        """Five kill -9 of the processor mid-stream leave every message in the JSONL once."""
        _kill_repeatedly(pipeline, pipeline.processor, kills=KILLS, gap=(100, 450))

    def test_devbroker_killed_and_restarted_loses_and_duplicates_nothing(
        self, pipeline: Pipeline
    ) -> None:
        """kill -9 of the devbroker, restarted on its ports and data, loses and duplicates none."""
        _kill_repeatedly(pipeline, pipeline.broker, kills=BROKER_KILLS, gap=(150, 600))

    def test_daemons_reconnect_to_a_restarted_devbroker_by_themselves(
        self, pipeline: Pipeline
    ) -> None:
        """After kill -9 and restart of the devbroker the same daemon processes carry on."""
        before = {"processor": pipeline.processor.pid, "persister": pipeline.persister.pid}
        with pipeline.publisher() as publisher:
            publisher.wait_published(300)
            pipeline.broker.kill()
            pipeline.broker.restart()
            publisher.wait_published(publisher.published + 300)
        pipeline.settle_and_audit(publisher.published)
        after = {
            "processor": pipeline.processor.pid if pipeline.processor.running else None,
            "persister": pipeline.persister.pid if pipeline.persister.running else None,
        }
        assert before == after, pipeline.logs()
