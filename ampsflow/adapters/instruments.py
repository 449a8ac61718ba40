"""Metric instruments and span attributes of the daemons, by the messaging semantic conventions.

:class:`Instruments` holds every metric instrument, built once from a meter
(:func:`~ampsflow.adapters.telemetry.setup_telemetry` does it);
:func:`messaging_attributes` and :func:`metric_attributes` give spans and
metrics their attributes; :func:`record_failure` marks a span failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.metrics import Counter, Histogram, Meter
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

MESSAGING_SYSTEM = "amps"
"""Value of ``messaging.system`` on every span and metric."""

BOOKMARK_ATTRIBUTE = "ampsflow.amps.bookmark"
"""Span attribute holding the AMPS bookmark of the message."""

DURATION_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Histogram buckets for the duration metrics (semconv advice, 0.5 ms .. 10 s)."""

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Histogram buckets for ``ampsflow.persister.batch.size``."""


@dataclass(frozen=True, slots=True)
class Instruments:
    """Every metric instrument the daemons record, built once from a meter.

    Attributes (all carry ``messaging.system`` and ``messaging.operation.name``
    where semantic conventions require it; the caller passes them):
        consumed: ``messaging.client.consumed.messages`` (``{message}``), once per delivery.
        sent: ``messaging.client.sent.messages`` (``{message}``), once per publish attempt.
        process_duration: ``messaging.process.duration`` (``s``), per processed message.
        operation_duration: ``messaging.client.operation.duration`` (``s``), per send.
        rejected: ``ampsflow.messages.rejected`` (``{message}``), bad input by ``error.type``.
        dead_lettered: ``ampsflow.messages.dead_lettered`` (``{message}``).
        correlation_problems: ``ampsflow.correlation_id.problems`` (``{message}``), by problem.
        batch_size: ``ampsflow.persister.batch.size`` (``{message}``), lines per group commit.
        fsync_duration: ``ampsflow.persister.fsync.duration`` (``s``).
        write_errors: ``ampsflow.persister.write.errors`` (``{error}``), by ``error.type``.
        reconnects: ``ampsflow.amps.reconnects`` (``{reconnect}``).
    """

    consumed: Counter
    sent: Counter
    process_duration: Histogram
    operation_duration: Histogram
    rejected: Counter
    dead_lettered: Counter
    correlation_problems: Counter
    batch_size: Histogram
    fsync_duration: Histogram
    write_errors: Counter
    reconnects: Counter

    @classmethod
    def from_meter(cls, meter: Meter) -> Instruments:
        """Create every instrument on ``meter``."""
        return cls(
            consumed=meter.create_counter(
                "messaging.client.consumed.messages",
                unit="{message}",
                description="Messages delivered to the application.",
            ),
            sent=meter.create_counter(
                "messaging.client.sent.messages",
                unit="{message}",
                description="Messages the producer attempted to send to the broker.",
            ),
            process_duration=meter.create_histogram(
                "messaging.process.duration",
                unit="s",
                description="Duration of processing one message.",
            ),
            operation_duration=meter.create_histogram(
                "messaging.client.operation.duration",
                unit="s",
                description="Duration of a messaging operation initiated by the client.",
            ),
            rejected=meter.create_counter(
                "ampsflow.messages.rejected",
                unit="{message}",
                description="Input messages that could not be processed, by error.type.",
            ),
            dead_lettered=meter.create_counter(
                "ampsflow.messages.dead_lettered",
                unit="{message}",
                description="Rejected messages sent to the dead-letter topic.",
            ),
            correlation_problems=meter.create_counter(
                "ampsflow.correlation_id.problems",
                unit="{message}",
                description="Messages whose CorrelationId was missing or invalid.",
            ),
            batch_size=meter.create_histogram(
                "ampsflow.persister.batch.size",
                unit="{message}",
                description="Lines written per group commit.",
            ),
            fsync_duration=meter.create_histogram(
                "ampsflow.persister.fsync.duration",
                unit="s",
                description="Duration of one fdatasync of the JSONL file.",
            ),
            write_errors=meter.create_counter(
                "ampsflow.persister.write.errors",
                unit="{error}",
                description="Failed writes or fsyncs of the JSONL file, by error.type.",
            ),
            reconnects=meter.create_counter(
                "ampsflow.amps.reconnects",
                unit="{reconnect}",
                description="Connections to AMPS lost and re-established.",
            ),
        )


def record_failure(span: Span, exc: BaseException, error_type: str) -> None:
    """Mark ``span`` failed: status ERROR, ``error.type`` and an exception event."""
    span.set_attribute("error.type", error_type)
    span.record_exception(exc)
    text = str(exc)
    description = text if text.startswith(error_type) else f"{error_type}: {text}"
    span.set_status(Status(StatusCode.ERROR, description))


def messaging_attributes(
    *,
    destination: str,
    operation_type: str,
    operation_name: str,
    message_id: str | None = None,
    body_size: int | None = None,
    bookmark: str | None = None,
) -> dict[str, AttributeValue]:
    """The semantic-convention attributes of an AMPS messaging span.

    ``messaging.system``, ``messaging.destination.name``,
    ``messaging.operation.type`` and ``messaging.operation.name`` always;
    ``messaging.message.id``, ``messaging.message.body.size`` and
    ``ampsflow.amps.bookmark`` when given.
    """
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.destination.name": destination,
        "messaging.operation.type": operation_type,
        "messaging.operation.name": operation_name,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    if body_size is not None:
        attributes["messaging.message.body.size"] = body_size
    if bookmark:
        attributes[BOOKMARK_ATTRIBUTE] = bookmark
    return attributes


def metric_attributes(
    destination: str, operation_name: str, error_type: str | None = None
) -> dict[str, AttributeValue]:
    """The attributes the messaging metrics carry (semconv required set)."""
    attributes: dict[str, AttributeValue] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.name": operation_name,
        "messaging.destination.name": destination,
    }
    if error_type is not None:
        attributes["error.type"] = error_type
    return attributes
