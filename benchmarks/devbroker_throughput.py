"""devbroker throughput and latency with the official Python client, transaction log on.

Starts ``python -m ampsflow devbroker`` as a subprocess on loopback with a fresh data
directory, connects one publisher and one subscriber (official ``AMPS`` Python client, TCP),
and runs two phases:

1. throughput: the publisher sends ``--messages`` ~200-byte JSON messages as fast as it can,
   then ``publish_flush``; reported: publish rate and the subscriber's sustained receive
   rate (first to last message);
2. latency: ``--latency-messages`` messages paced at ``--latency-rate`` msgs/s; reported:
   publish-to-delivery latency p50/p99 (every message is committed with fdatasync before
   it is delivered, so this includes the group commit).

Usage::

    python benchmarks/devbroker_throughput.py [--messages 200000] [--latency-rate 20000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import AMPS

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(i: int, *, latency: bool = False) -> str:
    """A ~200-byte JSON message carrying its send time in nanoseconds."""
    doc = {
        "lat": int(latency),
        "id": i,
        "sent_ns": time.time_ns(),
        "sym": "ACME",
        "side": "buy",
        "px": 101.25,
        "qty": 300,
        "account": "benchmark-account-0001",
        "note": "x" * 52,
    }
    return json.dumps(doc, separators=(",", ":"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscriber_process(uri: str, n: int, total: int, ready: Any, results: Any) -> None:
    """Count messages (and latencies of the paced phase) in a process of its own."""
    done = threading.Event()
    state = {"count": 0, "first": 0.0, "last": 0.0, "phase1_last": 0.0}
    latencies: list[int] = []

    def on_message(message: AMPS.Message) -> None:
        now = time.perf_counter()
        data = message.get_data()
        if data.startswith('{"lat":1'):
            start = data.index('"sent_ns":') + 10
            latencies.append(time.time_ns() - int(data[start : data.index(",", start)]))
        if state["count"] == 0:
            state["first"] = now
        state["count"] += 1
        state["last"] = now
        if state["count"] == n:
            state["phase1_last"] = now
        if state["count"] >= total:
            done.set()

    client = AMPS.Client("bench-sub")
    client.connect(uri)
    client.logon()
    client.subscribe(on_message, "bench")
    ready.set()
    finished = done.wait(300)
    client.close()
    results.put((finished, state["count"], state["first"], state["phase1_last"], latencies))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--latency-messages", type=int, default=50_000)
    parser.add_argument("--latency-rate", type=int, default=20_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="devbroker-bench-") as tmp:
        tcp, ws = free_port(), free_port()
        config = Path(tmp) / "ampsflow.yaml"
        config.write_text("logging:\n  level: info\n", encoding="utf-8")
        broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ampsflow",
                "devbroker",
                "--config",
                str(config),
                "--tcp",
                f"127.0.0.1:{tcp}",
                "--websocket",
                f"127.0.0.1:{ws}",
                "--data-dir",
                str(Path(tmp) / "data"),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            uri = f"tcp://127.0.0.1:{tcp}/amps/json?tcp_nodelay=true"
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            n, m = args.messages, args.latency_messages
            ctx = multiprocessing.get_context("spawn")
            ready, results = ctx.Event(), ctx.Queue()
            sub = ctx.Process(target=subscriber_process, args=(uri, n, n + m, ready, results))
            sub.start()
            if not ready.wait(30):
                raise SystemExit("subscriber did not start")
            publisher = AMPS.Client("bench-pub")
            publisher.connect(uri)
            publisher.logon()

            bodies = [body(i) for i in range(n)]
            cpu_before = cpu_seconds(broker.pid)
            started = time.perf_counter()
            for data in bodies:
                publisher.publish("bench", data)
            published = time.perf_counter()
            publisher.publish_flush(120_000)
            flushed = time.perf_counter()
            cpu_used = cpu_seconds(broker.pid) - cpu_before

            interval = 1.0 / args.latency_rate
            paced = time.perf_counter()
            for i in range(m):
                # Sleep rather than spin: a spinning publisher would take a core from the
                # broker and the subscriber on a small machine.
                ahead = paced + i * interval - time.perf_counter()
                if ahead > 0.0005:
                    time.sleep(ahead)
                publisher.publish("bench", body(n + i, latency=True))
            publisher.publish_flush(120_000)
            finished, count, first, last, latencies = results.get(timeout=300)
            sub.join(30)
            publisher.close()
            if not finished:
                raise SystemExit(f"timed out: {count} of {n + m} messages received")
            print(f"message size: {len(body(0))} bytes, {n} + {m} messages")
            print(f"publish (client side): {n / (published - started):,.0f} msgs/s")
            print(f"published and persisted (publish_flush): {n / (flushed - started):,.0f} msgs/s")
            print(f"subscriber sustained: {(n - 1) / (last - first):,.0f} msgs/s")
            print(
                f"broker CPU: {cpu_used:.2f} s for {n} messages = "
                f"{cpu_used / n * 1e6:.1f} us/message (one core: {n / cpu_used:,.0f} msgs/s)"
            )
            lat = sorted(latencies)
            p50 = statistics.median(lat) / 1e6
            p99 = lat[int(len(lat) * 0.99) - 1] / 1e6
            print(
                f"latency at {args.latency_rate:,} msgs/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                " (publish to delivery, fdatasync included)"
            )
        finally:
            broker.terminate()
            broker.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
