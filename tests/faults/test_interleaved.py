"""Interleaved publishers and kill -9: nothing received but unfinished is ever skipped.

The processor's bookmark store resumes from its last discard point and the last
persisted ack the broker sent for the subscription; with two publishers those name
different publishers and are listed side by side. :class:`TestHeldMessageSurvivesKill`
kills the processor at the moment that matters (it holds a large message from one
publisher, received and acknowledged by the broker as persisted, after another
publisher's message was finished) and checks that the restarted processor still gets it.

:class:`TestMultiPublisherKill9` is the general case: several official-client publishers,
each with its own client name and durable publish store, at random rates, one of them
sending large messages; the processor or the persister is killed with SIGKILL at random
moments (half of them just after a large message was published, so mid-message) and
restarted; ``ampsflow audit`` must then be clean. The seed is printed
(``AMPSFLOW_FAULT_SEED`` replays it); ``AMPSFLOW_FAULT_KILLS`` sets the kills per run
(default 6; e.g. 60 for a long run).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import AMPS
import pytest

from tests.faults.harness import (
    Pipeline,
    StoreEntry,
    audit_details,
    audit_summary,
    bookmark_store_entries,
    clean_audit,
    persisted_ids,
    run_audit,
    wait_settled,
)
from tests.support.load import LoadConfig, SteadyPublisher
from tests.support.processes import Daemon, wait_for

pytestmark = pytest.mark.slow

LARGE_ELEMENTS = 1_500_000
"""Array elements in the large message: a few MB that take the processor a while to parse."""


class Publisher:
    """One official client with its own name, publishing ids it records for the audit."""

    def __init__(self, uri: str, name: str, published: Path) -> None:
        self.name = name
        self.published = published
        self.client = AMPS.Client(name)
        self.client.connect(uri)
        self.client.logon()

    def publish(self, message_id: str, **extra: Any) -> None:
        body = json.dumps({"id": message_id, "publisher": self.name, **extra})
        self.client.publish("internal", body)
        self.client.publish_flush(30_000)
        with self.published.open("a", encoding="utf-8") as f:
            f.write(f"{self.name}\t{message_id}\n")

    def close(self) -> None:
        self.client.close()


class Probe:
    """A bookmark subscriber on the processor's input that, like the processor at the
    moment of the kill, discards publisher A's messages and holds B's. Once its store
    lists B's bookmark, the broker has sent the persisted ack naming it to every live
    bookmark subscription (one tick sends them all)."""

    def __init__(self, uri: str) -> None:
        self.store = AMPS.MemoryBookmarkStore()
        self.client = AMPS.Client(f"probe-{uuid.uuid4().hex[:8]}")
        self.client.set_bookmark_store(self.store)
        self.client.connect(uri)
        self.client.logon()
        self.bookmarks: dict[str, str] = {}
        self.client.bookmark_subscribe(
            self._on_message, "internal", AMPS.Client.Bookmarks.MOST_RECENT, None, "probe"
        )

    def _on_message(self, message: AMPS.Message) -> None:
        body = json.loads(message.get_data())
        self.bookmarks[body["id"]] = message.get_bookmark()
        if body["publisher"].startswith("pub-a"):
            self.store.discard_message(message)

    def wait_acked(self, message_id: str) -> str:
        """Wait for the message and a persisted ack that names it; returns its bookmark."""
        wait_for(lambda: message_id in self.bookmarks, timeout_s=30, what=f"{message_id} at probe")
        bookmark = self.bookmarks[message_id]
        wait_for(
            lambda: bookmark in self.store.get_most_recent("probe"),
            timeout_s=30,
            what=f"a persisted ack naming {message_id}",
        )
        return bookmark

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def publishers(pipeline: Pipeline) -> Iterator[tuple[Publisher, Publisher]]:
    a = Publisher(pipeline.broker.uri, f"pub-a-{uuid.uuid4().hex[:6]}", pipeline.published)
    b = Publisher(pipeline.broker.uri, f"pub-b-{uuid.uuid4().hex[:6]}", pipeline.published)
    yield a, b
    a.close()
    b.close()


def _store_of(pipeline: Pipeline) -> Path:
    return pipeline.root / "processor" / "bookmarks.mmap"


def _kinds(entries: list[StoreEntry], bookmark: str) -> set[str]:
    return {e.kind for e in entries if e.bookmark == bookmark}


class TestHeldMessageSurvivesKill:
    def test_processor_killed_holding_a_large_message_gets_it_after_restart(
        self, pipeline: Pipeline, publishers: tuple[Publisher, Publisher]
    ) -> None:
        """A's message finished, B's large one received and acked as persisted but not
        finished when the processor is killed: the restarted processor processes it."""
        a, b = publishers
        probe = Probe(pipeline.broker.uri)
        try:
            a.publish("a-1")
            wait_settled(pipeline.jsonl, expected_lines=1, quiet_s=0.5, timeout_s=60)
            held: str | None = None
            for attempt in range(1, 4):
                # Stopped, the processor cannot finish B's message before the persisted ack
                # that follows it is in its socket; continued, its client reads both at
                # once while the worker is still parsing the message.
                pipeline.processor.signal(signal.SIGSTOP)
                message_id = f"b-{attempt}"
                b.publish(message_id, pad=[0] * LARGE_ELEMENTS)
                bookmark = probe.wait_acked(message_id)
                pipeline.processor.signal(signal.SIGCONT)
                store = _store_of(pipeline)
                deadline = time.monotonic() + 30
                while "p" not in _kinds(bookmark_store_entries(store), bookmark):
                    assert time.monotonic() < deadline, "the processor never took the ack"
                    time.sleep(0.001)
                pipeline.processor.kill()
                if "d" not in _kinds(bookmark_store_entries(store), bookmark):
                    held = message_id
                    break
                # It finished the message before the kill: try again from there.
                pipeline.processor.restart()
            assert held is not None, "the processor finished every large message before the kill"
            pipeline.processor.restart()
            wait_settled(pipeline.jsonl, expected_lines=attempt + 1, timeout_s=60)
            assert held in persisted_ids(pipeline.jsonl), pipeline.logs()
        finally:
            probe.close()
        result = run_audit(pipeline.published, pipeline.jsonl)
        assert clean_audit() == audit_summary(result), audit_details(result)


def _rng() -> random.Random:
    seed = int(os.environ.get("AMPSFLOW_FAULT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"fault seed: AMPSFLOW_FAULT_SEED={seed}")
    return random.Random(seed)


def _kills() -> int:
    return int(os.environ.get("AMPSFLOW_FAULT_KILLS", "6"))


def _publishers(pipeline: Pipeline, rng: random.Random) -> list[SteadyPublisher]:
    """Three small-message publishers at random rates and one of large messages."""

    def make(name: str, rate: float, padding: int, items: int = 0) -> SteadyPublisher:
        return SteadyPublisher(
            LoadConfig(
                uri=pipeline.broker.uri,
                published_path=pipeline.published,
                store_path=pipeline.root / f"{name}.store",
                rate_per_s=rate,
                client_name=name,
                padding_bytes=padding,
                padding_items=items,
            )
        )

    tag = uuid.uuid4().hex[:6]
    small = [make(f"small{i}-{tag}", rng.uniform(40, 160), rng.randint(16, 2048)) for i in range(3)]
    # Large in bytes and slow to parse: the processor holds each one for a while.
    large = make(
        f"large-{tag}",
        rng.uniform(2, 5),
        rng.randint(64 * 1024, 512 * 1024),
        rng.randint(100_000, 300_000),
    )
    return [*small, large]


def _kill_amid_interleaved_publishers(pipeline: Pipeline, daemon: Daemon) -> None:
    rng = _rng()
    publishers = _publishers(pipeline, rng)
    large = publishers[-1]
    with contextlib.ExitStack() as running:
        for publisher in publishers:
            running.enter_context(publisher)
        for _ in range(_kills()):
            if rng.random() < 0.5:
                # Mid-message: just after a large message went out.
                large.wait_published(large.published + 1)
                time.sleep(rng.uniform(0.0, 0.08))
            else:
                time.sleep(rng.uniform(0.3, 2.5))
            daemon.kill()
            daemon.restart()
        publishers[0].wait_published(publishers[0].published + 100)
    total = sum(p.published for p in publishers)
    result = pipeline.settle_and_audit(total)
    assert clean_audit() == audit_summary(result), audit_details(result) + "\n" + pipeline.logs()


class TestMultiPublisherKill9:
    """Interleaved publishers, large messages, kill -9 at random points: audit clean."""

    def test_processor_killed_amid_interleaved_publishers_loses_nothing(
        self, pipeline: Pipeline
    ) -> None:
        """Repeated kill -9 of the processor loses and duplicates nothing in the JSONL."""
        _kill_amid_interleaved_publishers(pipeline, pipeline.processor)

    def test_persister_killed_amid_interleaved_publishers_loses_nothing(
        self, pipeline: Pipeline
    ) -> None:
        """Repeated kill -9 of the persister loses and duplicates nothing in the JSONL."""
        _kill_amid_interleaved_publishers(pipeline, pipeline.persister)
