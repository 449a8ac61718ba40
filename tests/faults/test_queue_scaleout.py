"""Three processors sharing one AMPS message queue under load, one killed every few seconds.

The devbroker runs a queue ``internal-queue`` over ``internal``; three processors in
``input_mode: queue`` (each with its own client name and state directory) share it; one
persister writes the JSONL. A steady publisher feeds ``internal`` while one processor after
the other is ``kill -9``'d and restarted. The messages a killed processor held go to the
others, which may publish a message a second time: every such repeat must be one the
persister drops, so ``ampsflow audit --any-order`` is clean (nothing lost, nothing
duplicated in the JSONL; order is not kept by parallel processors).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.harness import (
    audit_details,
    audit_summary,
    clean_audit,
    lines,
    run_audit,
    topic_reader,
    wait_settled,
)
from tests.support.load import LoadConfig, SteadyPublisher
from tests.support.processes import Processes, pipeline_config, wait_for, write_config

pytestmark = pytest.mark.slow

QUEUE = "internal-queue"
PROCESSORS = 3
RUN_S = 30.0
"""How long the load and the kills last."""
KILL_GAP_S = (2.0, 4.0)
"""Seconds between two kills, drawn at random."""
RATE_PER_S = 200.0


def _rng() -> random.Random:
    seed = int(os.environ.get("AMPSFLOW_FAULT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"fault seed: AMPSFLOW_FAULT_SEED={seed}")
    return random.Random(seed)


def test_three_processors_on_one_queue_lose_nothing_through_kill9(
    processes: Processes, tmp_path: Path
) -> None:
    """kill -9 of one of three queue processors every few seconds under load: every
    message persisted once, every repeated output dropped by the persister, all three
    processors did part of the work."""
    broker_config = write_config(
        tmp_path / "devbroker.yaml",
        {
            "logging": {"level": "info"},
            "devbroker": {
                "queues": [
                    {
                        "name": QUEUE,
                        "underlying_topic": "internal",
                        "max_per_subscription_backlog": 20,
                        "lease_period_s": 10,
                    }
                ]
            },
        },
    )
    broker = processes.devbroker(config=broker_config)
    base = pipeline_config(
        tmp_path,
        broker,
        overrides={"processor": {"input_mode": "queue", "input_topic": QUEUE, "max_backlog": 20}},
    )
    processors = []
    for n in range(1, PROCESSORS + 1):
        config = copy.deepcopy(base)
        config["amps"]["client_name"] = f"processor-{n}"
        config["processor"]["state_dir"] = str(tmp_path / f"processor{n}")
        path = write_config(tmp_path / f"processor{n}.yaml", config)
        processors.append(processes.service("processor", path, name=f"processor{n}"))
    processes.service("persister", write_config(tmp_path / "persister.yaml", base))
    jsonl = Path(base["persister"]["path"])
    published = tmp_path / "published.txt"

    rng = _rng()
    kills = 0
    publisher = SteadyPublisher(
        LoadConfig(
            uri=broker.uri,
            published_path=published,
            store_path=tmp_path / "load.store",
            rate_per_s=RATE_PER_S,
            client_name="load",
        )
    )
    with publisher:
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(*KILL_GAP_S))
            victim = processors[kills % PROCESSORS]
            victim.kill()
            victim.restart()
            kills += 1
        publisher.wait_published(publisher.published + 200)
    wait_settled(jsonl, expected_lines=publisher.published, timeout_s=120)
    result = run_audit(published, jsonl, any_order=True)
    assert clean_audit() == audit_summary(result), audit_details(result)

    persisted = lines(jsonl)
    by_processor = Counter(line["_ampsflow"]["bookmark"].split("|")[0] for line in persisted)
    assert PROCESSORS == len(by_processor), by_processor

    # Every output on the topic the persister reads is a message it wrote once: the
    # repeats of the killed processors' messages are all among them (dropped as such).
    ids = {line["id"] for line in persisted}
    with topic_reader(broker.uri, "external") as reader:
        wait_for(
            lambda: len(reader.snapshot()) >= len(persisted),
            timeout_s=60,
            what="every output read back",
        )
        seen = -1
        while seen != len(reader.snapshot()):  # until a second passes with nothing new
            seen = len(reader.snapshot())
            time.sleep(1.0)
        outputs = [json.loads(m["data"])["id"] for m in reader.snapshot()]
    assert set(outputs) == ids
    print(f"{kills} kills, {len(persisted)} lines, {len(outputs) - len(ids)} repeats dropped")
