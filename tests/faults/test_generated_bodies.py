"""Generated hostile bodies through a real processor and persister on the devbroker.

One pipeline serves the whole module. Hypothesis generates bodies of every
hostile class (:func:`tests.strategies.hostile_bodies`: escapes and lone
surrogates, raw control characters, huge and out-of-range numbers, NaN, deep
nesting, duplicate keys, big strings, outputs that grow past the limit, bytes
that are not UTF-8, JSON that is not an object) and publishes each to
``internal``. The invariant, per body: it is either **persisted** (a line in the
JSONL equal to the body's object plus ``processed`` and a CorrelationId) or
**dead-lettered** (an envelope on ``internal.dlq`` with its SHA-256 and a
reason), and which one, with which reason, is exactly what the pure
:mod:`ampsflow.core.transform` predicts. Afterwards both daemons are the same
processes, and a canary message still arrives.

Examples are bounded for CI (50, about 10 s); ``HYPOTHESIS_PROFILE=long``
runs ten times as many.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import AMPS
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from ampsflow.core import transform
from ampsflow.errors import BadMessageError
from tests.faults.harness import TopicReader, start_pipeline
from tests.strategies import Body, examples, hostile_bodies
from tests.support.processes import processes, wait_for

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 256 * 1024
"""The processor's limit here, so that too_large, output_too_large and cut-short
dead letters are reached with bodies small enough to generate quickly."""

BIG_BYTES = 320 * 1024
"""Largest generated big string or number array (above the limit, on purpose)."""

OUTCOME_TIMEOUT_S = 30.0


@dataclass
class Run:
    """The module's pipeline, a raw publisher, and what has been read back so far."""

    jsonl: Path
    processor: Any
    persister: Any
    publisher: Any
    dead_letters: TopicReader
    pids: tuple[int, int]
    seen_letters: int = 0
    letters_by_digest: dict[str, dict[str, Any]] = field(default_factory=dict)
    matched_bookmarks: set[str] = field(default_factory=set)

    def publish(self, data: bytes) -> None:
        self.publisher.publish("internal", data)

    def letter(self, digest: str) -> dict[str, Any] | None:
        """The dead letter of the body with this SHA-256, once it arrived."""
        received = self.dead_letters.snapshot()
        for message in received[self.seen_letters :]:
            envelope = json.loads(message["data"])
            self.letters_by_digest[envelope["body_sha256"]] = envelope
        self.seen_letters = len(received)
        return self.letters_by_digest.get(digest)

    def line(self, expected: dict[str, Any]) -> dict[str, Any] | None:
        """A persisted line not matched before whose object is ``expected``."""
        if not self.jsonl.exists():
            return None
        with self.jsonl.open("rb") as f:
            for raw in f:
                line = json.loads(raw)
                meta = line.pop("_ampsflow")
                if meta["bookmark"] in self.matched_bookmarks:
                    continue
                line.pop("CorrelationId", None)
                if line == expected:
                    self.matched_bookmarks.add(meta["bookmark"])
                    return {**line, "_ampsflow": meta}
        return None

    def alive(self) -> bool:
        return (self.processor.running, self.persister.running) == (True, True) and (
            self.processor.pid,
            self.persister.pid,
        ) == self.pids


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("generated-bodies")
    with processes(root) as procs:
        pipeline = start_pipeline(
            procs, root, overrides={"processor": {"max_message_bytes": MAX_MESSAGE_BYTES}}
        )
        reader = TopicReader(pipeline.broker.uri, "internal.dlq")
        reader.start()
        publisher = AMPS.Client(f"generated-{os.getpid()}-{time.monotonic_ns()}")
        publisher.connect(pipeline.broker.uri)
        publisher.logon()
        try:
            yield Run(
                jsonl=pipeline.jsonl,
                processor=pipeline.processor,
                persister=pipeline.persister,
                publisher=publisher,
                dead_letters=reader,
                pids=(pipeline.processor.pid, pipeline.persister.pid),
            )
        finally:
            publisher.close()
            reader.close()


def predicted(body: bytes) -> tuple[str, Any]:
    """``("persisted", object)`` or ``("dead-lettered", reason)``, by the pure core."""
    try:
        message = transform.parse_body(body, max_bytes=MAX_MESSAGE_BYTES)
        transform.render_output(
            message,
            correlation_id="00" + "1" * 48 + "01",
            carrier="both",
            max_bytes=transform.publish_budget(MAX_MESSAGE_BYTES, "external"),
        )
    except BadMessageError as exc:
        return "dead-lettered", exc.error_type
    return "persisted", message


_idents = itertools.count()


class TestGeneratedBodies:
    @settings(
        max_examples=examples(50),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def test_each_body_is_persisted_or_dead_lettered_as_the_core_predicts(
        self, run: Run, data: st.DataObject
    ) -> None:
        """Persisted as the same object, or dead-lettered with the reason the core gives."""
        ident = f"gen-{os.getpid()}-{next(_idents)}"
        body: Body = data.draw(hostile_bodies(ident, big_bytes=BIG_BYTES), label="body")
        kind, value = predicted(body.data)
        event(f"{body.kind}: {kind}" + (f" ({value})" if kind == "dead-lettered" else ""))
        if kind == "persisted":
            # Another id would be deduplicated against earlier examples by the persister.
            assume(value.get("id") in (None, ident) and "_ampsflow" not in value)
        digest = hashlib.sha256(body.data).hexdigest()
        run.publish(body.data)
        outcome: list[tuple[str, Any]] = []

        def arrived() -> bool:
            assert run.alive(), "a daemon exited"
            letter = run.letter(digest)
            if letter is not None:
                outcome.append(("dead-lettered", letter))
                return True
            if kind == "persisted":
                expected = {k: v for k, v in value.items() if k != "CorrelationId"}
                line = run.line({**expected, "processed": True})
                if line is not None:
                    outcome.append(("persisted", line))
                    return True
            return False

        wait_for(arrived, timeout_s=OUTCOME_TIMEOUT_S, what=f"the outcome of {body!r}")
        ((actual, found),) = outcome
        if actual == "dead-lettered":
            assert (actual, found["reason"], found["body_bytes"]) == (kind, value, len(body.data))
        else:
            assert (actual, "error" in found["_ampsflow"]) == (kind, False)

    def test_daemons_are_alive_and_a_canary_still_arrives(self, run: Run) -> None:
        """After every generated body, the same daemons persist a good message."""
        run.publish(b'{"id":"canary"}')
        wait_for(
            lambda: run.line({"id": "canary", "processed": True}) is not None,
            timeout_s=OUTCOME_TIMEOUT_S,
            what="the canary in the JSONL",
        )
        assert run.alive()
