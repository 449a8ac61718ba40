"""Tracing cost per message: the daemons' spans and CorrelationId handling vs one bare span.

In one process and one run, with the real OpenTelemetry SDK, a real
``BatchSpanProcessor`` (the daemons' settings from ``TelemetryConfig``) and the real
OTLP/HTTP exporter sending to a local receiver in a process of its own
(:mod:`otlp_sink`):

- ``bare span``: ``start_as_current_span`` + end of one CONSUMER span with the six
  messaging attributes, no ampsflow code: the SDK's own price of a span;
- ``no-op span``: the same through the API without an SDK (the floor);
- ``CorrelationId``: :func:`extract_context` of a header + payload CorrelationId and
  :func:`correlation_id_of` of a live span (decode + encode, no span);
- ``processor``: :meth:`ampsflow.services.processor.Processor.handle` of a ~200-byte
  mark from an in-memory source to an in-memory sink (parse, the ``process-message``
  span, CorrelationId out in header and payload, serialise, discard),
  with tracing off (exporter ``none``, sampler 0, parent not sampled), every span
  sampled, and 10% sampled;
- ``persister``: :class:`ampsflow.services.persister.Persister` collect + commit of
  the processor's output through the real sink with its ``fdatasync`` replaced by a
  no-op (the disk is measured by ``persister_durability.py``), in the same three modes.

CPU time is the process's (every thread, so the span export thread's encoding and
HTTP posts are counted), from the first message until the batch processor has
flushed every span of the case. Each case runs ``--repeat`` times, interleaved; the
minimum is the figure (other processes on the machine only ever add to it) and the
median is shown beside it. ``added`` is the traced minimum minus the untraced one.

``--what-if`` also measures both paths (every span sampled) with a change applied by
patching for the length of a case: GC tuned (``gc.set_threshold(50_000, 50, 100)``),
and the SDK's own OTLP encoder (``encode_spans``) in place of ampsflow's wire encoder,
which shows what the encoder saves.

Usage (from the repository root)::

    python benchmarks/tracing_cost.py [--messages 10000] [--repeat 5] [--what-if] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opentelemetry import trace  # noqa: E402
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from ampsflow.adapters.instruments import messaging_attributes  # noqa: E402
from ampsflow.adapters.otlp_wire import OtlpHttpSpanExporter  # noqa: E402
from ampsflow.adapters.propagation import correlation_id_of, extract_context  # noqa: E402
from ampsflow.adapters.sink import JsonlSink  # noqa: E402
from ampsflow.adapters.telemetry import Telemetry, setup_telemetry  # noqa: E402
from ampsflow.config import ProcessorConfig, TelemetryConfig  # noqa: E402
from ampsflow.lifecycle import Daemon  # noqa: E402
from ampsflow.services.persister import Persister  # noqa: E402
from ampsflow.services.processor import Processor  # noqa: E402
from ampsflow.testing import FakeAmps  # noqa: E402
from benchmarks.otlp_sink import OtlpSink  # noqa: E402
from benchmarks.pipeline import correlation_id, mark  # noqa: E402

ENV = {"OTEL_METRICS_EXPORTER": "none"}


@dataclass
class Sample:
    """One timed run of a case."""

    cpu_us: float
    wall_us: float


class NoSync:
    """Sink syscalls with ``fdatasync`` as a no-op (CPU cost only)."""

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        return None


def telemetry(endpoint: str | None, ratio: float, service: str) -> Telemetry:
    """The daemons' telemetry: OTLP/HTTP to ``endpoint``, or off."""
    config = (
        TelemetryConfig(exporter="otlp", endpoint=endpoint, sampler_ratio=ratio)
        if endpoint
        else TelemetryConfig(exporter="none", sampler_ratio=0.0)
    )
    return setup_telemetry(config, service, set_global=False, environ=ENV)


def timed(n: int, body: Callable[[], None], flush: Callable[[], object] | None) -> Sample:
    """CPU and wall time per message of ``body`` (``n`` messages), flush included."""
    cpu = time.process_time()
    wall = time.perf_counter()
    body()
    if flush is not None:
        flush()
    return Sample(1e6 * (time.process_time() - cpu) / n, 1e6 * (time.perf_counter() - wall) / n)


ATTRIBUTES = messaging_attributes(
    destination="internal",
    operation_type="process",
    operation_name="process",
    message_id="123|456|",
    body_size=200,
    bookmark="123|456|",
)


def bare_span(tm: Telemetry | None, n: int) -> Sample:
    """One CONSUMER span with six attributes per message."""
    tracer = tm.tracer if tm is not None else trace.NoOpTracer()

    def body() -> None:
        for _ in range(n):
            with tracer.start_as_current_span(
                "bench", kind=SpanKind.CONSUMER, attributes=ATTRIBUTES
            ):
                pass

    return timed(n, body, tm.tracer_provider.force_flush if tm is not None else None)


def correlation(tm: Telemetry, n: int) -> Sample:
    """Decode a header and a payload CorrelationId, then encode one from a live span."""
    cids = [correlation_id(True) for _ in range(256)]
    span = tm.tracer.start_span("holder")

    def body() -> None:
        for i in range(n):
            cid = cids[i & 255]
            extract_context(cid, cid)
            correlation_id_of(span)

    sample = timed(n, body, None)
    span.end()
    return sample


def processor(tm: Telemetry, n: int, sampled_ratio: float) -> tuple[Sample, FakeAmps]:
    """:meth:`Processor.handle` of ``n`` marks from memory to memory."""
    amps = FakeAmps()
    for i in range(n):
        cid = correlation_id(random.random() < sampled_ratio)
        amps.deliver(mark(f"p-{i:07d}", 0, cid), correlation_id=cid)
    messages = [amps.receive(0) for _ in range(n)]
    proc = Processor(ProcessorConfig(), tm, amps, amps, threading.Event())

    def body() -> None:
        for message in messages:
            assert message is not None
            proc.handle(message)

    sample = timed(n, body, tm.tracer_provider.force_flush)
    assert proc.processed == n
    return sample, amps


def persister(tm: Telemetry, outputs: FakeAmps, directory: Path, run: int) -> Sample:
    """Persister collect + commit of the processor's outputs (fdatasync a no-op)."""
    source = FakeAmps()
    published = outputs.on_topic("external")
    for p in published:
        source.deliver(p.body, topic="external", correlation_id=p.correlation_id)
    daemon = Daemon("benchmark")
    path = directory / f"{tm.service_name}-{run}-{id(tm)}.jsonl"
    with JsonlSink(path, syscalls=NoSync()) as sink:
        loop = Persister(
            source=source,
            sink=sink,
            telemetry=tm,
            topic="external",
            max_batch_lines=1000,
            max_batch_delay_s=0.005,
            retry_max_delay_s=1.0,
        )

        def body() -> None:
            while source.pending():
                loop.commit(loop.collect(daemon.stop), daemon)

        sample = timed(len(published), body, tm.tracer_provider.force_flush)
    assert len(source.discarded) == len(published)
    return sample


# -- what-if: the proposed changes, applied by patching for the length of a case -----


@contextlib.contextmanager
def gc_tuned() -> Iterator[None]:
    """Young collections every 50,000 allocations instead of 700 (as the daemons set it)."""
    old = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)


@contextlib.contextmanager
def sdk_encoder() -> Iterator[None]:
    """Spans encoded by the SDK's ``OTLPSpanExporter`` (protobuf objects), as before."""
    original = OtlpHttpSpanExporter.export
    OtlpHttpSpanExporter.export = OTLPSpanExporter.export  # type: ignore[method-assign]
    try:
        yield
    finally:
        OtlpHttpSpanExporter.export = original  # type: ignore[method-assign]


WHAT_IF: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "as is": contextlib.nullcontext,
    "GC tuned": gc_tuned,
    "SDK encoder": sdk_encoder,
}


def what_if(endpoint: str, n: int, repeat: int, directory: Path) -> dict[str, dict[str, float]]:
    """Minimum CPU per message of both paths, every span sampled, under each proposed change."""
    proc_tm = telemetry(endpoint, 1.0, "processor")
    pers_tm = telemetry(endpoint, 1.0, "persister")
    combos = WHAT_IF
    samples: dict[str, list[tuple[float, float]]] = {}
    for run in range(repeat):
        for name, change in combos.items():
            with change():
                proc_sample, outputs = processor(proc_tm, n, 1.0)
                pers_sample = persister(pers_tm, outputs, directory, run)
            samples.setdefault(name, []).append((proc_sample.cpu_us, pers_sample.cpu_us))
    proc_tm.shutdown()
    pers_tm.shutdown()
    return {
        name: {
            "processor_cpu_us": round(min(p for p, _ in values), 1),
            "persister_cpu_us": round(min(q for _, q in values), 1),
        }
        for name, values in samples.items()
    }


def median(samples: list[Sample]) -> dict[str, float]:
    return {
        "cpu_us": round(statistics.median(s.cpu_us for s in samples), 1),
        "wall_us": round(statistics.median(s.wall_us for s in samples), 1),
        "cpu_us_min": round(min(s.cpu_us for s in samples), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--what-if",
        action="store_true",
        help="also measure the proposed changes (BENCHMARKS.md), applied by patching",
    )
    args = parser.parse_args()
    n = args.messages
    results: dict[str, dict[str, float]] = {}
    spans: dict[str, int] = {}
    with OtlpSink() as sink, tempfile.TemporaryDirectory(prefix="af-tracing-") as tmp:
        traced_proc = telemetry(sink.endpoint, 1.0, "processor")
        ratio_proc = telemetry(sink.endpoint, 0.1, "processor")
        off_proc = telemetry(None, 0.0, "processor")
        traced_pers = telemetry(sink.endpoint, 1.0, "persister")
        ratio_pers = telemetry(sink.endpoint, 0.1, "persister")
        off_pers = telemetry(None, 0.0, "persister")
        # Warm up imports, caches and the exporter's connection.
        bare_span(traced_proc, 2000)
        processor(traced_proc, 2000, 1.0)
        sink.spans()
        collected: dict[str, list[Sample]] = {}
        for run in range(args.repeat):
            micro: list[tuple[str, Callable[[], Sample]]] = [
                ("no-op span (API only)", functools.partial(bare_span, None, n)),
                ("bare SDK span, exported", functools.partial(bare_span, traced_proc, n)),
                ("CorrelationId decode + encode", functools.partial(correlation, traced_proc, n)),
            ]
            for name, fn in micro:
                collected.setdefault(name, []).append(fn())
            for label, proc_tm, pers_tm, ratio in (
                ("tracing off", off_proc, off_pers, 0.0),
                ("sampling 100%", traced_proc, traced_pers, 1.0),
                ("sampling 10%", ratio_proc, ratio_pers, 0.1),
            ):
                sample, outputs = processor(proc_tm, n, ratio)
                collected.setdefault(f"processor, {label}", []).append(sample)
                collected.setdefault(f"persister, {label}", []).append(
                    persister(pers_tm, outputs, Path(tmp), run)
                )
            print(f"run {run + 1}/{args.repeat} done", flush=True)
        spans = sink.spans()["spans"]
        whatif = what_if(sink.endpoint, n, args.repeat, Path(tmp)) if args.what_if else {}
        for tm in (traced_proc, ratio_proc, off_proc, traced_pers, ratio_pers, off_pers):
            tm.shutdown()
        losses = {
            "processor": traced_proc.losses.lost + ratio_proc.losses.lost,
            "persister": traced_pers.losses.lost + ratio_pers.losses.lost,
        }
    for name, samples in collected.items():
        results[name] = median(samples)
    for daemon in ("processor", "persister"):
        off = results[f"{daemon}, tracing off"]["cpu_us_min"]
        for label in ("sampling 100%", "sampling 10%"):
            entry = results[f"{daemon}, {label}"]
            entry["added_cpu_us"] = round(entry["cpu_us_min"] - off, 1)
            entry["added_pct"] = round(100 * (entry["cpu_us_min"] - off) / off, 1)
    bare = results["bare SDK span, exported"]["cpu_us_min"]
    print()
    print(
        "| case | CPU µs/msg (min) | median | wall µs/msg (median) | added vs off | in bare spans |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        added = r.get("added_cpu_us")
        added_text = "" if added is None else f"{added} ({r['added_pct']}%)"
        in_spans = "" if added is None else str(round(added / bare, 1))
        print(
            f"| {name} | {r['cpu_us_min']} | {r['cpu_us']} | {r['wall_us']} | "
            f"{added_text} | {in_spans} |"
        )
    print(f"\nspans received: {spans}; dropped by the SDK: {losses}")
    if whatif:
        base = whatif["as is"]
        print("\n| every span sampled, with | processor CPU µs/msg | persister CPU µs/msg |")
        print("|---|---|---|")
        for name, r in whatif.items():
            dp = r["processor_cpu_us"] - base["processor_cpu_us"]
            dq = r["persister_cpu_us"] - base["persister_cpu_us"]
            print(
                f"| {name} | {r['processor_cpu_us']} ({dp:+.1f}) | "
                f"{r['persister_cpu_us']} ({dq:+.1f}) |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "argv": sys.argv,
                    "taken_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "load_average": os.getloadavg(),
                    "results": results,
                    "spans": spans,
                    "dropped": losses,
                    "what_if": whatif,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
