"""Messages near the broker's frame cap: nothing the processor sends may exceed it.

A frame over the devbroker's ``max_frame_bytes`` closes the sender's connection,
and a publish from the processor's publish store is re-sent after every
reconnect, so one oversized publish used to stall the pipeline for good (and
SIGTERM with it). Two scenarios, each on its own pipeline:

- **Defaults everywhere (16 MiB).** A 3 MiB body of control characters is not
  JSON; its dead letter would be ~19 MB once JSON-escaped. The envelope is cut
  to fit (``body_truncated``, with the whole body's length and SHA-256), the
  good messages published after it are all persisted, the processor is the same
  process throughout, and it stops on SIGTERM.
- **A broker with a smaller frame cap than the processor's
  ``max_message_bytes``** (a misconfiguration): an output the broker refuses
  keeps the publish blocked in the client. SIGTERM still ends the processor,
  within the drain deadline and under the units' ``TimeoutStopSec``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.faults.harness import lines, publish_raw, topic_reader
from tests.support.processes import (
    Devbroker,
    Processes,
    pipeline_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

CONTROLS = b'{"id":"controls","s":"' + b"\x01" * (3 * 1024 * 1024) + b'"}'
"""3 MiB of control characters: not JSON, and six bytes each once escaped."""

TIMEOUT_STOP_S = 30
"""The units' ``TimeoutStopSec``: systemd kills a daemon that takes longer to stop."""

GOOD = 50
"""Good messages published right after the bad one."""


class TestDeadLetterOverTheFrameCap:
    def test_envelope_is_cut_and_the_traffic_after_it_flows(
        self, processes: Processes, tmp_path: Path
    ) -> None:
        """The dead letter fits the frame cap; every good message after it is persisted."""
        broker = processes.devbroker()
        config = write_config(tmp_path / "ampsflow.yaml", pipeline_config(tmp_path, broker))
        processor = processes.service("processor", config)
        processes.service("persister", config)
        jsonl = tmp_path / "messages.jsonl"
        pid = processor.pid
        with topic_reader(broker.uri, "internal.dlq") as dead_letters:
            publish_raw(
                broker.uri,
                "internal",
                [(CONTROLS, None)] + [(json.dumps({"id": f"good-{i}"}), None) for i in range(GOOD)],
            )
            wait_for(
                lambda: jsonl.exists() and len(lines(jsonl)) >= GOOD,
                timeout_s=60,
                what=f"the {GOOD} good messages in the JSONL\n{processor.log_tail()}",
            )
            wait_for(lambda: bool(dead_letters.snapshot()), timeout_s=30, what="the dead letter")
            (letter,) = dead_letters.snapshot()
        envelope = json.loads(letter["data"])
        assert (
            len(letter["data"]) < 16 * 1024 * 1024,
            envelope["reason"],
            envelope["body_truncated"],
            envelope["body_bytes"],
            envelope["body_sha256"],
            CONTROLS.startswith(envelope["body"].encode()),
            sorted(line["id"] for line in lines(jsonl)),
            processor.pid,
            processor.terminate(),
        ) == (
            True,
            "invalid_json",
            True,
            len(CONTROLS),
            hashlib.sha256(CONTROLS).hexdigest(),
            True,
            sorted(f"good-{i}" for i in range(GOOD)),
            pid,
            0,
        )


class SmallFrameDevbroker(Devbroker):
    """A devbroker whose ``max_frame_bytes`` comes from a config file."""

    def __init__(self, root: Path, max_frame_bytes: int) -> None:
        config = write_config(
            root / "devbroker.yaml", {"devbroker": {"max_frame_bytes": max_frame_bytes}}
        )
        super().__init__(root / "devbroker", root / "devbroker.log")
        self.argv += ["--config", str(config)]


class TestPublishStuckOnARefusingBroker:
    def test_sigterm_ends_the_processor_within_the_drain_deadline(
        self, processes: Processes, tmp_path: Path
    ) -> None:
        """An output the broker refuses blocks the publish; SIGTERM still stops the processor."""
        broker = SmallFrameDevbroker(tmp_path, max_frame_bytes=1024 * 1024)
        try:
            broker.start()
            config = write_config(tmp_path / "ampsflow.yaml", pipeline_config(tmp_path, broker))
            processor = processes.service("processor", config)
            # 750 kB in, 2.5 MB out: 1e15 is written back as 1000000000000000.0.
            growing = b'{"id":"grows","n":[' + b",".join([b"1e15"] * 150_000) + b"]}"
            # The messages after it are what block: their publishes wait for a
            # reconnect that the re-sent oversized frame makes fail every time.
            publish_raw(
                broker.uri,
                "internal",
                [(growing, None)] + [(json.dumps({"id": f"after-{i}"}), None) for i in range(20)],
            )
            wait_for(
                lambda: "disconnected from AMPS" in processor.log_text(),
                timeout_s=30,
                what="the broker to refuse the processor's oversized publish",
            )
            status = processor.terminate(timeout_s=TIMEOUT_STOP_S)
            log = processor.log_text()
        finally:
            broker.close()
        # Whether the drain deadline had to close the connection, or the client gave up
        # reconnecting first, depends on timing; either way the stop must be clean.
        assert 0 == status, log[-3000:]
