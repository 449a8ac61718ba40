"""A steady publisher for the fault and soak tests.

It publishes JSON messages to a topic at a fixed rate with the official AMPS
Python client (``AMPS.HAClient``) through a durable, file-backed publish store,
so a message handed to the client survives a broker restart: the client
re-sends whatever the broker had not acknowledged as persisted when it
reconnects. Every message carries a unique ``id`` and is published under its
own root span (``publish-message``), whose trace context travels as the
CorrelationId in the header and in the payload, exactly as the marker page
does. The ids are appended, in publish order, to a file that
``ampsflow audit --published FILE`` reads, one ``PUBLISHER<TAB>ID`` per line
(so several publishers can share one file; order is kept per publisher).

Spans are only exported when ``otlp_endpoint`` is set; otherwise the tracer
provider has no processor and only generates the ids.

Run standalone (used by ``benchmarks/soak.py``)::

    python -m tests.support.load --uri tcp://127.0.0.1:PORT/amps/json \\
        --rate 300 --duration 20 --published ids.txt --store pub.store
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import AMPS
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from ampsflow.core.codec import TraceParent, encode_correlation_id

logger = logging.getLogger(__name__)

MAX_CATCH_UP_S = 1.0
"""How far behind schedule the publisher may fall before it stops trying to catch up.

While the broker is away a publish can block; afterwards the publisher resumes
the steady rate instead of bursting out everything it "missed".
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    """What to publish, where, and how fast.

    Attributes:
        uri: The broker, ``tcp://HOST:PORT/amps/json``.
        published_path: File the published ids are appended to, one per line.
        store_path: The publish store file (durable across broker restarts).
        topic: Topic to publish to.
        rate_per_s: Messages per second.
        client_name: AMPS client name; the broker de-duplicates re-sends per name.
        id_prefix: Prefix of every message id (``PREFIX-00000001``...).
        otlp_endpoint: OTLP/HTTP base URL to export the ``publish-message`` spans to.
        service_name: ``service.name`` of those spans.
        padding_bytes: Extra payload text per message.
        padding_items: Length of an extra array of zeros per message (slow to parse).
    """

    uri: str
    published_path: Path
    store_path: Path
    topic: str = "internal"
    rate_per_s: float = 300.0
    client_name: str = ""
    id_prefix: str = ""
    otlp_endpoint: str | None = None
    service_name: str = "load-publisher"
    padding_bytes: int = 64
    padding_items: int = 0


class SteadyPublisher:
    """Publishes uniquely identified, traced messages at a steady rate on a thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``stop``
    waits until the broker has acknowledged every stored message as persisted,
    so once it returns the published-ids file lists exactly what the pipeline
    owes.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.client_name = config.client_name or f"load-{uuid.uuid4().hex[:8]}"
        self.id_prefix = config.id_prefix or self.client_name
        self.published = 0
        self.disconnected_publishes = 0
        self.failed_writes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids: IO[str] | None = None
        self._client: Any = None
        self._lock = threading.Condition()
        self._error: BaseException | None = None
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}), sampler=ALWAYS_ON
        )
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces")
            self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("ampsflow.tests.load")

    def __enter__(self) -> SteadyPublisher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On a test failure, do not wait long for the broker: just release everything.
        self.stop(flush_timeout_s=60.0 if exc_type is None else 5.0)

    def start(self) -> None:
        """Connect (blocking until logged on) and start publishing."""
        client = AMPS.HAClient(self.client_name)
        client.set_publish_store(AMPS.PublishStore(str(self.config.store_path)))
        chooser = AMPS.DefaultServerChooser()
        chooser.add(self.config.uri)
        client.set_server_chooser(chooser)
        client.set_reconnect_delay_strategy(
            AMPS.ExponentialDelayStrategy(
                initial_delay=50, maximum_delay=1000, backoff_exponent=2.0, jitter=0.5
            )
        )
        client.set_failed_write_handler(self._on_failed_write)
        client.connect_and_logon()
        self._client = client
        self._ids = self.config.published_path.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="steady-publisher", daemon=True)
        self._thread.start()

    def stop(self, *, flush_timeout_s: float = 60.0) -> None:
        """Stop publishing, wait for the broker to persist what is stored, and disconnect.

        Raises:
            AMPS.TimedOutException: when the broker did not acknowledge everything in time.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self._client is not None:
                self._client.publish_flush(int(flush_timeout_s * 1000))
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._ids is not None:
                self._ids.close()
                self._ids = None
            self._provider.shutdown()
        if self._error is not None:
            raise RuntimeError("the publisher thread failed") from self._error

    @property
    def unpersisted(self) -> int:
        """Messages stored but not yet acknowledged as persisted by the broker."""
        return int(self._client.get_unpersisted_count()) if self._client is not None else 0

    def wait_published(self, count: int, *, timeout_s: float = 60.0) -> None:
        """Block until at least ``count`` messages have been published in total.

        Raises:
            TimeoutError: when the deadline passes first (or the publisher thread died).
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.published < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._error is not None or self._thread is None:
                    raise TimeoutError(f"published {self.published} of {count} within {timeout_s}s")
                self._lock.wait(min(remaining, 0.5))

    def _on_failed_write(self, message: Any, reason: str) -> None:
        self.failed_writes.append(str(reason))
        logger.error("broker refused a stored publish: %s", reason)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by stop()
            self._error = exc
            logger.exception("publisher thread failed")
        finally:
            with self._lock:
                self._lock.notify_all()

    def _loop(self) -> None:
        interval = 1.0 / self.config.rate_per_s
        next_at = time.monotonic()
        sequence = 0
        padding = "x" * self.config.padding_bytes
        while not self._stop.is_set():
            now = time.monotonic()
            if next_at > now:
                if self._stop.wait(next_at - now):
                    break
            elif now - next_at > MAX_CATCH_UP_S:
                next_at = now
            next_at += interval
            sequence += 1
            self._publish_one(f"{self.id_prefix}-{sequence:08d}", sequence, padding)

    def _publish_one(self, message_id: str, sequence: int, padding: str) -> None:
        assert self._ids is not None
        topic = self.config.topic
        with self._tracer.start_as_current_span(
            "publish-message",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "amps",
                "messaging.destination.name": topic,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.message.id": message_id,
            },
        ) as span:
            context = span.get_span_context()
            correlation_id = encode_correlation_id(
                TraceParent(
                    version=0,
                    trace_id=context.trace_id,
                    span_id=context.span_id,
                    flags=int(context.trace_flags),
                )
            )
            body = json.dumps(
                {
                    "id": message_id,
                    "publisher": self.client_name,
                    "seq": sequence,
                    "text": padding,
                    **(
                        {"items": [0] * self.config.padding_items}
                        if self.config.padding_items
                        else {}
                    ),
                    "CorrelationId": correlation_id,
                },
                separators=(",", ":"),
            )
            span.set_attribute("messaging.message.body.size", len(body))
            try:
                self._client.publish(topic, body, correlation_id=correlation_id)
            except AMPS.DisconnectedException:
                # The client stores before it sends: the message is in the publish
                # store and goes out when the connection is back.
                self.disconnected_publishes += 1
        self._ids.write(f"{self.client_name}\t{message_id}\n")
        self._ids.flush()
        with self._lock:
            self.published += 1
            self._lock.notify_all()


def main(argv: list[str] | None = None) -> int:
    """Publish at a steady rate until ``--duration`` passes or SIGTERM/SIGINT arrives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--published", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--topic", default="internal")
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until signal")
    parser.add_argument("--client-name", default="")
    parser.add_argument("--otlp-endpoint", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    publisher = SteadyPublisher(
        LoadConfig(
            uri=args.uri,
            published_path=args.published,
            store_path=args.store,
            topic=args.topic,
            rate_per_s=args.rate,
            client_name=args.client_name,
            otlp_endpoint=args.otlp_endpoint,
        )
    )
    publisher.start()
    done.wait(args.duration or None)
    publisher.stop()
    print(json.dumps({"published": publisher.published, "failed": len(publisher.failed_writes)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
