"""The seed's naive design of the two daemons, as a baseline for ``pipeline.py``.

What a first implementation of the seed's description would do, with nothing
of ampsflow's own machinery:

- ``processor``: subscribe to ``internal``; per message, in the client's
  receive callback: ``json.loads``, one SDK span ``process-message`` (child of
  the CorrelationId's context), add ``"processed": true``, ``json.dumps``,
  publish to ``external`` with the span's CorrelationId.
- ``persister``: subscribe to ``external``; per message: ``json.loads``, one SDK
  span ``persist-message``, append the line with its provenance, ``flush`` and
  ``os.fsync`` (one fsync per line).
- Spans: the SDK's ``BatchSpanProcessor`` and ``OTLPSpanExporter`` (http/protobuf)
  with their defaults, or no tracing at all with ``--exporter none``.

It keeps none of ampsflow's guarantees (no bookmark resume, no publish store,
no dedupe, no group commit): it is the yardstick the issue names, not a
product. It signals ``READY=1`` and stops on SIGTERM (flushing its spans) so
the benchmark's process helpers can run it.

    python benchmarks/naive.py processor --uri tcp://127.0.0.1:9007/amps/json \
        --endpoint http://127.0.0.1:4318 [--exporter otlp|none]
    python benchmarks/naive.py persister --uri ... --path /tmp/messages.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import AMPS
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    set_span_in_context,
)


def notify(state: str) -> None:
    """sd_notify without a library: one datagram to ``$NOTIFY_SOCKET``."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect("\0" + path[1:] if path.startswith("@") else path)
        sock.send(state.encode())


def parent_of(cid: str | None) -> Context:
    """The context of a CorrelationId (traceparent without dashes), or a new root."""
    if not cid or len(cid) != 52:
        return Context()
    try:
        ctx = SpanContext(
            int(cid[2:34], 16), int(cid[34:50], 16), True, TraceFlags(int(cid[50:52], 16))
        )
    except ValueError:
        return Context()
    return set_span_in_context(NonRecordingSpan(ctx), Context())


def cid_of(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00{ctx.trace_id:032x}{ctx.span_id:016x}{int(ctx.trace_flags):02x}"


def tracer_provider(service: str, exporter: str, endpoint: str, ratio: float) -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    if exporter == "otlp":
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
        )
    return provider


def run(args: argparse.Namespace) -> int:
    provider = tracer_provider(args.command, args.exporter, args.endpoint, args.sampler_ratio)
    tracer = provider.get_tracer("naive")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = AMPS.Client(f"naive-{args.command}-{os.getpid()}")
    client.connect(args.uri)
    client.logon()
    if args.command == "processor":

        def on_message(message: Any) -> None:
            data = message.get_data()
            cid = message.get_correlation_id() or None
            with tracer.start_as_current_span(
                "process-message",
                context=parent_of(cid),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "amps",
                    "messaging.destination.name": "internal",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.message.id": message.get_bookmark() or "",
                    "messaging.message.body.size": len(data),
                },
            ) as span:
                body = json.loads(data)
                out_cid = cid_of(span)
                body["processed"] = True
                body["CorrelationId"] = out_cid
                client.publish("external", json.dumps(body), correlation_id=out_cid)

        client.subscribe(on_message, "internal")
    else:
        out = open(args.path, "a", encoding="utf-8")  # noqa: SIM115 - closed at the end

        def on_message(message: Any) -> None:
            data = message.get_data()
            with tracer.start_as_current_span(
                "persist-message",
                context=parent_of(message.get_correlation_id() or None),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "amps",
                    "messaging.destination.name": "external",
                    "messaging.operation.type": "process",
                    "messaging.operation.name": "process",
                    "messaging.message.body.size": len(data),
                },
            ) as span:
                body = json.loads(data)
                ctx = span.get_span_context()
                body["_ampsflow"] = {
                    "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                    "persisted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                }
                out.write(json.dumps(body) + "\n")
                out.flush()
                os.fsync(out.fileno())

        client.subscribe(on_message, "external")
    notify("READY=1")
    while not stop.wait(0.2):
        pass
    client.close()
    time.sleep(0.1)
    provider.shutdown()
    if args.command == "persister":
        out.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("command", choices=["processor", "persister"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--endpoint", default="http://127.0.0.1:4318")
    parser.add_argument("--exporter", choices=["otlp", "none"], default="otlp")
    parser.add_argument("--sampler-ratio", type=float, default=1.0)
    parser.add_argument("--path", default="messages.jsonl")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
