"""Scale-out benchmark: 1, 2, 3... processors sharing one AMPS message queue.

For each processor count N (``--processors 1,2,3``), on a fresh devbroker and fresh
daemons: the devbroker runs the queue ``internal-queue`` over ``internal``; N processors
run in ``input_mode: queue`` (own client names and state directories, ``max_backlog``
``--backlog``); one persister writes the JSONL. Telemetry export is off (this measures the
message path, not tracing; ``pipeline.py`` measures tracing). The official client then
publishes ``--messages`` marks (~200 bytes) to ``internal`` as fast as it can, and the run
ends when every id is in the JSONL.

Reported per N:

- **throughput**: messages / (time the last line appeared - first publish);
- **CPU per message** of each processor (and their sum), of the broker and of the
  persister: ``utime + stime`` deltas from ``/proc/PID/stat`` over the run, divided by the
  messages;
- **fairness spread**: messages persisted per processor (told apart by the publisher id
  in each line's output bookmark), as ``(max - min) / mean``;
- **repeats**: ids persisted more than once (must be 0: nothing is lost or duplicated).

The **16-core projection** assumes what the design gives: each daemon is one Python
process that uses about one core at most (the GIL), and the processors do not contend
with each other except through the broker. With ``p`` = CPU seconds per message of the
processors together (each message is processed by one of them), ``b`` = the broker's,
``s`` = the persister's, and ``C`` cores, the rate is bounded by the busiest single
process and by the cores:
``min(P / p, 1 / b, 1 / s, C / (p + b + s))`` with ``P = C - 2`` processors (one core each
for broker and persister). On the 2-core development machine the measured rates cannot
scale (the daemons share two cores with each other and with other work); the projection
is what the measured CPU per message allows on 16 cores.

Usage (from the repository root; run it on an otherwise idle machine)::

    python benchmarks/queue_scaleout.py [--processors 1,2,3] [--messages 20000]
        [--backlog 20] [--json benchmarks/results/queue_scaleout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampsflow.devbroker.bookmarks import publisher_id  # noqa: E402
from benchmarks.pipeline import (  # noqa: E402
    Publisher,
    cpu_seconds,
    machine,
)
from tests.support.processes import (  # noqa: E402
    Processes,
    pipeline_config,
    processes,
    wait_for,
    write_config,
)

QUEUE = "internal-queue"
CORES_PROJECTED = 16
_ID = re.compile(rb'"id":\s*"([^"]*)"')
_BOOKMARK = re.compile(rb'"bookmark":\s*"(\d+)\|')


def count_lines(path: Path) -> int:
    """Complete lines in the JSONL so far (0 before it exists)."""
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def start(group: Processes, root: Path, n: int, backlog: int) -> dict[str, Any]:
    """Start the broker with the queue, ``n`` queue processors and the persister."""
    broker_config = write_config(
        root / "devbroker.yaml",
        {
            "logging": {"level": "warning"},
            "devbroker": {
                "queues": [
                    {
                        "name": QUEUE,
                        "underlying_topic": "internal",
                        "max_per_subscription_backlog": backlog,
                        "lease_period_s": 60,
                    }
                ]
            },
        },
    )
    broker = group.devbroker(config=broker_config)
    base = pipeline_config(
        root,
        broker,
        overrides={
            "processor": {"input_mode": "queue", "input_topic": QUEUE, "max_backlog": backlog},
            "logging": {"level": "warning"},
        },
    )
    names: dict[str, str] = {}
    daemons = {"devbroker": broker}
    for i in range(1, n + 1):
        config = json.loads(json.dumps(base))
        name = f"bench-processor-{i}"
        config["amps"]["client_name"] = name
        config["processor"]["state_dir"] = str(root / f"processor{i}")
        path = write_config(root / f"processor{i}.yaml", config)
        label = f"processor{i}"
        daemons[label] = group.service("processor", path, name=label)
        names[str(publisher_id(name))] = label
    daemons["persister"] = group.service("persister", write_config(root / "persister.yaml", base))
    return {
        "uri": broker.uri,
        "daemons": daemons,
        "names": names,
        "jsonl": Path(base["persister"]["path"]),
    }


def run_one(n: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One measurement with ``n`` processors."""
    root.mkdir(parents=True)
    with processes(root) as group:
        setup = start(group, root, n, args.backlog)
        daemons = setup["daemons"]
        jsonl: Path = setup["jsonl"]
        publisher = Publisher(setup["uri"], f"bench-load-{n}", sampled_ratio=0.0)
        cpu_before = {label: cpu_seconds(d.pid) for label, d in daemons.items()}
        start_ns, publish_rate = publisher.burst(f"q{n}", args.messages)
        publisher.close()
        wait_for(
            lambda: count_lines(jsonl) >= args.messages,
            timeout_s=args.timeout,
            what=f"{args.messages} lines in the JSONL",
        )
        last_line_ns = time.time_ns()
        cpu = {label: cpu_seconds(d.pid) - cpu_before[label] for label, d in daemons.items()}
    wall_s = (last_line_ns - start_ns) / 1e9
    raw = jsonl.read_bytes().splitlines()
    ids = Counter(m.group(1).decode() for m in map(_ID.search, raw) if m)
    per_processor = Counter(
        setup["names"].get(m.group(1).decode(), "?") for m in map(_BOOKMARK.search, raw) if m
    )
    shares = [per_processor.get(f"processor{i}", 0) for i in range(1, n + 1)]
    mean = sum(shares) / n
    messages = args.messages
    per_message = {label: seconds / messages * 1e6 for label, seconds in cpu.items()}
    processor_us = [per_message[f"processor{i}"] for i in range(1, n + 1)]
    return {
        "processors": n,
        "messages": messages,
        "publish_rate": round(publish_rate),
        "wall_s": round(wall_s, 3),
        "throughput": round(messages / wall_s),
        "cpu_us_per_message": {k: round(v, 1) for k, v in per_message.items()},
        "processor_cpu_us_per_message_total": round(sum(processor_us), 1),
        "per_processor": dict(zip((f"processor{i}" for i in range(1, n + 1)), shares, strict=True)),
        "fairness_spread": round((max(shares) - min(shares)) / mean, 3) if mean else None,
        "lost": sum(1 for i in range(messages) if f"q{n}-{i:07d}" not in ids),
        "repeats": sum(c - 1 for c in ids.values() if c > 1),
    }


def project(result: dict[str, Any], cores: int = CORES_PROJECTED) -> dict[str, Any]:
    """The rate ``cores`` cores would give, from a run's CPU per message (module docstring)."""
    cpu = result["cpu_us_per_message"]
    p = result["processor_cpu_us_per_message_total"] / 1e6  # CPU s per message, all processors
    b = cpu["devbroker"] / 1e6
    s = cpu["persister"] / 1e6
    processors = cores - 2
    bounds = {
        "processors": processors / p,
        "broker": 1 / b,
        "persister": 1 / s,
        "cores": cores / (p + b + s),
    }
    limit = min(bounds, key=lambda k: bounds[k])
    return {
        "cores": cores,
        "processors": processors,
        "msgs_per_s": round(bounds[limit]),
        "limited_by": limit,
        "bounds": {k: round(v) for k, v in bounds.items()},
    }


def print_table(results: list[dict[str, Any]], context: dict[str, str]) -> None:
    """One row per processor count, then the projection."""
    print(
        f"\nmachine: {context['cpu']}, {context['cores']} cores, load average "
        f"{context['load_average']} at the start ({context['taken_at']})"
    )
    print(
        f"{'N':>2} {'msgs/s':>8} {'proc µs/msg':>12} {'broker':>8} {'persister':>10} "
        f"{'spread':>7} {'per processor':<28} {'lost':>4} {'rep':>4}"
    )
    for r in results:
        cpu = r["cpu_us_per_message"]
        spread = "-" if r["fairness_spread"] is None else f"{r['fairness_spread']:.3f}"
        shares = "/".join(str(v) for v in r["per_processor"].values())
        print(
            f"{r['processors']:>2} {r['throughput']:>8} "
            f"{r['processor_cpu_us_per_message_total']:>12} {cpu['devbroker']:>8} "
            f"{cpu['persister']:>10} {spread:>7} {shares:<28} {r['lost']:>4} {r['repeats']:>4}"
        )
    best = results[-1]
    projection = project(best)
    print(
        f"\n16-core projection from the N={best['processors']} run's CPU per message: "
        f"{projection['msgs_per_s']} msgs/s with {projection['processors']} processors, "
        f"limited by the {projection['limited_by']} (bounds: {projection['bounds']})"
    )


def main() -> int:
    """Run every processor count and print (and optionally save) the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--processors", default="1,2,3", help="comma list of processor counts")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--backlog", type=int, default=20, help="max_backlog per processor")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("OTEL_METRICS_EXPORTER", "none")
    context = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="ampsflow-queue-bench-") as tmp:
        for n in (int(x) for x in args.processors.split(",")):
            print(f"{n} processor(s): {args.messages} messages...", flush=True)
            results.append(run_one(n, args, Path(tmp) / f"n{n}"))
    context["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_table(results, context)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": context, "results": results, "projection": project(results[-1])},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0 if all(r["lost"] == 0 and r["repeats"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
