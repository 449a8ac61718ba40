"""Interleaved publishers and kill -9: nothing received but unfinished is ever skipped.

The processor's bookmark store resumes from its last discard point and the last
persisted ack the broker sent for the subscription; with two publishers those name
different publishers and are listed side by side. These scenarios kill the processor
at the moment that matters (it holds a large message from one publisher, received and
acknowledged by the broker as persisted, after another publisher's message was
finished) and check that the restarted processor still gets it.
"""

from __future__ import annotations

import json
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
from tests.support.processes import wait_for

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
