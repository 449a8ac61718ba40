"""The marker's span relay under sustained load: RSS of ``ampsflow marker`` while it takes
``--rate`` spans/s (default 10,000) for ``--seconds``.

Starts ``ampsflow marker`` on a free port (journey index at its default bounds,
``otlp_traces_upstream`` null, or ``--upstream URL``), then posts OTLP/HTTP
protobuf uploads of ``--batch`` spans (3 spans per trace, publish -> process ->
persist, new trace ids throughout, so the index fills and evicts), paced to the
rate. Every ``--sample-s`` it records the marker's RSS and its ``/healthz``
counters; prints a Markdown table and the peak.

    python benchmarks/marker_relay.py                       # 10,000 spans/s for 60 s
    python benchmarks/marker_relay.py --seconds 600         # the 10-minute run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.processes import free_port, wait_for  # noqa: E402

HOPS = (
    ("react-web-app", "publish-message"),
    ("processor", "process-message"),
    ("persister", "persist-message"),
)


def upload(first_trace: int, traces: int) -> bytes:
    """One ExportTraceServiceRequest: ``traces`` traces of three spans each."""
    request = ExportTraceServiceRequest()
    now = time.time_ns()
    for hop, (service, name) in enumerate(HOPS):
        resource = request.resource_spans.add()
        resource.resource.attributes.append(
            KeyValue(key="service.name", value=AnyValue(string_value=service))
        )
        spans = resource.scope_spans.add().spans
        for i in range(first_trace, first_trace + traces):
            span = spans.add()
            span.trace_id = i.to_bytes(16, "big")
            span.span_id = (i * 4 + hop + 1).to_bytes(8, "big")
            span.name = name
            span.start_time_unix_nano = now
            span.end_time_unix_nano = now + 1_500_000
            for key, value in (
                ("messaging.system", "amps"),
                ("messaging.destination.name", "internal"),
                ("messaging.message.id", f"{i:032x}"),
                ("ampsflow.amps.bookmark", f"1|{i}|"),
            ):
                span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return request.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=10_000, help="spans per second")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=510, help="spans per upload (x3)")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--upstream", default=None, help="otlp_traces_upstream (default: none)")
    parser.add_argument(
        "--journey-max-bytes", type=int, default=None, help="marker.journey_max_bytes"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="marker-relay-"))
    config = workdir / "ampsflow.yaml"
    config.write_text(
        f"marker:\n  listen: 127.0.0.1:{port}\n"
        f"  otlp_traces_upstream: {json.dumps(args.upstream)}\n"
        + (
            f"  journey_max_bytes: {args.journey_max_bytes}\n"
            if args.journey_max_bytes is not None
            else ""
        ),
        encoding="utf-8",
    )
    log = (workdir / "marker.log").open("wb")
    marker = subprocess.Popen(
        [sys.executable, "-m", "ampsflow", "marker", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    samples: list[dict[str, float]] = []
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def healthy() -> bool:
            try:
                connection.request("GET", "/healthz")
                connection.getresponse().read()
            except OSError:
                connection.close()
                return False
            return True

        wait_for(healthy, timeout_s=30, what="the marker to answer")
        proc = psutil.Process(marker.pid)
        traces_per_upload = max(1, args.batch // 3)
        spans_per_upload = traces_per_upload * 3
        started = time.monotonic()
        next_sample = started
        next_trace = 1
        sent = 0
        errors = 0
        while time.monotonic() - started < args.seconds:
            body = upload(next_trace, traces_per_upload)
            next_trace += traces_per_upload
            connection.request(
                "POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"}
            )
            response = connection.getresponse()
            response.read()
            errors += response.status != 200
            sent += spans_per_upload
            now = time.monotonic()
            if now >= next_sample:
                connection.request("GET", "/healthz")
                health = json.loads(connection.getresponse().read())
                samples.append(
                    {
                        "t_s": round(now - started, 1),
                        "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                        "spans_sent": sent,
                        "journey_spans": health["journey_spans"],
                        "journey_bytes_mib": round(health["journey_bytes"] / 2**20, 1),
                        "evicted_traces": health["journey_evicted_traces"],
                        "cpu_s": round(sum(proc.cpu_times()[:2]), 1),
                    }
                )
                next_sample += args.sample_s
            lag = started + sent / args.rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        elapsed = time.monotonic() - started
    finally:
        marker.terminate()
        marker.wait(timeout=30)
        log.close()
    print(
        f"rate asked {args.rate} spans/s, achieved {sent / elapsed:.0f} spans/s over "
        f"{elapsed:.0f} s; non-200 answers: {errors}; load average {os.getloadavg()[0]:.2f}"
    )
    print()
    columns = ("t (s)", "RSS (MiB)", "spans sent", "spans held", "index (MiB, est.)")
    print("| " + " | ".join((*columns, "evicted traces", "CPU (s)")) + " |")
    print("|---|---|---|---|---|---|---|")
    for s in samples:
        print(
            f"| {s['t_s']} | {s['rss_mib']} | {s['spans_sent']} | {s['journey_spans']} | "
            f"{s['journey_bytes_mib']} | {s['evicted_traces']} | {s['cpu_s']} |"
        )
    peak = max(s["rss_mib"] for s in samples)
    print(f"\npeak RSS {peak} MiB")
    if args.json is not None:
        args.json.write_text(json.dumps({"samples": samples, "peak_rss_mib": peak}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
