"""What the services code against to consume and publish messages.

The AMPS adapter (:class:`~ampsflow.adapters.amps.AmpsClient`) implements both
protocols; so does the in-process fake :class:`~ampsflow.testing.FakeAmps`. This
module loads no broker client, so a service's logic and its tests can use these
types without the AMPS C extension. Failures of either side raise
:class:`~ampsflow.errors.AmpsError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Received:
    """One message from a bookmark or queue subscription, copied out of the client's buffer.

    Attributes:
        topic: The topic it was published to.
        body: The body bytes exactly as published.
        correlation_id: The CorrelationId header, or ``None`` when absent.
        bookmark: The AMPS bookmark (``publisher|sequence|``); unique per message.
        sub_id: The subscription that delivered it.
        seq_no: The bookmark store's own sequence number, used by
            :meth:`MessageSource.discard`.
        queued: It came from an AMPS message queue (it carries a lease):
            :meth:`MessageSource.discard` acknowledges it to the queue.
        redelivered: A queue message this consumer had already received (a lease
            that ran out, a cancel, a reconnect): it may have been processed before.
    """

    topic: str
    body: bytes
    correlation_id: str | None
    bookmark: str
    sub_id: str
    seq_no: int
    queued: bool = False
    redelivered: bool = False


class MessageSource(Protocol):
    """What a consuming service needs."""

    def receive(self, timeout_s: float) -> Received | None:
        """The next message, or ``None`` after ``timeout_s`` without one."""
        ...

    def discard(self, message: Received) -> None:
        """Mark ``message`` finished: a restart resumes after it."""
        ...


class MessageSink(Protocol):
    """What a publishing service needs."""

    def publish(self, topic: str, body: bytes | str, correlation_id: str | None) -> int:
        """Store then send one message; returns its publish-store sequence number.

        Raises:
            AmpsError: when the message could not be stored (or sent).
        """
        ...

    def flush(self, timeout_s: float) -> bool:
        """Wait until every stored publish is acknowledged; false on timeout."""
        ...
