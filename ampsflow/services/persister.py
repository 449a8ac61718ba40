"""``ampsflow persister``: AMPS ``persister.topic`` -> one fsync'd JSON line per message.

Wiring: the durable JSONL sink (:mod:`ampsflow.adapters.sink`) is opened first
(an unwritable path is one stderr line and exit 1, before any connection), then
a bookmark subscription to ``persister.topic`` resumes after the last message
this persister finished (:mod:`ampsflow.adapters.amps`), then ``READY=1``.

The loop (:class:`Persister`):

1. **Collect** a batch: the first message waits for as long as it takes (the
   loop wakes every 200 ms for the watchdog, SIGHUP and SIGTERM); the batch
   then takes every message already queued, up to ``max_batch_lines``, and
   waits for more only up to ``max_batch_delay_ms`` after its first message
   (0 by default: it commits at once). This is group commit without a fixed
   wait: while one batch's fdatasync runs (the GIL released), the AMPS client
   keeps queueing deliveries, and they form the next batch. Each message gets
   a CONSUMER span ``persist-message`` whose parent is the processor's span
   from the CorrelationId (header preferred, payload ``CorrelationId`` as
   fallback) and a persisted line.
2. **Commit** the batch: one write, one fdatasync. A failed write or fsync
   (``ENOSPC``, ``EIO``, ``EACCES``) sets ERROR on every span of the batch with
   the exception, counts ``ampsflow.persister.write.errors``, reports
   ``STATUS=`` and retries the same batch with capped, jittered exponential
   backoff (``retry_max_delay_ms``) until it is on disk. Intake stops
   meanwhile; the AMPS client's queue fills and applies back-pressure.
3. **Finish**: every span that wrote a line gets an ``fsync`` event at the
   fsync's end and every span ends after it; the batch's facts (lines, fsync
   duration) are attributes of the first such event only, told once per batch
   rather than on every span. Then every
   message of the batch is discarded from the bookmark store, in delivery
   order. Only now would a restart resume after them.

A message that fails (a bad body kept raw, a write or fsync error) always
leaves an ERROR span, even when its trace was not sampled: the span then
starts a new, sampled trace linked to the message's context and carrying its
trace id as ``ampsflow.original_trace_id`` (see
:func:`ampsflow.adapters.telemetry.failure_span`); a bad body's line then
names that span. Good messages that were not sampled leave no span.

Replays (a restart, a reconnect, a processor that re-published after a crash)
are recognised by message ``id`` (else bookmark) through the sink's dedupe
index and are discarded without writing a line again.

A body that is not a valid JSON object by the processor's rules
(:func:`ampsflow.core.transform.parse_body`: UTF-8, at most
``max_message_bytes``, no NaN or out-of-range number, no lone surrogate, no
duplicate key; it should not reach ``external``, but may) is not dropped: its
line keeps the text in ``_ampsflow.raw`` (or bytes that are not UTF-8 in
``_ampsflow.raw_base64``) with the reason in ``_ampsflow.error``; its span is
ERROR, ``ampsflow.messages.rejected`` counts it by ``error.type``, and a
warning quotes the start of the body. A message that trips any other exception
while its line is prepared is kept the same way with the reason
``internal_error``. Chosen over a dead-letter topic because the file is the
durable end of the pipeline: nothing that reached it is lost, the line is
standard JSON whatever the body held, and ``ampsflow audit`` lists such lines.

SIGHUP reopens the JSONL file between two batches (logrotate renames it, then
signals); the shared lifecycle (:mod:`ampsflow.lifecycle`) re-reads the config.
SIGTERM stops intake, commits what is in hand, discards it and returns; the
lifecycle then flushes telemetry and exits 0. If the disk still refuses the
batch after :data:`DRAIN_TIMEOUT_S`, the persister stops without writing it
(a second SIGTERM exits at once): those messages were never discarded, so
they are delivered again after the restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.util.types import AttributeValue

from ampsflow.adapters.amps import AmpsClient
from ampsflow.adapters.instruments import messaging_attributes, metric_attributes, record_failure
from ampsflow.adapters.propagation import PROBLEM_ATTRIBUTE, extract_context
from ampsflow.adapters.sink import CommitResult, JsonlSink, PendingLine
from ampsflow.adapters.telemetry import Telemetry, failure_span
from ampsflow.backoff import Backoff, BackoffPolicy
from ampsflow.config import Config, PersisterConfig
from ampsflow.core import transform
from ampsflow.core.records import Provenance, build_line, build_raw_line, dedupe_key
from ampsflow.errors import AmpsError, BadMessageError, RecordError, SinkError, StartupError
from ampsflow.lifecycle import LIVE_KEYS_COMMON, LIVE_KEYS_TRACING, Daemon, run_service
from ampsflow.messaging import MessageSource, Received

logger = logging.getLogger(__name__)

SPAN_NAME = "persist-message"
"""Name of the per-message CONSUMER span."""

OPERATION_NAME = "process"
"""``messaging.operation.name`` (and type) of the span: push-style handling."""

DEDUPE_WINDOW_LINES = 100_000
"""Dedupe keys of this many recent lines are kept (about 15 MB). Replays reach
back only to the bookmark store's resume point, at most a few batches."""

DRAIN_TIMEOUT_S = 20.0
"""How long SIGTERM waits for a failing disk before giving up on the batch in
hand (under the unit's ``TimeoutStopSec=30``, leaving time for telemetry)."""

POLL_S = 0.2
"""Longest the loop waits for a first message before checking its flags."""

RETRY_INITIAL_S = 0.05
"""First backoff after a failed commit; doubles up to ``retry_max_delay_ms``."""

MAX_LOGGED_BODY = 200
"""Characters of a bad body quoted in a log line."""


@dataclass(slots=True)
class _Item:
    """One received message on its way to disk."""

    received: Received
    span: Span
    started: float
    line: PendingLine | None
    """``None`` when the message is already persisted (a replay)."""
    parent: Context
    """The context the message carried (its span's parent)."""
    attributes: dict[str, AttributeValue]
    """The span's start attributes, for a failure span of its own if it fails."""
    error_type: str | None = None
    """The last write error recorded on the span."""


class Persister:
    """The collect -> commit -> finish loop (see the module docstring).

    Args:
        source: Where messages come from and where they are discarded.
        sink: The opened JSONL sink.
        telemetry: Tracer, meter and instruments of the service.
        topic: The subscribed topic (span and metric attribute).
        max_batch_lines: Most lines per commit.
        max_batch_delay_s: Longest a batch's first message waits for more messages
            once the queued ones are taken (0: commit at once).
        retry_max_delay_s: Cap of the backoff between retries of a failed commit.
        drain_timeout_s: How long a stop waits for a failing disk.
        max_message_bytes: Largest body parsed as JSON (larger ones are kept raw).
        now: Wall clock for ``persisted_at`` (tests pin it).
    """

    def __init__(
        self,
        *,
        source: MessageSource,
        sink: JsonlSink,
        telemetry: Telemetry,
        topic: str,
        max_batch_lines: int,
        max_batch_delay_s: float,
        retry_max_delay_s: float,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        max_message_bytes: int = 16 * 1024 * 1024,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._source = source
        self._sink = sink
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._instruments = telemetry.instruments
        self._topic = topic
        self._max_lines = max(1, max_batch_lines)
        self._max_delay_s = max_batch_delay_s
        self._retry = BackoffPolicy(
            initial_s=RETRY_INITIAL_S, max_s=max(RETRY_INITIAL_S, retry_max_delay_s)
        )
        self._drain_timeout_s = drain_timeout_s
        self._max_message_bytes = max_message_bytes
        self._now = now
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not cryptography
        self._metric_attrs = metric_attributes(topic, OPERATION_NAME)
        meter = telemetry.meter
        self._duplicates = meter.create_counter(
            "ampsflow.persister.duplicates",
            unit="{message}",
            description="Deliveries skipped because their line is already in the file.",
        )
        self._torn_bytes = meter.create_counter(
            "ampsflow.persister.torn_bytes",
            unit="By",
            description="Bytes of torn last lines cut off when the file was opened.",
        )
        self._reported_torn = 0
        self._report_torn()
        self.batches = 0
        self.stopped_with_unwritten = 0

    # -- the loop ------------------------------------------------------------

    def run(self, daemon: Daemon) -> None:
        """Persist until ``daemon.stop`` is set, then finish the batch in hand."""
        while not daemon.stop.is_set():
            daemon.watchdog()
            batch = self.collect(daemon.stop)
            # Checked after collecting, just before writing: a SIGHUP that
            # arrived while waiting for messages applies to this batch.
            if daemon.take_reload():
                self.reopen(daemon)
            if batch:
                self.commit(batch, daemon)

    def collect(self, stop: threading.Event) -> list[_Item]:
        """Receive one batch (empty when nothing arrived within :data:`POLL_S`)."""
        first = self._source.receive(POLL_S)
        if first is None:
            return []
        batch_keys: set[str] = set()
        batch = [self._prepare_safely(first, batch_keys)]
        deadline = time.monotonic() + self._max_delay_s
        while len(batch) < self._max_lines and not stop.is_set():
            # What is already queued joins the batch at once; only then does
            # the batch wait (up to the delay, none by default) for more.
            remaining = max(0.0, deadline - time.monotonic())
            received = self._source.receive(remaining)
            if received is None:
                break
            batch.append(self._prepare_safely(received, batch_keys))
        # One add per batch: the same count as one per delivery, at a fraction
        # of the cost of recording every message separately.
        self._instruments.consumed.add(len(batch), self._metric_attrs)
        return batch

    def commit(self, batch: list[_Item], daemon: Daemon) -> bool:
        """Write and fsync ``batch``, retrying failures; then end spans and discard.

        Returns:
            True when the batch is on disk and discarded; False when a stop gave
            up on a failing disk (nothing was discarded).
        """
        lines = [item.line for item in batch if item.line is not None]
        result: CommitResult | None = None
        attempt = 0
        backoff = Backoff(self._retry, rng=self._rng)
        delay = 0.0
        while lines:
            try:
                result = self._sink.commit(lines)
                break
            except SinkError as exc:
                attempt += 1
                delay = backoff.next_delay()
                self._on_failure(batch, exc, attempt, delay, daemon)
            daemon.watchdog()
            if daemon.stop.is_set():
                backoff.deadline_in(self._drain_timeout_s)
                if daemon.force.is_set() or backoff.expired:
                    self._give_up(batch)
                    return False
            # A second stop signal cuts the wait short; a first one does not,
            # because the batch in hand must still reach the disk.
            backoff.wait(daemon.force, delay)
        if attempt:
            logger.info("writing %s again after %d failed attempts", self._sink.path, attempt)
            daemon.status(f"persisting {self._topic} to {self._sink.path}")
        self._finish(batch, result, attempt)
        return True

    def reopen(self, daemon: Daemon) -> None:
        """Reopen the JSONL file (SIGHUP), between two batches.

        The lifecycle has announced the reload (``RELOADING=1`` ... ``READY=1``)
        and re-read the config; this only moves the file handle.
        """
        try:
            self._sink.reopen()
        except SinkError as exc:
            # The next commit opens the path again, with retries and backoff.
            logger.error("cannot reopen after SIGHUP: %s", exc)  # noqa: TRY400 - no traceback needed
            daemon.status(f"cannot reopen {self._sink.path}: {exc}")
        else:
            logger.info("reopened %s", self._sink.path)
            self._report_torn()
            daemon.status(f"persisting {self._topic} to {self._sink.path}")

    # -- steps ---------------------------------------------------------------

    def _prepare_safely(self, received: Received, batch_keys: set[str]) -> _Item:
        """:meth:`_prepare`, but a message that trips an unexpected error is kept raw.

        The per-message boundary: a bug triggered by one message must not stop
        the daemon (it would crash again on the redelivery), and the message
        must not be lost.
        """
        try:
            return self._prepare(received, batch_keys)
        except Exception as exc:
            logger.exception(
                "cannot prepare the message at bookmark %s; kept raw in the JSONL: %r",
                received.bookmark,
                received.body[:MAX_LOGGED_BODY],
            )
            attributes = messaging_attributes(
                destination=received.topic or self._topic,
                operation_type=OPERATION_NAME,
                operation_name=OPERATION_NAME,
                message_id=received.bookmark,
                body_size=len(received.body),
                bookmark=received.bookmark,
            )
            parent = Context()
            span = self._tracer.start_span(SPAN_NAME, kind=SpanKind.CONSUMER, attributes=attributes)
            span = failure_span(
                self._tracer,
                span,
                SPAN_NAME,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                parent=parent,
            )
            record_failure(span, exc, "internal_error")
            self._instruments.rejected.add(
                1, {**self._metric_attrs, "error.type": "internal_error"}
            )
            ctx = span.get_span_context()
            provenance = Provenance(
                trace_id=format(ctx.trace_id, "032x"),
                span_id=format(ctx.span_id, "016x"),
                topic=received.topic or self._topic,
                bookmark=received.bookmark,
                persisted_at=self._now(),
            )
            data = build_raw_line(received.body, "internal_error", provenance)
            key = dedupe_key(None, received.bookmark)
            return _Item(
                received,
                span,
                time.monotonic(),
                PendingLine(data, key, received.bookmark),
                parent,
                attributes,
            )

    def _prepare(self, received: Received, batch_keys: set[str]) -> _Item:
        """Start the span of one message and build its line (or mark it a replay)."""
        started = time.monotonic()
        body = received.body
        message: dict[str, Any] | None = None
        problem: BadMessageError | None = None
        try:
            message = transform.parse_body(body, max_bytes=self._max_message_bytes)
        except BadMessageError as exc:
            problem = exc
        payload_cid = transform.payload_correlation_id(message) if message is not None else None
        context, cid_problem = extract_context(received.correlation_id, payload_cid)
        topic = received.topic or self._topic
        attributes = messaging_attributes(
            destination=topic,
            operation_type=OPERATION_NAME,
            operation_name=OPERATION_NAME,
            message_id=received.bookmark,
            body_size=len(body),
            bookmark=received.bookmark,
        )
        if cid_problem is not None:
            attributes[PROBLEM_ATTRIBUTE] = cid_problem
            self._instruments.correlation_problems.add(
                1, {**self._metric_attrs, "problem": cid_problem}
            )
        ident = message.get("id") if message is not None else None
        if isinstance(ident, str):
            attributes["ampsflow.message.id"] = ident
        span = self._tracer.start_span(
            SPAN_NAME, context=context, kind=SpanKind.CONSUMER, attributes=attributes
        )

        key = dedupe_key(message, received.bookmark)
        if (key is not None and key in batch_keys) or self._sink.contains(key, received.bookmark):
            with trace.use_span(span, end_on_exit=False):
                if self._sink.index.is_beyond_window(key, received.bookmark):
                    logger.warning(
                        "skipping %s (bookmark %s): at or below the highest bookmark already "
                        "persisted for its publisher, older than the dedupe window",
                        key,
                        received.bookmark,
                    )
                else:
                    logger.debug("skipping replay of %s (bookmark %s)", key, received.bookmark)
            span.set_attribute("ampsflow.persister.duplicate", True)
            self._duplicates.add(1, self._metric_attrs)
            return _Item(received, span, started, None, context, attributes)

        ctx = span.get_span_context()
        provenance = Provenance(
            trace_id=format(ctx.trace_id, "032x"),
            span_id=format(ctx.span_id, "016x"),
            topic=topic,
            bookmark=received.bookmark,
            persisted_at=self._now(),
        )
        data: bytes | None = None
        if message is not None:
            try:
                data = build_line(message, provenance, text=body)
            except RecordError as exc:
                problem = BadMessageError("unserialisable", str(exc))
        if data is None:
            assert problem is not None
            traced = failure_span(
                self._tracer,
                span,
                SPAN_NAME,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                parent=context,
            )
            if traced is not span:
                span = traced
                ctx = span.get_span_context()
                provenance = dataclasses.replace(
                    provenance,
                    trace_id=format(ctx.trace_id, "032x"),
                    span_id=format(ctx.span_id, "016x"),
                )
            data = build_raw_line(body, problem.error_type, provenance)
            record_failure(span, problem, problem.error_type)
            self._instruments.rejected.add(
                1, {**self._metric_attrs, "error.type": problem.error_type}
            )
            with trace.use_span(span, end_on_exit=False):
                logger.warning(
                    "%s on %s (bookmark %s), kept raw in the JSONL: %r",
                    problem.error_type,
                    topic,
                    received.bookmark,
                    body[:MAX_LOGGED_BODY],
                )
        if key is not None:
            batch_keys.add(key)
        return _Item(
            received, span, started, PendingLine(data, key, received.bookmark), context, attributes
        )

    def _on_failure(
        self, batch: list[_Item], exc: SinkError, attempt: int, delay: float, daemon: Daemon
    ) -> None:
        cause = exc.__cause__
        error_type = (
            errno.errorcode.get(cause.errno or 0, type(cause).__name__)
            if isinstance(cause, OSError)
            else type(exc).__name__
        )
        self._instruments.write_errors.add(1, {**self._metric_attrs, "error.type": error_type})
        for item in batch:
            if item.line is None:
                continue
            # The exception event on every attempt would flood a span during a
            # long outage: record the first one and each change of error.
            if item.error_type != error_type:
                item.span = failure_span(
                    self._tracer,
                    item.span,
                    SPAN_NAME,
                    kind=SpanKind.CONSUMER,
                    attributes=item.attributes,
                    parent=item.parent,
                )
                record_failure(item.span, exc, error_type)
                item.error_type = error_type
            item.span.set_attribute("ampsflow.persister.write_attempts", attempt + 1)
        with trace.use_span(batch[0].span, end_on_exit=False):
            logger.warning(
                "%s; %d lines held, attempt %d, retrying within %.2fs",
                exc,
                sum(1 for item in batch if item.line is not None),
                attempt,
                delay,
            )
        daemon.status(f"{exc}; retrying (attempt {attempt})")

    def _finish(self, batch: list[_Item], result: CommitResult | None, attempts: int) -> None:
        end_ns = time.time_ns()
        event_attrs: dict[str, int | float] = {}
        if result is not None:
            fsync_s = (result.fsync_end_ns - result.fsync_start_ns) / 1e9
            self._instruments.fsync_duration.record(fsync_s, self._metric_attrs)
            self._instruments.batch_size.record(result.lines, self._metric_attrs)
            event_attrs = {
                "ampsflow.persister.batch.lines": result.lines,
                "ampsflow.persister.fsync.duration_s": fsync_s,
            }
        now = time.monotonic()
        # Every span that wrote a line gets a bare ``fsync`` event (its line is
        # durable); the batch's facts are told once, on the first of them.
        facts: dict[str, int | float] | None = event_attrs
        for item in batch:
            if item.line is not None and result is not None:
                item.span.add_event("fsync", facts, timestamp=result.fsync_end_ns)
                facts = None
            item.span.end(end_time=end_ns)
            self._instruments.process_duration.record(now - item.started, self._metric_attrs)
        for item in batch:
            self._source.discard(item.received)
        self.batches += 1
        logger.debug(
            "committed %d lines (%d replays skipped) after %d failed attempts",
            result.lines if result is not None else 0,
            sum(1 for item in batch if item.line is None),
            attempts,
        )

    def _give_up(self, batch: list[_Item]) -> None:
        held = sum(1 for item in batch if item.line is not None)
        self.stopped_with_unwritten += held
        logger.error(
            "stopping with %d lines not written to %s; they were not acknowledged and "
            "will be delivered again after the restart",
            held,
            self._sink.path,
        )
        for item in batch:
            item.span.end()

    def _report_torn(self) -> None:
        dropped = self._sink.stats.torn_bytes_dropped - self._reported_torn
        if dropped:
            self._torn_bytes.add(dropped, self._metric_attrs)
            self._reported_torn += dropped


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow persister``: run the daemon until SIGTERM; returns the exit status."""
    return run_service(
        config,
        args,
        service="persister",
        service_name=config.persister.service_name,
        work=functools.partial(_work, config),
        sections=("amps", "telemetry", "persister", "logging"),
        live_keys=LIVE_KEYS_COMMON | LIVE_KEYS_TRACING,
    )


def _work(config: Config, daemon: Daemon, telemetry: Telemetry | None) -> None:
    assert telemetry is not None  # run with tracing
    settings: PersisterConfig = config.persister
    sink = JsonlSink(settings.path, dedupe_window_lines=DEDUPE_WINDOW_LINES)
    try:
        sink.open()
    except SinkError as exc:
        raise StartupError(str(exc)) from exc
    try:
        client = AmpsClient(
            config.amps,
            service="persister",
            state_dir=Path(settings.state_dir),
            stop=daemon.stop,
            on_status=daemon.status,
        )
        try:
            client.add_reconnect_listener(
                lambda: telemetry.instruments.reconnects.add(1, {"messaging.system": "amps"})
            )
            persister = Persister(
                source=client,
                sink=sink,
                telemetry=telemetry,
                topic=settings.topic,
                max_batch_lines=settings.max_batch_lines,
                max_batch_delay_s=settings.max_batch_delay_ms / 1000,
                retry_max_delay_s=settings.retry_max_delay_ms / 1000,
                max_message_bytes=settings.max_message_bytes,
            )
            client.connect()
            try:
                client.subscribe(settings.topic)
            except AmpsError as exc:
                raise StartupError(str(exc)) from exc
            daemon.ready(f"persisting {settings.topic} to {settings.path}")
            persister.run(daemon)
        finally:
            client.close()
    finally:
        sink.close()
