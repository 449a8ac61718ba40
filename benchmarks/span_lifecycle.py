"""CPU of one daemon span's life on the message loop: the SDK's tracer against LeanTracer.

``lean`` is LeanTracer's SDK span (``LeanSpan``); ``light`` is its ``LightSpan``, as
the daemons get when ampsflow's wire encoder is their only exporter.

The span is the processor's: started from a remote sampled parent with the eight
messaging attributes, made current, its CorrelationId taken, one attribute set,
ended into a real BatchSpanProcessor (whose exporter does nothing, so only the
loop thread's work is timed). Minimum over interleaved repeats.

    python benchmarks/span_lifecycle.py [--spans 20000] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Tracer, use_span

from ampsflow.adapters.instruments import messaging_attributes
from ampsflow.adapters.lean_spans import LeanTracer
from ampsflow.adapters.propagation import correlation_id_of, extract_context

PARENT = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _one_span(tracer: Tracer) -> Callable[[], None]:
    parent, _ = extract_context(PARENT, None)

    def run() -> None:
        attributes = messaging_attributes(
            destination="internal",
            operation_type="process",
            operation_name="process",
            message_id="123|456|",
            body_size=200,
            bookmark="123|456|",
        )
        span = tracer.start_span(
            "process-message", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        with use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            correlation_id_of(span)
            span.set_attribute("ampsflow.amps.sequence", 5)

    return run


def _time(run: Callable[[], None], spans: int) -> float:
    gc.collect()
    started = time.perf_counter()
    for _ in range(spans):
        run()
    return (time.perf_counter() - started) / spans * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            _Discard(),
            max_queue_size=1 << 20,
            schedule_delay_millis=3_600_000,
            max_export_batch_size=1 << 20,
        )
    )
    sdk = provider.get_tracer("ampsflow")
    (processor,) = provider._active_span_processor._span_processors
    cases = {
        "sdk": _one_span(sdk),
        "lean": _one_span(LeanTracer(sdk)),  # type: ignore[arg-type]
        "light": _one_span(LeanTracer(sdk, processor)),  # type: ignore[arg-type]
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeat):
        for name, run in cases.items():
            best[name] = min(best[name], _time(run, args.spans))
    print("| tracer | µs per span (start, current, CorrelationId, attribute, end) |")
    print("|---|---|")
    for name, micros in best.items():
        print(f"| {name} | {micros:.1f} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"us_per_span": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
