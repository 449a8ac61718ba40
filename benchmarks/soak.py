"""Soak: the whole pipeline for a long while at a moderate rate, with periodic kill -9.

Usage: python benchmarks/soak.py [--minutes 30] [--rate 100] [--kill-every-s 120]
                                 [--rotation devbroker,processor,devbroker,persister]
                                 [--collector sink|none|URL] [--dir DIR] [--seed N] [--json FILE]

Starts a devbroker, the processor and the persister as subprocesses on loopback,
and a steady publisher (official AMPS client, durable publish store, one traced
message per id). Every ``--kill-every-s`` seconds (with random jitter) it sends
SIGKILL to one component and restarts it, in the rotation devbroker, processor,
devbroker, persister (``--rotation`` changes it): the daemons live through the
devbroker kills (they reconnect by themselves), so each daemon process runs for
several kill periods; ``--rotation devbroker`` keeps the daemons alive for the
whole run.
The resident memory of every process is sampled from ``/proc`` every few
seconds. At the end the load stops, the JSONL is left to settle, and
``ampsflow audit`` reconciles every published id against it.

Spans go, by default, to a local OTLP/HTTP sink that accepts and discards them
(so the export path is exercised without a backend's ingest cost); ``none``
turns export off; a URL sends them to a real collector.

Prints a summary (and, with ``--json``, writes it) and exits 0 only when the
audit is clean.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults.harness import rss_kib, run_audit, wait_settled
from tests.support.load import LoadConfig, SteadyPublisher
from tests.support.processes import (
    Daemon,
    Processes,
    pipeline_config,
    short_temp_dir,
    write_config,
)

ROTATION = ("devbroker", "processor", "devbroker", "persister")
SAMPLE_EVERY_S = 5.0
WARMUP_S = 60.0
"""RSS growth of an incarnation is measured from its first sample after this long."""


class DiscardingCollector:
    """An OTLP/HTTP endpoint that answers 200 to every export and keeps only counts."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                collector.requests += 1
                collector.bytes += length
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Incarnation:
    """One process of a component, from start to kill (or the end of the soak)."""

    pid: int
    started_at: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """RSS at start (after warm-up), at the end, and its peak, in MiB."""
        settled = [kib for t, kib in self.samples if t - self.started_at >= WARMUP_S]
        lifetime = (self.samples[-1][0] - self.started_at) if self.samples else 0.0
        return {
            "pid": self.pid,
            "lifetime_s": round(lifetime),
            "rss_first_mib": round(settled[0] / 1024, 1) if settled else None,
            "rss_last_mib": round(settled[-1] / 1024, 1) if settled else None,
            "rss_peak_mib": round(max(kib for _, kib in self.samples) / 1024, 1)
            if self.samples
            else None,
            "rss_quarters_mib": [
                round(settled[int(q * (len(settled) - 1))] / 1024, 1) for q in (0.25, 0.5, 0.75)
            ]
            if settled
            else [],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="messages per second")
    parser.add_argument("--kill-every-s", type=float, default=120.0)
    parser.add_argument(
        "--rotation",
        default=",".join(ROTATION),
        help="comma-separated components to kill in turn (default: %(default)s)",
    )
    parser.add_argument("--collector", default="sink", help="sink, none, or an OTLP/HTTP URL")
    parser.add_argument("--dir", type=Path, default=None, help="state directory (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the state directory")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    root = args.dir or short_temp_dir("af-soak-")
    root.mkdir(parents=True, exist_ok=True)
    collector = DiscardingCollector() if args.collector == "sink" else None
    endpoint = (
        collector.endpoint
        if collector is not None
        else (None if args.collector == "none" else args.collector)
    )
    try:
        summary = soak(root, args, seed, endpoint)
    finally:
        if collector is not None:
            collector.close()
    summary["collector"] = {"kind": args.collector}
    if collector is not None:
        summary["collector"].update(requests=collector.requests, bytes=collector.bytes)
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["audit"]["clean"] and not args.keep and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"state kept in {root}", file=sys.stderr)
    return 0 if summary["audit"]["clean"] else 1


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short text report."""
    audit = summary["audit"]
    out = [
        f"duration:        {summary['duration_s']} s at {summary['rate_per_s']:g} msg/s "
        f"(seed {summary['seed']})",
        f"published:       {summary['published']}",
        f"persisted lines: {summary['persisted_lines']} (settled {summary['settle_s']} s "
        "after the load stopped)",
        "kills (-9):      " + ", ".join(f"{k} {v}" for k, v in summary["kills"].items()),
        f"audit:           exit {audit['exit_status']}, lost {audit['lost']}, "
        f"duplicated {audit['duplicated']}, out of order {audit['out_of_order']}, "
        f"torn {audit['torn_last_line']}, invalid {audit['invalid_lines']} -> "
        + ("CLEAN" if audit["clean"] else "PROBLEMS"),
        f"spans collector: {summary.get('collector', {})}",
        f"RSS (MiB) per process: first sample after {WARMUP_S:.0f} s -> at 1/4, 1/2, 3/4 "
        "of its life -> last (peak):",
    ]
    for name, incarnations in summary["rss"].items():
        for inc in incarnations:
            if inc["rss_first_mib"] is None:
                growth = f"lived {inc['lifetime_s']} s (peak {inc['rss_peak_mib']})"
            else:
                path = " -> ".join(
                    str(v)
                    for v in [inc["rss_first_mib"], *inc["rss_quarters_mib"], inc["rss_last_mib"]]
                )
                growth = f"{path} (peak {inc['rss_peak_mib']}) over {inc['lifetime_s']} s"
            out.append(f"  {name:<10} pid {inc['pid']:<7} {growth}")
    return "\n".join(out)


def soak(root: Path, args: argparse.Namespace, seed: int, endpoint: str | None) -> dict[str, Any]:
    """Run the soak below ``root`` and return its summary."""
    rng = random.Random(seed)
    duration_s = args.minutes * 60
    rotation = [name.strip() for name in args.rotation.split(",") if name.strip()]
    procs = Processes(root)
    try:
        broker = procs.devbroker()
        config = write_config(
            root / "ampsflow.yaml",
            pipeline_config(root, broker, otlp_endpoint=endpoint),
        )
        daemons: dict[str, Daemon] = {
            "devbroker": broker,
            "processor": procs.service("processor", config),
            "persister": procs.service("persister", config),
        }
        incarnations: dict[str, list[Incarnation]] = {
            name: [Incarnation(d.pid, time.monotonic())] for name, d in daemons.items()
        }
        kills: dict[str, int] = dict.fromkeys(daemons, 0)
        publisher = SteadyPublisher(
            LoadConfig(
                uri=broker.uri,
                published_path=root / "published.txt",
                store_path=root / "publisher.store",
                rate_per_s=args.rate,
                client_name="soak-publisher",
            )
        )
        started = time.monotonic()
        publisher.start()
        next_kill = started + args.kill_every_s * rng.uniform(0.5, 1.5)
        next_sample = started
        turn = 0
        print(
            f"soak: {args.minutes} min at {args.rate}/s, kill every ~{args.kill_every_s}s, "
            f"seed {seed}, state in {root}",
            file=sys.stderr,
            flush=True,
        )
        while (now := time.monotonic()) - started < duration_s:
            if now >= next_sample:
                for name, daemon in daemons.items():
                    if daemon.running:
                        with contextlib.suppress(OSError, ValueError):
                            incarnations[name][-1].samples.append((now, rss_kib(daemon.pid)))
                next_sample = now + SAMPLE_EVERY_S
            if now >= next_kill:
                name = rotation[turn % len(rotation)]
                turn += 1
                daemons[name].kill()
                daemons[name].restart()
                kills[name] += 1
                incarnations[name].append(Incarnation(daemons[name].pid, time.monotonic()))
                print(
                    f"{now - started:7.0f}s kill -9 {name} #{kills[name]}; "
                    f"published {publisher.published}",
                    file=sys.stderr,
                    flush=True,
                )
                next_kill = now + args.kill_every_s * rng.uniform(0.5, 1.5)
            time.sleep(0.5)
        publisher.stop(flush_timeout_s=300)
        load_s = time.monotonic() - started
        jsonl = root / "messages.jsonl"
        settle_started = time.monotonic()
        lines = wait_settled(jsonl, expected_lines=publisher.published, timeout_s=600)
        settle_s = time.monotonic() - settle_started
        audit = run_audit(root / "published.txt", jsonl)
        report = audit.report
        return {
            "seed": seed,
            "duration_s": round(load_s),
            "rate_per_s": args.rate,
            "published": publisher.published,
            "persisted_lines": lines,
            "settle_s": round(settle_s, 1),
            "kills": kills,
            "audit": {
                "exit_status": audit.returncode,
                "clean": bool(report.get("clean")),
                "lost": len(report.get("lost", [])),
                "duplicated": len(report.get("duplicated", {})),
                "out_of_order": len(report.get("out_of_order", [])),
                "torn_last_line": report.get("torn_last_line"),
                "invalid_lines": len(report.get("invalid_lines", [])),
            },
            "rss": {name: [inc.summary() for inc in incs] for name, incs in incarnations.items()},
        }
    finally:
        procs.close()


if __name__ == "__main__":
    raise SystemExit(main())
