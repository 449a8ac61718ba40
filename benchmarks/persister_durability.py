"""Persister durability: group commit against an fdatasync per line, on the same disk.

All cases run in one process, one after the other, in a fresh directory on the disk
under test (``--dir``, default the system temp directory), with ~300-byte lines
shaped like the persister's (a mark plus its ``_ampsflow`` object):

1. ``raw fdatasync``: ``os.write`` of one line then ``os.fdatasync``, in a loop: the
   disk's own rate of durable appends, the ceiling for anything that syncs per line.
2. ``sink, fdatasync per line``: the real :class:`ampsflow.adapters.sink.JsonlSink`,
   ``commit([line])`` in a loop.
3. ``sink, group commit``: the real sink fed by a producer thread as fast as it can
   (bounded queue of ``4 * max_batch_lines``); a committer thread takes everything
   waiting (at most ``--max-batch-lines``) and commits it with one write and one
   ``fdatasync``, as the persister does. Latency of a line: from the moment the
   producer queued it to the return of the commit that made it durable.
4. the same group commit at fixed offered loads (``--rates``, open loop: each line is
   stamped with its scheduled time).
5. ``persister loop``: the real :class:`ampsflow.services.persister.Persister`
   (decode, dedupe, ``persist-message`` span, line building, group commit, discard)
   fed from an in-memory source holding ``--loop-messages`` marks, with tracing off
   and with every span sampled and exported over OTLP/HTTP to a local receiver:
   what one persister process sustains without the broker.

Every case reports lines/s and the p50/p99 latency of making a line durable (for the
persister loop: of its batches' commits); the file is re-read at the end of each case
and its line count checked.

Usage (from the repository root)::

    python benchmarks/persister_durability.py [--seconds 5] [--max-batch-lines 1000]
        [--rates 10000,50000] [--loop-messages 50000] [--dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampsflow.adapters.sink import JsonlSink, PendingLine  # noqa: E402
from ampsflow.adapters.telemetry import setup_telemetry  # noqa: E402
from ampsflow.config import TelemetryConfig  # noqa: E402
from ampsflow.core.records import Provenance, build_line  # noqa: E402
from ampsflow.lifecycle import Daemon  # noqa: E402
from ampsflow.services.persister import Persister  # noqa: E402
from ampsflow.testing import FakeAmps  # noqa: E402
from benchmarks.otlp_sink import OtlpSink  # noqa: E402
from benchmarks.pipeline import correlation_id, mark, percentile  # noqa: E402


@dataclass
class Result:
    """One case's figures."""

    case: str
    lines: int
    seconds: float
    latencies_ms: list[float]
    batches: int = 0
    cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "case": self.case,
            "lines": self.lines,
            "lines_per_s": round(self.lines / self.seconds),
            "p50_ms": round(percentile(lat, 0.5), 3),
            "p99_ms": round(percentile(lat, 0.99), 3),
            "max_ms": round(lat[-1], 3) if lat else None,
            "mean_batch": round(self.lines / self.batches, 1) if self.batches else 1.0,
            "cpu_us_per_line": round(1e6 * self.cpu_s / self.lines, 1) if self.lines else None,
        }


def persisted_line(i: int) -> bytes:
    """A line as the persister writes it (~300 bytes)."""
    message = json.loads(mark(f"d-{i:08d}", time.time_ns(), correlation_id(True)))
    message["processed"] = True
    provenance = Provenance(
        trace_id=f"{i + 1:032x}",
        span_id=f"{i + 1:016x}",
        topic="external",
        bookmark=f"17|{i + 1}|",
        persisted_at=datetime.now(UTC),
    )
    return build_line(message, provenance)


def count_lines(path: Path) -> int:
    """Lines in ``path``."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def raw_fdatasync(directory: Path, seconds: float, line: bytes) -> Result:
    """``write`` + ``fdatasync`` of one line, as many times as fit in ``seconds``."""
    path = directory / "raw.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    latencies = []
    cpu = time.process_time()
    start = time.perf_counter()
    try:
        while (now := time.perf_counter()) - start < seconds:
            os.write(fd, line)
            os.fdatasync(fd)
            latencies.append((time.perf_counter() - now) * 1e3)
    finally:
        elapsed = time.perf_counter() - start
        os.close(fd)
    result = Result("raw fdatasync per line", len(latencies), elapsed, latencies)
    result.cpu_s = time.process_time() - cpu
    assert count_lines(path) == result.lines
    return result


def sink_per_line(directory: Path, seconds: float, lines: list[bytes]) -> Result:
    """The real sink, one line per commit."""
    path = directory / "per-line.jsonl"
    latencies = []
    with JsonlSink(path) as sink:
        cpu = time.process_time()
        start = time.perf_counter()
        i = 0
        while (now := time.perf_counter()) - start < seconds:
            sink.commit([PendingLine(lines[i % len(lines)], f"k{i}", f"17|{i + 1}|")])
            latencies.append((time.perf_counter() - now) * 1e3)
            i += 1
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu
    result = Result("sink, fdatasync per line", i, elapsed, latencies, batches=i, cpu_s=cpu_s)
    assert count_lines(path) == result.lines
    return result


def sink_group_commit(
    directory: Path,
    seconds: float,
    lines: list[bytes],
    max_batch: int,
    rate: float | None,
) -> Result:
    """Producer thread -> bounded queue -> committer thread with the real sink."""
    path = directory / f"group-{rate or 'max'}.jsonl"
    pending: collections.deque[tuple[float, PendingLine]] = collections.deque()
    cond = threading.Condition()
    done = threading.Event()
    limit = 4 * max_batch
    latencies: list[float] = []
    committed = 0
    batches = 0

    def produce() -> None:
        i = 0
        start = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            if now - start >= seconds:
                break
            if rate is None:
                chunk = [(now, i + k) for k in range(64)]
            else:
                due_count = int((now - start) * rate) + 1 - i
                if due_count <= 0:
                    time.sleep(0.0005)
                    continue
                chunk = [(start + (i + k) / rate, i + k) for k in range(due_count)]
            with cond:
                while rate is None and len(pending) >= limit and not done.is_set():
                    cond.wait(0.1)
                for stamp, n in chunk:
                    pending.append(
                        (stamp, PendingLine(lines[n % len(lines)], f"k{n}", f"17|{n + 1}|"))
                    )
                cond.notify_all()
            i += len(chunk)
        done.set()
        with cond:
            cond.notify_all()

    with JsonlSink(path) as sink:
        producer = threading.Thread(target=produce, name="producer")
        cpu = time.process_time()
        start = time.perf_counter()
        producer.start()
        while True:
            with cond:
                while not pending and not done.is_set():
                    cond.wait(0.1)
                if not pending and done.is_set():
                    break
                batch = [pending.popleft() for _ in range(min(max_batch, len(pending)))]
                cond.notify_all()
            sink.commit([line for _, line in batch])
            durable = time.perf_counter()
            latencies.extend((durable - stamp) * 1e3 for stamp, _ in batch)
            committed += len(batch)
            batches += 1
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu
        producer.join()
    label = "sink, group commit, max rate" if rate is None else f"sink, group commit, {rate:,.0f}/s"
    result = Result(label, committed, elapsed, latencies, batches=batches, cpu_s=cpu_s)
    assert count_lines(path) == result.lines
    return result


def persister_loop(
    directory: Path, messages: int, max_batch: int, endpoint: str | None
) -> tuple[Result, dict[str, Any]]:
    """The real Persister's collect/commit loop over an in-memory source."""
    path = directory / f"loop-{'traced' if endpoint else 'off'}.jsonl"
    config = (
        TelemetryConfig(exporter="otlp", endpoint=endpoint, sampler_ratio=1.0)
        if endpoint
        else TelemetryConfig(exporter="none", sampler_ratio=0.0)
    )
    telemetry = setup_telemetry(
        config, "persister", set_global=False, environ={"OTEL_METRICS_EXPORTER": "none"}
    )
    source = FakeAmps()
    for i in range(messages):
        cid = correlation_id(endpoint is not None)
        source.deliver(mark(f"loop-{i:08d}", 0, cid), topic="external", correlation_id=cid)
    daemon = Daemon("persister-benchmark")
    commits: list[float] = []
    with JsonlSink(path) as sink:
        persister = Persister(
            source=source,
            sink=sink,
            telemetry=telemetry,
            topic="external",
            max_batch_lines=max_batch,
            max_batch_delay_s=0.005,
            retry_max_delay_s=1.0,
        )
        cpu = time.process_time()
        start = time.perf_counter()
        while source.pending():
            batch = persister.collect(daemon.stop)
            before = time.perf_counter()
            persister.commit(batch, daemon)
            commits.append((time.perf_counter() - before) * 1e3)
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu
        flush_start = time.perf_counter()
        telemetry.shutdown()
        flush_s = time.perf_counter() - flush_start
    label = "persister loop, " + ("every span exported" if endpoint else "tracing off")
    result = Result(label, messages, elapsed, commits, batches=persister.batches, cpu_s=cpu_s)
    assert count_lines(path) == messages
    assert len(source.discarded) == messages
    return result, {"span_flush_after_s": round(flush_s, 2), "dropped": telemetry.losses.lost}


def disk_info(directory: Path) -> str:
    """``findmnt`` source, type and options of the directory's filesystem."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(directory)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = "?"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="per case")
    parser.add_argument("--max-batch-lines", type=int, default=1000)
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",") if x], default=[10_000, 50_000]
    )
    parser.add_argument("--loop-messages", type=int, default=50_000)
    parser.add_argument("--dir", type=Path, default=None, help="a directory on the disk to test")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    lines = [persisted_line(i) for i in range(1000)]
    results: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="af-durability-", dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"disk: {disk_info(directory)}; line {len(lines[0])} bytes", flush=True)
        cases: list[Callable[[], Result]] = [
            functools.partial(raw_fdatasync, directory, args.seconds, lines[0]),
            functools.partial(sink_per_line, directory, args.seconds, lines),
            *(
                functools.partial(
                    sink_group_commit, directory, args.seconds, lines, args.max_batch_lines, rate
                )
                for rate in [None, *map(float, args.rates)]
            ),
        ]
        for case in cases:
            summary = case().summary()
            results.append(summary)
            print(summary, flush=True)
        if args.loop_messages:
            with OtlpSink() as sink:
                for endpoint in (None, sink.endpoint):
                    result, info = persister_loop(
                        directory, args.loop_messages, args.max_batch_lines, endpoint
                    )
                    summary = {**result.summary(), **info}
                    if endpoint:
                        spans = sink.spans()["spans"]
                        summary["spans_received"] = spans.get("persister/persist-message", 0)
                    results.append(summary)
                    print(summary, flush=True)
        extra["disk"] = disk_info(directory)
    print()
    print("| case | lines/s | p50 ms | p99 ms | max ms | mean lines per fdatasync | CPU µs/line |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['lines_per_s']:,} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['max_ms']} | {r['mean_batch']} | {r['cpu_us_per_line']} |"
        )
    print("\n(persister loop rows: latency is that of each batch's commit)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "argv": sys.argv,
                    "taken_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "load_average": os.getloadavg(),
                    **extra,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
