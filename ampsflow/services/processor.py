"""``ampsflow processor``: ``input_topic`` -> add ``"processed": true`` -> ``output_topic``.

Per message (:meth:`Processor.handle`):

1. The body is parsed (:func:`ampsflow.core.transform.parse_body`).
2. The parent context comes from the CorrelationId header, else the payload's
   ``CorrelationId`` field; a missing or invalid one starts a new trace and
   the reason is recorded as ``ampsflow.correlation_id.problem``.
3. A CONSUMER span ``process-message`` (child of that context) carries the
   messaging attributes, with ``messaging.message.id`` and
   ``ampsflow.amps.bookmark`` set to the AMPS bookmark. It is the message's
   only span in this daemon.
4. The output is the input object plus ``"processed": true`` and, per
   ``carrier``, a new CorrelationId in the header and/or the payload. That
   CorrelationId encodes the **process-message** span, so the persister's
   ``persist-message`` is its child, as the design's span table requires. The
   publish is told on that span: ``ampsflow.amps.sequence`` once the output
   (or dead letter) is in the publish store; a publish that cannot be stored
   makes the span ERROR (``error.type=publish_failed``, the exception, and
   ``ampsflow.amps.publish_attempts``).
5. The input is discarded from the bookmark store only once the output is in
   the durable publish store, so a restart resumes after the last message
   finished and never skips one. Delivery into ``output_topic`` is therefore
   at-least-once: a crash between storing an output and discarding its input
   republishes that one message after the restart, and the persister drops the
   repeat by message id.

With ``input_mode: queue``, ``input_topic`` names an AMPS message queue and any
number of processors share it: each holds up to ``max_backlog`` leased messages
and acknowledges one (step 5) only once its output is in the publish store. A
processor that dies or disconnects has its unacknowledged messages delivered to
the others, which publish them again (the persister drops the repeats by message
id); a message this processor had already received before (a lease that ran
out, a reconnect) is marked ``ampsflow.amps.redelivered`` on its span.

Bad input (not UTF-8, not JSON, not an object, too large, a lone surrogate,
a duplicate key, a number out of range: the rules of
:func:`ampsflow.core.transform.parse_body`), an output that would be over
``max_message_bytes``, and any other exception raised while handling one
message (``internal_error``) all become that message's rejection: the span is
marked ERROR with ``error.type`` and an exception event, it is counted
(``ampsflow.messages.rejected`` by ``error.type``), logged with a bounded
preview of the body, and a JSON envelope goes to ``dead_letter_topic`` (see
:func:`ampsflow.core.transform.dead_letter_body`; it fits
``max_message_bytes``, the body cut short if need be), whose CorrelationId
(header and envelope) is that of the failed span. When the message's trace was
not sampled, the failure still gets an ERROR span: a new, sampled trace linked
to the message's context, with its trace id as ``ampsflow.original_trace_id``
(:func:`ampsflow.adapters.telemetry.failure_span`). The input is discarded only
once the dead letter is in the publish store, and the daemon carries on. If a
publish cannot even be stored, it is retried with backoff and the input is not
discarded, so nothing is lost; the loop carries on once the store accepts it.

A stop (SIGTERM) lets the message in hand finish and waits (bounded) for the
broker to acknowledge the stored publishes; if a publish or that flush is still
blocked in the client after :data:`DRAIN_TIMEOUT_S` (or at a second SIGTERM),
the connection is closed under it and the message is redone at the next start.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

from ampsflow.adapters.amps import AmpsClient, default_client_name
from ampsflow.adapters.instruments import messaging_attributes, metric_attributes, record_failure
from ampsflow.adapters.lean_spans import CurrentSpan
from ampsflow.adapters.propagation import PROBLEM_ATTRIBUTE, correlation_id_of, extract_context
from ampsflow.adapters.telemetry import Telemetry, failure_span
from ampsflow.backoff import Backoff, BackoffPolicy
from ampsflow.config import Config, ProcessorConfig
from ampsflow.core import transform
from ampsflow.errors import AmpsError, BadMessageError, ConfigError, ConfigProblem, StartupError
from ampsflow.lifecycle import LIVE_KEYS_COMMON, LIVE_KEYS_TRACING, Daemon, run_service
from ampsflow.messaging import MessageSink, MessageSource, Received

logger = logging.getLogger(__name__)

REDELIVERED_ATTRIBUTE = "ampsflow.amps.redelivered"
"""Set (true) on ``process-message`` when the queue delivered the message again."""

PROCESS_SPAN = "process-message"
"""Name of the CONSUMER span around each message."""

DRAIN_TIMEOUT_S = 15.0
"""How long a stop waits for the drain (the message in hand, then the flush of the
publish store; either may be stuck in the client, e.g. re-sending a frame the
broker refuses) before the AMPS connection is closed under it; a second SIGTERM
closes it at once. Leaves time for telemetry under the unit's ``TimeoutStopSec=30``."""

_POLL_S = 0.2
_METRIC_FLUSH_MESSAGES = 256
_METRIC_FLUSH_S = 1.0
_PUBLISH_RETRY = BackoffPolicy(initial_s=0.1, max_s=5.0)
_MAX_PREVIEW = 200


@dataclass(slots=True)
class _Trace:
    """The tracing of one message: its span, and the one its failure is recorded on."""

    tracer: Tracer
    span: Span
    parent: Context
    attributes: dict[str, AttributeValue]
    failed: Span | None = None

    def fail(self, exc: BaseException, error_type: str) -> Span:
        """Record a failure; on a new sampled span when ``span`` is not sampled."""
        if self.failed is None:
            self.failed = failure_span(
                self.tracer,
                self.span,
                PROCESS_SPAN,
                kind=SpanKind.CONSUMER,
                attributes=self.attributes,
                parent=self.parent,
            )
        record_failure(self.failed, exc, error_type)
        return self.failed

    @property
    def current(self) -> Span:
        """The span that tells this message's story (the failure span, if any)."""
        return self.failed if self.failed is not None else self.span

    def end(self) -> None:
        """End the failure span if it is a span of its own (``span`` ends with its block)."""
        if self.failed is not None and self.failed is not self.span:
            self.failed.end()


class Processor:
    """The per-message logic, given a message source, a sink and telemetry.

    Args:
        config: The ``processor`` section.
        telemetry: Tracer and instruments.
        source: Where messages come from (and are discarded once finished).
        sink: Where outputs and dead letters are published.
        stop: Ends publish retries (the message stays unfinished).
        daemon: When given, publish retries keep pinging its watchdog (the loop
            is waiting on purpose, not wedged) and report ``STATUS=``.
    """

    def __init__(
        self,
        config: ProcessorConfig,
        telemetry: Telemetry,
        source: MessageSource,
        sink: MessageSink,
        stop: threading.Event,
        *,
        daemon: Daemon | None = None,
    ) -> None:
        self._config = config
        self._daemon = daemon
        self._tracer = telemetry.tracer
        self._instruments = telemetry.instruments
        self._source = source
        self._sink = sink
        self._stop = stop
        self.processed = 0
        self.rejected = 0
        # Deliveries and publish attempts are counted here and added to their
        # counters in one call per flush (a counter add costs as much as a
        # quarter of the message's own work).
        self._consumed_metric_attrs = metric_attributes(config.input_topic, "process")
        self._unflushed_consumed = 0
        self._unflushed_sent: dict[str, int] = {}
        self._last_flush = time.monotonic()

    def run(self, daemon: Daemon) -> None:
        """Handle messages one at a time until the stop event is set."""
        try:
            while not daemon.stop.is_set():
                daemon.watchdog()
                message = self._source.receive(_POLL_S)
                if message is not None:
                    self.handle_safely(message)
                if (
                    message is None
                    or self._unflushed_consumed >= _METRIC_FLUSH_MESSAGES
                    or time.monotonic() - self._last_flush >= _METRIC_FLUSH_S
                ):
                    self.flush_metrics()
        finally:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Add the deliveries and publish attempts counted since the last flush.

        :meth:`run` flushes when idle, every :data:`_METRIC_FLUSH_MESSAGES`
        messages or :data:`_METRIC_FLUSH_S`, and when it returns.
        """
        self._last_flush = time.monotonic()
        if self._unflushed_consumed:
            self._instruments.consumed.add(self._unflushed_consumed, self._consumed_metric_attrs)
            self._unflushed_consumed = 0
        if self._unflushed_sent:
            for topic, count in self._unflushed_sent.items():
                self._instruments.sent.add(count, metric_attributes(topic, "send"))
            self._unflushed_sent.clear()

    def handle_safely(self, message: Received) -> bool:
        """:meth:`handle`, but an exception that escapes it does not stop the daemon.

        :meth:`handle` already turns any exception raised while processing a
        message into that message's rejection. What is left (a failure while
        publishing the dead letter itself, or in the bookmark store) is logged
        with the message's bookmark and counted as ``internal_error``; the
        message stays undiscarded, so it is delivered again after a restart
        rather than lost.
        """
        try:
            return self.handle(message)
        except Exception:
            logger.exception(
                "message %s could not be handled or dead-lettered; it stays unfinished and "
                "is delivered again after a restart; body starts %r",
                message.bookmark,
                message.body[:_MAX_PREVIEW],
            )
            self._instruments.rejected.add(1, {"error.type": "internal_error"})
            return False

    def handle(self, message: Received) -> bool:
        """Process one message; returns whether it was finished (and discarded).

        Every exception raised while parsing, transforming or publishing the
        output becomes a rejection of this message (``internal_error`` for
        one that is not a :class:`~ampsflow.errors.BadMessageError`).
        """
        started = time.perf_counter()
        error: BadMessageError | None = None
        parsed: dict[str, Any] | None = None
        try:
            parsed = transform.parse_body(message.body, max_bytes=self._config.max_message_bytes)
        except BadMessageError as exc:
            error = exc
        except Exception as exc:
            error = self._internal_error(message, exc)
        payload_cid = transform.payload_correlation_id(parsed) if parsed is not None else None
        parent, problem = extract_context(message.correlation_id, payload_cid)
        attributes = messaging_attributes(
            destination=message.topic or self._config.input_topic,
            operation_type="process",
            operation_name="process",
            message_id=message.bookmark,
            body_size=len(message.body),
            bookmark=message.bookmark,
        )
        if problem is not None:
            attributes[PROBLEM_ATTRIBUTE] = problem
        if message.redelivered:
            attributes[REDELIVERED_ATTRIBUTE] = True
        metric_attrs = metric_attributes(self._config.input_topic, "process")
        self._unflushed_consumed += 1
        finished = False
        with CurrentSpan(
            self._tracer.start_span(
                PROCESS_SPAN,
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
            )
        ) as span:
            traced = _Trace(self._tracer, span, parent, attributes)
            if problem is not None:
                self._instruments.correlation_problems.add(1, {"problem": problem})
                (logger.debug if problem == "missing" else logger.warning)(
                    "message %s: CorrelationId unusable (%s); starting a new trace",
                    message.bookmark,
                    problem,
                )
            try:
                cid = correlation_id_of(span)
                if error is None and parsed is not None:
                    try:
                        output = transform.render_output(
                            parsed,
                            correlation_id=cid,
                            carrier=self._config.carrier,
                            max_bytes=transform.publish_budget(
                                self._config.max_message_bytes, self._config.output_topic
                            ),
                        )
                        finished = self._publish(
                            self._config.output_topic,
                            output.body,
                            output.header_correlation_id,
                            traced,
                        )
                    except BadMessageError as exc:
                        error = exc
                    except Exception as exc:
                        error = self._internal_error(message, exc)
                    else:
                        if finished:
                            self.processed += 1
                if error is not None:
                    failed = traced.fail(error, error.error_type)
                    finished = self._reject(message, error, correlation_id_of(failed), traced)
                if finished:
                    self._source.discard(message)
            finally:
                traced.end()
        elapsed = time.perf_counter() - started
        duration_attrs = (
            metric_attrs
            if error is None
            else metric_attributes(self._config.input_topic, "process", error.error_type)
        )
        self._instruments.process_duration.record(elapsed, duration_attrs)
        return finished

    def _internal_error(self, message: Received, exc: Exception) -> BadMessageError:
        logger.error(
            "message %s: unexpected %s while processing it; rejecting it",
            message.bookmark,
            type(exc).__name__,
            exc_info=exc,
        )
        error = BadMessageError("internal_error", f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def _reject(self, message: Received, error: BadMessageError, cid: str, traced: _Trace) -> bool:
        self.rejected += 1
        self._instruments.rejected.add(1, {"error.type": error.error_type})
        preview = message.body[:_MAX_PREVIEW].decode("utf-8", "backslashreplace")
        topic = self._config.dead_letter_topic
        logger.warning(
            "message %s rejected (%s: %s)%s; body starts %r",
            message.bookmark,
            error.error_type,
            error.detail[: transform.MAX_DETAIL_CHARS],
            f", sent to {topic}" if topic else ", no dead_letter_topic: dropped",
            preview,
        )
        if topic is None:
            return True
        envelope = transform.dead_letter_body(
            message.body,
            error,
            topic=message.topic,
            bookmark=message.bookmark,
            correlation_id=cid,
            max_bytes=transform.publish_budget(self._config.max_message_bytes, topic),
        )
        traced.current.set_attribute("ampsflow.dead_letter.topic", topic)
        if not self._publish(topic, envelope, cid, traced):
            return False
        self._instruments.dead_lettered.add(1, {"error.type": error.error_type})
        return True

    def _publish(self, topic: str, body: bytes, correlation_id: str | None, traced: _Trace) -> bool:
        """Publish into the durable store, retrying until stored or stopped.

        The outcome goes on the message's span: the store's sequence number,
        or (first failure) ERROR with ``publish_failed`` and the attempt count.
        """
        backoff: Backoff | None = None
        attempt = 0
        send_attrs = metric_attributes(topic, "send")
        while True:
            attempt += 1
            started = time.perf_counter()
            self._unflushed_sent[topic] = self._unflushed_sent.get(topic, 0) + 1
            try:
                sequence = self._sink.publish(topic, body, correlation_id)
            except AmpsError as exc:
                failure = exc
            else:
                span = traced.current
                if sequence:
                    span.set_attribute("ampsflow.amps.sequence", sequence)
                if attempt > 1:
                    span.set_attribute("ampsflow.amps.publish_attempts", attempt)
                self._instruments.operation_duration.record(
                    time.perf_counter() - started, send_attrs
                )
                return True
            self._instruments.operation_duration.record(
                time.perf_counter() - started,
                metric_attributes(topic, "send", "publish_failed"),
            )
            if attempt == 1:
                traced.fail(failure, "publish_failed")
            traced.current.set_attribute("ampsflow.amps.publish_attempts", attempt)
            backoff = backoff or Backoff(_PUBLISH_RETRY)
            delay = backoff.next_delay()
            logger.error(
                "cannot store a publish to %s (attempt %d): %s; retrying in %.1fs",
                topic,
                attempt,
                failure,
                delay,
            )
            if self._daemon is not None:
                self._daemon.status(f"cannot store publishes to {topic}: {failure}; retrying")
                self._daemon.watchdog()
            if backoff.wait(self._stop, delay):
                logger.warning(
                    "stopping with a publish to %s not stored; it is redone at restart", topic
                )
                return False


def instance_config(config: Config, instance: str) -> Config:
    """The config of processor instance ``instance`` (``--instance``, the template unit's
    ``%i``): its own client name (``<amps.client_name>-<instance>``, the default name when
    unset) and state directory (``<processor.state_dir>-<instance>``).

    Raises:
        ConfigError: ``processor.input_mode`` is not ``queue`` (instances reading by
            bookmark would each process every message).
    """
    if config.processor.input_mode != "queue":
        raise ConfigError(
            [
                ConfigProblem(
                    config.source,
                    "processor.input_mode",
                    f"must be queue to run processor instances (--instance {instance})",
                )
            ]
        )
    name = config.amps.client_name or default_client_name("processor")
    return dataclasses.replace(
        config,
        amps=dataclasses.replace(config.amps, client_name=f"{name}-{instance}"),
        processor=dataclasses.replace(
            config.processor, state_dir=f"{config.processor.state_dir.rstrip('/')}-{instance}"
        ),
    )


def run(config: Config, args: argparse.Namespace) -> int:
    """Run the processor daemon until SIGTERM/SIGINT; returns the exit status."""
    instance = getattr(args, "instance", None)
    if instance:
        config = instance_config(config, instance)
        load = getattr(args, "config_loader", None)
        if load is not None:
            # A reload compares like with like: the file as this instance sees it.
            args.config_loader = lambda: instance_config(load(), instance)
    section = config.processor

    def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
        assert telemetry is not None  # run with tracing
        client = AmpsClient(
            config.amps,
            service="processor",
            state_dir=Path(section.state_dir),
            stop=daemon.stop,
            on_status=daemon.status,
            publish_store=True,
        )
        client.add_reconnect_listener(lambda: telemetry.instruments.reconnects.add(1))
        try:
            client.connect()
            try:
                if section.input_mode == "queue":
                    client.subscribe_queue(section.input_topic, max_backlog=section.max_backlog)
                else:
                    client.subscribe(section.input_topic)
            except AmpsError as exc:
                raise StartupError(str(exc)) from exc
            daemon.ready(
                f"processing {section.input_topic} -> {section.output_topic} as {client.name}"
            )
            processor = Processor(section, telemetry, client, client, daemon.stop, daemon=daemon)
            drained = threading.Event()
            guard = threading.Thread(
                target=_close_when_stuck,
                args=(daemon, client, drained, DRAIN_TIMEOUT_S),
                name="drain-deadline",
                daemon=True,
            )
            guard.start()
            try:
                processor.run(daemon)
                logger.info(
                    "draining: %d processed, %d rejected; %d publish(es) awaiting the broker",
                    processor.processed,
                    processor.rejected,
                    client.unpersisted(),
                )
                if not daemon.force.is_set() and not client.flush(config.amps.command_timeout_s):
                    logger.warning(
                        "%d publish(es) not yet acknowledged; they stay in the publish store "
                        "and are re-sent at the next start",
                        client.unpersisted(),
                    )
            finally:
                drained.set()
        finally:
            client.close()

    return run_service(
        config,
        args,
        service="processor",
        service_name=section.service_name,
        work=work,
        sections=("amps", "telemetry", "processor", "logging"),
        live_keys=LIVE_KEYS_COMMON | LIVE_KEYS_TRACING,
    )


def _close_when_stuck(
    daemon: Daemon, client: AmpsClient, drained: threading.Event, timeout_s: float
) -> None:
    """After a stop, close ``client`` if the drain has not finished within ``timeout_s``.

    A publish (and the drain's flush) blocks inside the AMPS client while it
    reconnects; if every reconnect fails (a broker that drops the connection on
    each re-send of a frame it refuses), it would block forever and SIGTERM
    would be ignored. Closing the client makes the call return; the message in
    hand stays undiscarded (or its output stays in the publish store) and is
    redone at the next start.
    """
    daemon.stop.wait()
    deadline = time.monotonic() + timeout_s
    while not drained.wait(_POLL_S):
        if daemon.force.is_set() or time.monotonic() >= deadline:
            logger.error(
                "%s and the drain is not finished (a publish or the flush is blocked; %d "
                "awaiting the broker): closing the AMPS connection",
                "second stop signal" if daemon.force.is_set() else f"{timeout_s:.0f}s since stop",
                client.unpersisted(),
            )
            client.close()
            return
