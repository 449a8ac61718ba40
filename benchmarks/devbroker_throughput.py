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
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import AMPS

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(i: int) -> str:
    """A ~200-byte JSON message carrying its send time in nanoseconds."""
    doc = {
        "id": i,
        "sent_ns": time.time_ns(),
        "sym": "ACME",
        "side": "buy",
        "px": 101.25,
        "qty": 300,
        "account": "benchmark-account-0001",
        "note": "x" * 60,
    }
    return json.dumps(doc, separators=(",", ":"))


class Subscriber:
    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies_ns: list[int] = []
        self.measure = False
        self.lock = threading.Lock()

    def __call__(self, message: AMPS.Message) -> None:
        now = time.perf_counter()
        if self.measure:
            data = message.get_data()
            start = data.index('"sent_ns":') + 10
            sent = int(data[start : data.index(",", start)])
            self.latencies_ns.append(time.time_ns() - sent)
        with self.lock:
            if self.count == 0:
                self.first = now
            self.count += 1
            self.last = now

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {self.count} of {count} messages received")
            time.sleep(0.005)


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
            uri = f"tcp://127.0.0.1:{tcp}/amps/json"
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            sub = Subscriber()
            subscriber = AMPS.Client("bench-sub")
            subscriber.connect(uri)
            subscriber.logon()
            subscriber.subscribe(sub, "bench")
            publisher = AMPS.Client("bench-pub")
            publisher.connect(uri)
            publisher.logon()

            n = args.messages
            sample = body(0)
            started = time.perf_counter()
            for i in range(n):
                publisher.publish("bench", body(i))
            published = time.perf_counter()
            publisher.publish_flush(120_000)
            sub.wait_for(n, 120)
            pub_rate = n / (published - started)
            sustained = (n - 1) / (sub.last - sub.first) if sub.last > sub.first else 0.0
            print(f"message size: {len(sample)} bytes")
            print(f"throughput: {n} messages, publish {pub_rate:,.0f} msgs/s")
            print(f"throughput: subscriber sustained {sustained:,.0f} msgs/s")

            m = args.latency_messages
            sub.measure = True
            interval = 1.0 / args.latency_rate
            start = time.perf_counter()
            for i in range(m):
                target = start + i * interval
                while time.perf_counter() < target:
                    pass
                publisher.publish("bench", body(n + i))
            sub.wait_for(n + m, 120)
            lat = sorted(sub.latencies_ns)
            p50 = statistics.median(lat) / 1e6
            p99 = lat[int(len(lat) * 0.99) - 1] / 1e6
            print(
                f"latency at {args.latency_rate:,} msgs/s ({m} messages): "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
            publisher.close()
            subscriber.close()
        finally:
            broker.terminate()
            broker.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
