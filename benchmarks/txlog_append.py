"""Transaction log throughput: appends of 200-byte records with group commits.

Usage: python benchmarks/txlog_append.py [--records N] [--dir PATH]

The event-loop side appends in a tight loop while a worker thread commits (write +
fdatasync) whatever has been buffered, as the devbroker does. Prints appends/s, durable
records/s, the commit latency distribution and the latency of a one-record commit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ampsflow.devbroker.txlog import TransactionLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=None, help="log directory (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run(Path(tmp) / "txlog", args.records)


def run(directory: Path, records: int) -> None:
    log = TransactionLog(directory)
    log.open()
    prefix = b'{"id":1234567,"kind":"marker","payload":"'
    body = prefix + b"x" * (200 - len(prefix) - 2) + b'"}'
    latencies: list[float] = []
    stop = threading.Event()

    def committer() -> None:
        while not stop.is_set() or log.durable_position < log.last_position:
            started = time.perf_counter()
            before = log.durable_position
            if log.commit() == before:
                time.sleep(0.0005)
                continue
            latencies.append(time.perf_counter() - started)

    worker = threading.Thread(target=committer)
    started = time.perf_counter()
    worker.start()
    now_us = int(time.time() * 1_000_000)
    for i in range(records):
        log.append(
            topic="internal",
            client_name="bench-publisher",
            correlation_id="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            body=body,
            client_seq=None,
            timestamp_us=now_us + i,
        )
    appended = time.perf_counter()
    stop.set()
    worker.join()
    durable = time.perf_counter()
    single: list[float] = []
    for i in range(50):
        log.append(
            topic="internal",
            client_name="bench-publisher",
            correlation_id=None,
            body=body,
            client_seq=None,
            timestamp_us=now_us + records + i,
        )
        t = time.perf_counter()
        log.commit()
        single.append((time.perf_counter() - t) * 1000)
    log.close()
    ms = sorted(x * 1000 for x in latencies)
    print(f"records: {records} x {len(body)}-byte bodies")
    print(f"append: {records / (appended - started):,.0f} records/s")
    print(f"append+durable: {records / (durable - started):,.0f} records/s")
    print(
        f"commits: {len(ms)}, latency ms p50 {statistics.median(ms):.2f} "
        f"p99 {ms[int(len(ms) * 0.99) - 1]:.2f} max {ms[-1]:.2f}, "
        f"{records / len(ms):.0f} records/commit"
    )
    print(f"one-record commit (fsync floor): p50 {statistics.median(single):.2f} ms")


if __name__ == "__main__":
    main()
