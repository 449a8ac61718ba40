"""End-to-end pipeline benchmark: official AMPS client -> devbroker -> processor -> persister.

For each tracing mode, in the same run and on fresh daemons and a fresh broker log:

- ``off``: ``telemetry.exporter: none``, ``sampler_ratio: 0``, CorrelationIds flagged
  not sampled (the daemons still decode and re-encode them);
- ``100``: OTLP/HTTP export to a local receiver (:mod:`otlp_sink`, its own process),
  ``sampler_ratio: 1``, every CorrelationId flagged sampled;
- ``10``: as ``100`` with ``sampler_ratio: 0.1`` and 10% of CorrelationIds flagged
  sampled (the daemons' sampler is parent-based, so the publisher's flag decides, as
  the marker page's does).

Each mode first publishes ``--warmup-seconds`` (2) at the first rate, unmeasured (the
daemons' first messages take code paths for the first time), then runs three phases, all
with ~200-byte JSON marks that carry a unique ``id``, the send time and the CorrelationId
in the header and in the payload, published with the official ``AMPS`` Python client to
``internal``:

1. latency at a fixed offered load of 1,000 msgs/s (``--rates``), open loop: each
   message is stamped with its scheduled send time, so a stall of the publisher or
   the pipeline is counted, not hidden;
2. the same at 5,000 msgs/s;
3. throughput: ``--messages`` messages published as fast as the client can; the
   sustained rate is ``messages / (last line in the JSONL - first publish)``.

Latency is from the scheduled send time to the moment a reader process tailing the
JSONL file (polling every 0.5 ms) sees the line; the persister writes then
``fdatasync``s each batch, so the line becomes visible one ``fdatasync`` before it
is durable (see ``persister_durability.py`` for that disk's figure). The reader has
the file open before anything is published. All processes are on this host: one clock.

CPU per message of each daemon is the ``utime + stime`` delta of its process
(``/proc/PID/stat``, every thread, including the span export thread) over a phase,
divided by the messages of that phase.

Nothing may be lost: each mode checks that every published id is in the JSONL
exactly once, and, with tracing on, counts the spans the receiver got against the
spans expected (``process-message`` per sampled message in the processor,
``persist-message`` in the persister). Metric export is off in every mode
(``OTEL_METRICS_EXPORTER=none``) so that the comparison isolates tracing.

``--tap`` adds a subscriber to ``internal`` and ``external`` (its own process) so the
latency of each fixed-rate phase is split per hop: broker delivery, processor, second
broker hop, persister. It adds two deliveries per message to the broker's work.

``--profile DIR`` also records ``py-spy`` profiles (``--gil``: samples of the thread
holding the GIL, i.e. Python CPU) of the three daemons during each throughput phase:
collapsed stacks in DIR, and a summary of the functions with the largest share.

``--modes naive`` (and ``naive-off``) run ``naive.py``, the seed's naive design
(one SDK span per message through ``BatchSpanProcessor`` and ``OTLPSpanExporter``,
``json``, one fsync per line, none of ampsflow's guarantees), as the baseline.

Usage (from the repository root)::

    python benchmarks/pipeline.py [--messages 50000] [--rates 1000,5000]
        [--seconds 10] [--modes off,100,10] [--json benchmarks/results/pipeline.json]
        [--profile DIR] [--tap] [--set persister.max_batch_delay_ms=1 ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import AMPS
import yaml

REPO = Path(__file__).resolve().parents[1]
# The daemon helpers of the test suite start, watch and stop the daemons; they
# live in the repository's tests package, which is not installed.
sys.path.insert(0, str(REPO))

from benchmarks.otlp_sink import OtlpSink  # noqa: E402
from tests.support.processes import (  # noqa: E402
    Daemon,
    pipeline_config,
    processes,
    wait_for,
    write_config,
)

TOPIC = "internal"
POLL_S = 0.0005
DRAIN_TIMEOUT_S = 300.0
MESSAGE_BYTES = 200

_ID = re.compile(rb'"id":\s*"([^"]*)"')
_SENT = re.compile(rb'"sent_ns":\s*(\d+)')
_PERSISTED_AT = re.compile(rb'"persisted_at":\s*"([^"]*)"')


@dataclass(frozen=True)
class Mode:
    """One tracing configuration."""

    name: str
    exporter: str
    sampler_ratio: float
    label: str
    naive: bool = False
    """Run ``naive.py`` (the seed's naive design) instead of the daemons."""


MODES = {
    "off": Mode("off", "none", 0.0, "tracing off"),
    "100": Mode("100", "otlp", 1.0, "sampling 100%"),
    "10": Mode("10", "otlp", 0.1, "sampling 10%"),
    "naive": Mode("naive", "otlp", 1.0, "naive design, sampling 100%", naive=True),
    "naive-off": Mode("naive-off", "none", 0.0, "naive design, tracing off", naive=True),
}


class NaiveDaemon(Daemon):
    """``benchmarks/naive.py`` run like a daemon (ready at ``READY=1``, SIGTERM stops it)."""

    def start(self, timeout_s: float = 60.0, *, wait: bool = True) -> Daemon:
        assert not self.running, f"{self.name} is already running"
        self.notify.clear()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "benchmarks" / "naive.py"), *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"{self.name} exited while starting:\n{self.log_tail()}")
            return bool(self.notify.values("READY"))

        if wait:
            wait_for(ready, timeout_s=timeout_s, what=f"{self.name} to become ready")
        return self


@dataclass
class Phase:
    """What one phase published and what came out."""

    name: str
    messages: int
    offered_rate: float | None
    published_rate: float = 0.0
    first_publish_ns: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def correlation_id(sampled: bool) -> str:
    """A fresh 52-hex-digit CorrelationId (W3C traceparent without dashes)."""
    trace_id = random.getrandbits(128) | 1
    span_id = random.getrandbits(64) | 1
    return f"00{trace_id:032x}{span_id:016x}{'01' if sampled else '00'}"


def mark(message_id: str, sent_ns: int, cid: str) -> str:
    """A ~200-byte JSON mark like the page's, padded to :data:`MESSAGE_BYTES`."""
    head = f'{{"id":"{message_id}","sent_ns":{sent_ns},"source":"benchmark","text":"'
    tail = f'","CorrelationId":"{cid}"}}'
    return head + "x" * max(0, MESSAGE_BYTES - len(head) - len(tail)) + tail


def tap(uri: str, stop: Any, ready: Any, results: Any) -> None:
    """Subscribe to ``internal`` and ``external``; record when each id arrives on each."""
    arrivals: dict[str, list[tuple[str, int]]] = {TOPIC: [], "external": []}

    def on_message(message: Any) -> None:
        now = time.time_ns()
        found = _ID.search(message.get_data_raw() or b"")
        topic = message.get_topic()
        if found and topic in arrivals:
            arrivals[topic].append((found.group(1).decode(), now))

    client = AMPS.Client(f"bench-tap-{os.getpid()}")
    client.connect(uri)
    client.logon()
    client.subscribe(on_message, TOPIC)
    client.subscribe(on_message, "external")
    ready.set()
    stop.wait()
    client.close()
    results.put(arrivals)


def tail_reader(path: str, stop: Any, ready: Any, count: Any, results: Any) -> None:
    """Tail the JSONL file; record (id, sent_ns, seen_ns, persisted_at) of every line.

    ``ready`` is set once the file is open: a line written before the reader runs would
    be seen as late as the reader's start (~0.1 s), which is the p99 of a 10 s phase.
    """
    while not os.path.exists(path):
        if stop.is_set():
            results.put([])
            return
        time.sleep(0.01)
    seen: list[tuple[bytes, int, int, bytes]] = []
    pending = b""
    with open(path, "rb") as f:
        ready.set()
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                if stop.is_set():
                    break
                time.sleep(POLL_S)
                continue
            now = time.time_ns()
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                ident = _ID.search(line)
                sent = _SENT.search(line)
                at = _PERSISTED_AT.search(line)
                seen.append(
                    (
                        ident.group(1) if ident else b"",
                        int(sent.group(1)) if sent else 0,
                        now,
                        at.group(1) if at else b"",
                    )
                )
            with count.get_lock():
                count.value += len(lines)
    results.put(seen)


class Publisher:
    """One official-client connection publishing marks to ``internal``."""

    def __init__(self, uri: str, name: str, sampled_ratio: float) -> None:
        self.client = AMPS.Client(name)
        self.client.connect(uri)
        self.client.logon()
        self.sampled_ratio = sampled_ratio
        self.ids: list[str] = []
        self.sampled = 0

    def _sampled(self) -> bool:
        sampled = random.random() < self.sampled_ratio
        self.sampled += sampled
        return sampled

    def burst(self, prefix: str, n: int) -> tuple[int, float]:
        """Publish ``n`` pre-built marks as fast as possible; (start ns, publish rate)."""
        batch = []
        for i in range(n):
            cid = correlation_id(self._sampled())
            message_id = f"{prefix}-{i:07d}"
            batch.append((mark(message_id, 0, cid), cid))
            self.ids.append(message_id)
        publish = self.client.publish
        start_ns = time.time_ns()
        start = time.perf_counter()
        for body, cid in batch:
            publish(TOPIC, body, correlation_id=cid)
        elapsed = time.perf_counter() - start
        return start_ns, n / elapsed

    def paced(self, prefix: str, rate: float, n: int) -> tuple[int, float]:
        """Publish ``n`` marks at ``rate`` msgs/s, stamped with their scheduled time."""
        publish = self.client.publish
        interval = 1.0 / rate
        start = time.perf_counter()
        start_ns = time.time_ns()
        for i in range(n):
            due = i * interval
            ahead = due - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
            cid = correlation_id(self._sampled())
            message_id = f"{prefix}-{i:07d}"
            publish(TOPIC, mark(message_id, start_ns + int(due * 1e9), cid), correlation_id=cid)
            self.ids.append(message_id)
        return start_ns, n / (time.perf_counter() - start)

    def close(self) -> None:
        """Wait for the broker to take everything, then disconnect."""
        try:
            self.client.publish_flush(60_000)
        finally:
            self.client.close()


class Profiler:
    """py-spy recording the daemons of one phase (collapsed stacks)."""

    def __init__(self, out_dir: Path, label: str, pids: dict[str, int]) -> None:
        self.files: dict[str, Path] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            path = out_dir / f"{label}-{name}.collapsed"
            self.files[name] = path
            self.procs.append(
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--nonblocking",
                        # Only the thread holding the GIL: the CPU of Python code, without
                        # the samples of threads that merely wait for the GIL.
                        "--gil",
                        "--output",
                        str(path),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # py-spy needs a moment to attach

    def stop(self) -> None:
        """Stop recording and write the files."""
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


ACTIVITIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("OTLP export thread (encode + POST)", ("BatchProcessor.worker",)),
    ("AMPS client callback -> queue", ("AmpsClient._on_message",)),
    ("metrics", ("Counter.add", "Histogram.record", "metric_attributes")),
    (
        "span start/end/attributes",
        (
            "start_as_current_span",
            "Tracer.start_span",
            "Span.end",
            "Span.add_event",
            "Span.set_attribute",
            "_GeneratorContextManager.__exit__",
            "_AgnosticContextManager.__exit__",
            "record_failure",
            "messaging_attributes",
        ),
    ),
    (
        "CorrelationId decode/encode",
        ("extract_context", "correlation_id_of", "encode_correlation_id"),
    ),
    (
        "JSON parse/build/serialise",
        ("parse_body", "serialise", "mark_processed", "build_line", "loads", "dumps"),
    ),
    ("AMPS publish/discard", ("AmpsClient.publish", "AmpsClient.discard")),
    ("JSONL write + fdatasync", ("JsonlSink.commit",)),
    ("AMPS receive (queue get)", ("AmpsClient.receive",)),
    (
        "provenance, timestamp, dedupe",
        ("format_timestamp", "dedupe_key", "JsonlSink.contains", "Provenance"),
    ),
    ("devbroker transaction log", ("TransactionLog.",)),
)
"""Activities a sample is counted under: the first one (from the outermost frame in)
whose pattern is in a frame's name."""


def activity_of(frames: list[str]) -> str:
    """The activity of one stack (outermost frame first)."""
    for frame in frames:
        for name, patterns in ACTIVITIES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares of samples per function in a collapsed-stack file."""
    activities: Counter[str] = Counter()
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "activities": [], "self": [], "inclusive": []}
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        activities[activity_of(frames)] += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"samples": 0, "activities": [], "self": [], "inclusive": []}
    return {
        "samples": total,
        "activities": [(a, round(100 * c / total, 1)) for a, c in activities.most_common()],
        "self": [(f, round(100 * c / total, 1)) for f, c in self_counts.most_common(top)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(top * 3)],
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def timestamp_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC timestamp (``...Z``)."""
    if not text:
        return 0
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def distribution(values_ns: list[int]) -> dict[str, float | None]:
    """p50/p99/p99.9/max/mean in milliseconds."""
    lat = sorted(v / 1e6 for v in values_ns)
    return {
        "p50": round(percentile(lat, 0.50), 2),
        "p99": round(percentile(lat, 0.99), 2),
        "p99.9": round(percentile(lat, 0.999), 2),
        "max": round(lat[-1], 2) if lat else None,
        "mean": round(statistics.fmean(lat), 2) if lat else None,
    }


def run_mode(mode: Mode, args: argparse.Namespace, sink: OtlpSink, root: Path) -> dict[str, Any]:
    """Run every phase of one tracing mode on fresh daemons; return its figures."""
    root.mkdir(parents=True)
    result: dict[str, Any] = {"mode": mode.name, "label": mode.label}
    ctx = multiprocessing.get_context("spawn")
    with_tracing = mode.exporter != "none"
    with processes(root) as group:
        broker = group.devbroker()
        config = pipeline_config(
            root,
            broker,
            overrides={
                "telemetry": {
                    "exporter": mode.exporter,
                    "endpoint": sink.endpoint,
                    "sampler_ratio": mode.sampler_ratio,
                    # The shipped default; the test helper's shorter delay is for tests.
                    "schedule_delay_ms": 500,
                },
                "logging": {"level": "info"},
            },
        )
        for section, values in args.set.items():
            config.setdefault(section, {}).update(values)
        config_path = write_config(root / "ampsflow.yaml", config)
        persister: Daemon
        processor: Daemon
        if mode.naive:
            common = [
                "--uri",
                broker.uri,
                "--endpoint",
                sink.endpoint,
                "--exporter",
                mode.exporter,
                "--sampler-ratio",
                str(mode.sampler_ratio),
            ]
            persister = NaiveDaemon(
                "persister",
                ["persister", *common, "--path", config["persister"]["path"]],
                root / "persister.log",
            ).start()
            processor = NaiveDaemon("processor", ["processor", *common], root / "processor.log")
            processor.start()
            group._daemons += [persister, processor]  # stopped with the group
        else:
            persister = group.service("persister", config_path)
            processor = group.service("processor", config_path)
        daemons: dict[str, Daemon] = {
            "devbroker": broker,
            "processor": processor,
            "persister": persister,
        }
        jsonl = Path(config["persister"]["path"])
        stop, reader_ready = ctx.Event(), ctx.Event()
        count, results = ctx.Value("q", 0), ctx.Queue()
        reader = ctx.Process(
            target=tail_reader, args=(str(jsonl), stop, reader_ready, count, results)
        )
        reader.start()
        if not reader_ready.wait(30):
            raise RuntimeError("the JSONL reader did not start")
        tap_stop, tap_ready, tap_results = ctx.Event(), ctx.Event(), ctx.Queue()
        tapper = None
        if args.tap:
            tapper = ctx.Process(target=tap, args=(broker.uri, tap_stop, tap_ready, tap_results))
            tapper.start()
            if not tap_ready.wait(30):
                raise RuntimeError("the tap subscriber did not start")
        publisher = Publisher(broker.uri, f"bench-{mode.name}", mode.sampler_ratio)
        phases: list[Phase] = []
        expected_lines = 0

        def measure(phase: Phase, action: Any) -> None:
            nonlocal expected_lines
            before = {name: cpu_seconds(d.pid) for name, d in daemons.items()}
            started = time.perf_counter()
            phase.first_publish_ns, phase.published_rate = action()
            expected_lines += phase.messages
            wait_for(
                lambda: count.value >= expected_lines,
                timeout_s=DRAIN_TIMEOUT_S,
                what=f"{expected_lines} lines in {jsonl} (have {count.value})",
            )
            phase.wall_s = time.perf_counter() - started
            phase.cpu_s = {name: cpu_seconds(d.pid) - before[name] for name, d in daemons.items()}
            phases.append(phase)

        try:
            if args.warmup_seconds > 0 and args.rates:
                rate = args.rates[0]
                warmup = Phase("warmup", int(rate * args.warmup_seconds), float(rate))
                measure(warmup, lambda: publisher.paced("warmup", rate, warmup.messages))
                phases.remove(warmup)  # checked for loss, not reported
                time.sleep(1.0)
            for rate in args.rates:
                n = int(rate * args.seconds)
                phase = Phase(f"rate{rate}", n, float(rate))
                measure(phase, lambda p=phase, r=rate: publisher.paced(p.name, r, p.messages))
                time.sleep(1.0)
            phase = Phase("burst", args.messages, None)
            profiler = (
                Profiler(
                    args.profile,
                    f"{mode.name}-burst",
                    {name: d.pid for name, d in daemons.items()},
                )
                if args.profile
                else None
            )
            try:
                measure(phase, lambda: publisher.burst("burst", args.messages))
            finally:
                if profiler is not None:
                    profiler.stop()
            if profiler is not None:
                result["profile"] = {
                    name: summarise_profile(path) for name, path in profiler.files.items()
                }
        finally:
            publisher.close()
            # SIGTERM flushes the span queues; the receiver then holds every span.
            for name in ("processor", "persister"):
                status = daemons[name].terminate()
                result[f"{name}_exit"] = status
            stop.set()
            seen: list[tuple[bytes, int, int, bytes]] = results.get(timeout=120)
            reader.join(30)
            tapped: dict[str, dict[str, int]] = {}
            if tapper is not None:
                tap_stop.set()
                tapped = {t: dict(rows) for t, rows in tap_results.get(timeout=120).items()}
                tapper.join(30)
        result["log_problems"] = {
            name: [
                line
                for line in d.log_text().splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line
            ][:10]
            for name, d in daemons.items()
        }

    # -- loss check --------------------------------------------------------------
    ids = Counter(ident.decode() for ident, _, _, _ in seen)
    published = publisher.ids
    missing = [i for i in published if ids[i] == 0]
    duplicates = [i for i, c in ids.items() if c > 1]
    result["published"] = len(published)
    result["lines"] = len(seen)
    result["missing"] = len(missing)
    result["duplicates"] = len(duplicates)
    if with_tracing:
        spans = sink.spans()
        result["spans"] = spans["spans"]
        result["otlp_bytes"] = spans["bytes"].get("/v1/traces", 0)
        result["otlp_requests"] = spans["requests"].get("/v1/traces", 0)
        # Each sampled mark makes one span of each kind; the rest are not recorded.
        result["sampled_marks"] = publisher.sampled
    # -- per phase figures ------------------------------------------------------------
    by_phase: dict[str, list[tuple[int, int, int]]] = {}
    hops: dict[str, list[tuple[int, int, int]]] = {}
    for ident, sent, seen_ns, at in seen:
        name = ident.decode()
        phase_name = name.rsplit("-", 1)[0]
        by_phase.setdefault(phase_name, []).append((sent, seen_ns, timestamp_ns(at.decode())))
        if tapped and name in tapped[TOPIC] and name in tapped["external"]:
            hops.setdefault(phase_name, []).append(
                (sent, tapped[TOPIC][name], tapped["external"][name])
            )
    result["phases"] = []
    for phase in phases:
        rows = by_phase.get(phase.name, [])
        entry: dict[str, Any] = {
            "phase": phase.name,
            "messages": phase.messages,
            "lines": len(rows),
            "offered_rate": phase.offered_rate,
            "published_rate": round(phase.published_rate),
            "cpu_us_per_msg": {
                name: round(1e6 * s / phase.messages, 1) for name, s in phase.cpu_s.items()
            },
        }
        if phase.offered_rate is not None:
            entry["latency_ms"] = distribution([seen_ns - sent for sent, seen_ns, _ in rows])
            # Where the time went: up to the persister taking the message (its
            # persisted_at, stamped when the line is built), then batching, write
            # and fdatasync until the line is in the file.
            entry["to_persister_ms"] = distribution([at - sent for sent, _, at in rows])
            entry["in_persister_ms"] = distribution([seen_ns - at for _, seen_ns, at in rows])
            if phase.name in hops:
                # With --tap: arrival on internal (broker) and on external (processor).
                entry["to_internal_ms"] = distribution([i - s for s, i, _ in hops[phase.name]])
                entry["to_external_ms"] = distribution([e - s for s, _, e in hops[phase.name]])
        else:
            times = sorted(seen_ns for _, seen_ns, _ in rows)
            last = times[-1] if times else phase.first_publish_ns
            entry["throughput"] = round(len(rows) / ((last - phase.first_publish_ns) / 1e9))
            tenth = times[len(times) // 10] if times else last
            entry["steady_throughput"] = round(
                (len(times) - len(times) // 10) / max(1e-9, (last - tenth) / 1e9)
            )
        result["phases"].append(entry)
    return result


def machine() -> dict[str, str]:
    """CPU model, cores, kernel, Python: the context of every figure."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "taken_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def print_tables(results: list[dict[str, Any]]) -> None:
    """The figures of every mode, side by side."""
    print()
    print(
        "| mode | phase | offered msgs/s | published msgs/s | throughput msgs/s | "
        "p50 ms | p99 ms | p99.9 ms | CPU µs/msg broker | processor | persister |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for p in result["phases"]:
            lat = p.get("latency_ms", {})
            cpu = p["cpu_us_per_msg"]
            throughput = (
                f"{p['throughput']:,} (steady {p['steady_throughput']:,})"
                if "throughput" in p
                else ""
            )
            print(
                f"| {result['label']} | {p['phase']} | {p['offered_rate'] or 'max'} | "
                f"{p['published_rate']:,} | {throughput} | {lat.get('p50', '')} | "
                f"{lat.get('p99', '')} | {lat.get('p99.9', '')} | {cpu['devbroker']} | "
                f"{cpu['processor']} | {cpu['persister']} |"
            )
    print()
    print(
        "| mode | phase | sent -> on internal p50 / p99 ms | sent -> on external | "
        "sent -> persister takes it | persister: taken -> in file |"
    )
    print("|---|---|---|---|---|---|")
    for result in results:
        for p in result["phases"]:
            if "to_persister_ms" in p:
                cells = [
                    f"{p[k]['p50']} / {p[k]['p99']}" if k in p else "(--tap)"
                    for k in ("to_internal_ms", "to_external_ms", "to_persister_ms")
                ]
                b = p["in_persister_ms"]
                print(
                    f"| {result['label']} | {p['phase']} | {' | '.join(cells)} | "
                    f"{b['p50']} / {b['p99']} |"
                )
    print()
    print("| mode | published | lines | missing | duplicates | spans received |")
    print("|---|---|---|---|---|---|")
    for r in results:
        spans = ", ".join(f"{k}: {v:,}" for k, v in sorted(r.get("spans", {}).items()))
        print(
            f"| {r['label']} | {r['published']:,} | {r['lines']:,} | {r['missing']} | "
            f"{r['duplicates']} | {spans or '-'} |"
        )
    for r in results:
        for name, summary in r.get("profile", {}).items():
            print(f"\nprofile {r['label']} {name}: {summary['samples']} samples (GIL held)")
            for activity, share in summary["activities"]:
                print(f"  {share:5.1f}%  {activity}")
            print("  top self:")
            for frame, share in summary["self"]:
                print(f"  {share:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000, help="burst size")
    parser.add_argument(
        "--rates", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 5000]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per fixed-rate phase")
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=2.0,
        help="unmeasured publishing at the first rate before the phases",
    )
    parser.add_argument("--modes", default="off,100,10")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument(
        "--tap",
        action="store_true",
        help="also subscribe to internal and external to split latency per hop "
        "(adds two deliveries per message to the broker's work)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=YAML",
        help="override a key of the daemons' config, e.g. persister.max_batch_delay_ms=1",
    )
    args = parser.parse_args()
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name:
            parser.error(f"--set {item}: expected SECTION.KEY=VALUE")
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    args.set = overrides
    modes = [MODES[m] for m in args.modes.split(",")]
    results: list[dict[str, Any]] = []
    info = machine()
    with OtlpSink() as sink, tempfile.TemporaryDirectory(prefix="af-pipeline-") as tmp:
        for number, mode in enumerate(modes, 1):
            print(f"== {mode.label}", flush=True)
            # A mode may be listed twice (--modes off,off): each run gets its own directory.
            result = run_mode(mode, args, sink, Path(tmp) / f"{number}-{mode.name}")
            results.append(result)
            print(
                f"   {result['lines']:,} lines for {result['published']:,} published, "
                f"{result['missing']} missing, {result['duplicates']} duplicated",
                flush=True,
            )
    print_tables(results)
    ok = all(r["missing"] == 0 and r["duplicates"] == 0 for r in results)
    print(f"\nmachine: {info}; config overrides: {args.set or 'none'}")
    print("nothing lost" if ok else "LOSS OR DUPLICATES: see above")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": info, "argv": sys.argv, "overrides": args.set, "results": results},
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
