"""How long span export makes a daemon's message loop wait: a loop-lag probe.

A loop on the main thread plays a daemon: at a fixed rate it wakes, starts and
ends one span of the processor's shape (the real telemetry setup: batch
processor, OTLP/HTTP exporter, local receiver in its own process), then sleeps
until the next message is due. Every turn it records how late it woke and how
long the span took; either grows when another thread (the exporter) holds the
GIL. The worst of those is the longest stall the exporter caused. On a busy
machine that is swamped by CPU contention, so the probe also reports the export
thread's own CPU time between two voluntary GIL hand-offs (its HTTP send, socket
I/O with the GIL released, left out), which load does not inflate. The garbage
collector is tuned as in the daemons.

Each exporter runs in turn: ``wire`` (ampsflow's encoder, the daemons'
default) and ``sdk`` (the SDK's ``OTLPSpanExporter``, the seed's). A run with
export ``off`` gives the machine's own noise (timer and scheduler).

    python benchmarks/export_stall.py                       # 10,000 spans/s for 10 s each
    python benchmarks/export_stall.py --rate 2000 --seconds 2 --exporters wire   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind

from ampsflow.adapters import otlp_wire
from ampsflow.adapters.instruments import messaging_attributes
from ampsflow.adapters.otlp_wire import OtlpHttpSpanExporter
from ampsflow.adapters.telemetry import setup_telemetry
from ampsflow.config import TelemetryConfig
from ampsflow.lifecycle import tune_garbage_collection
from benchmarks.otlp_sink import OtlpSink


class Stretches:
    """The export thread's longest CPU stretch between two voluntary GIL hand-offs.

    Thread CPU time, so it does not grow when the machine is busy: how long
    the exporter kept the GIL at a time while encoding.
    """

    def __init__(self) -> None:
        self.longest = 0.0
        self.over_1ms = 0
        self._since = 0.0

    def reset(self) -> None:
        self._since = time.thread_time()

    def mark(self) -> None:
        stretch = time.thread_time() - self._since
        self.longest = max(self.longest, stretch)
        if stretch > 0.001:
            self.over_1ms += 1

    def wrap(self, exporter: OTLPSpanExporter) -> None:
        """Measure ``exporter``'s export, less its HTTP send (socket I/O, GIL released)."""
        inner = exporter.export
        client = exporter._client
        send = client.export

        def export(spans: Any) -> Any:
            self.reset()
            try:
                return inner(spans)
            finally:
                self.mark()

        def http(data: bytes) -> Any:
            self.mark()
            try:
                return send(data)
            finally:
                self.reset()

        exporter.export = export  # type: ignore[method-assign]
        client.export = http  # type: ignore[method-assign]

    def yielder(self) -> None:
        self.mark()
        time.sleep(0)
        self.reset()


def probe(exporter_name: str, endpoint: str, rate: int, seconds: float) -> dict[str, Any]:
    """Run the loop for ``seconds`` at ``rate`` spans/s; lateness and span-time figures."""
    url = f"{endpoint}/v1/traces"
    exporter: OTLPSpanExporter | None
    if exporter_name == "wire":
        exporter = OtlpHttpSpanExporter(endpoint=url)
    elif exporter_name == "sdk":
        exporter = OTLPSpanExporter(endpoint=url)
    else:
        exporter = None
    stretches = Stretches()
    if exporter is not None:
        stretches.wrap(exporter)
    otlp_wire._yield_gil = stretches.yielder  # type: ignore[assignment]
    config = TelemetryConfig(
        exporter="otlp" if exporter is not None else "none",
        endpoint=endpoint,
        max_queue_size=max(2048, rate),
        max_export_batch_size=512,
    )
    telemetry = setup_telemetry(
        config,
        "processor",
        span_exporter=exporter,
        set_global=False,
        environ={"OTEL_METRICS_EXPORTER": "none"},
    )
    tracer = telemetry.tracer
    interval = 1.0 / rate
    count = int(rate * seconds)
    lateness: list[float] = []
    work: list[float] = []
    due = time.perf_counter() + 0.1
    for i in range(count):
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        woke = time.perf_counter()
        lateness.append(max(0.0, woke - due))
        span = tracer.start_span(
            "process-message",
            kind=SpanKind.CONSUMER,
            attributes=messaging_attributes(
                destination="external",
                operation_type="process",
                operation_name="process",
                message_id=f"17321|{i}",
                body_size=200,
                bookmark=f"17321|{i}",
            ),
        )
        span.set_attribute("ampsflow.amps.sequence", i)
        span.end()
        work.append(time.perf_counter() - woke)
        due += interval
        if woke - due > 1.0:  # far behind: the machine cannot keep the rate
            due = woke
    telemetry.shutdown()
    turns = sorted(late + busy for late, busy in zip(lateness, work, strict=True))
    lateness.sort()
    work.sort()

    def quantile(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    return {
        "exporter": exporter_name,
        "spans": count,
        "lost": telemetry.losses.lost,
        "late_p50_ms": quantile(lateness, 0.5),
        "late_p99_ms": quantile(lateness, 0.99),
        "late_p999_ms": quantile(lateness, 0.999),
        "late_max_ms": lateness[-1] * 1000,
        "span_p50_us": quantile(work, 0.5) * 1000,
        "span_max_ms": work[-1] * 1000,
        "turn_max_ms": turns[-1] * 1000,
        "turns_over_1ms": sum(1 for t in turns if t > 0.001),
        "turns_over_5ms": sum(1 for t in turns if t > 0.005),
        "export_stretch_max_ms": stretches.longest * 1000,
        "export_stretches_over_1ms": stretches.over_1ms,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=10_000, help="spans per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per exporter")
    parser.add_argument("--exporters", default="off,wire,sdk", help="comma-separated, in order")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    tune_garbage_collection()
    results = []
    with OtlpSink() as sink:
        for name in args.exporters.split(","):
            results.append(probe(name, sink.endpoint, args.rate, args.seconds))
            received = sink.spans()["spans"]
            results[-1]["received"] = sum(received.values())
    load = os.getloadavg()[0]
    print(f"\n{args.rate:,} spans/s for {args.seconds:g} s each; load average {load:.2f}\n")
    print(
        "| exporter | spans | received | woke late p50 / p99 / p99.9 / max (ms) "
        "| span p50 (µs) | worst turn (ms) | turns > 1 ms | turns > 5 ms "
        "| export CPU between hand-offs, max (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['exporter']} | {r['spans']:,} | {r['received']:,} "
            f"| {r['late_p50_ms']:.2f} / {r['late_p99_ms']:.2f} / {r['late_p999_ms']:.2f} / "
            f"{r['late_max_ms']:.2f} | {r['span_p50_us']:.0f} | {r['turn_max_ms']:.2f} "
            f"| {r['turns_over_1ms']} | {r['turns_over_5ms']} "
            f"| {r['export_stretch_max_ms']:.2f} ({r['export_stretches_over_1ms']} over 1 ms) |"
        )
    if args.json:
        args.json.write_text(json.dumps({"load": load, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
