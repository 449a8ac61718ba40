"""The devbroker's queues at work: subscriptions, deliveries, acks and their durable records.

:class:`QueueService` connects the pure :class:`~ampsflow.devbroker.queues.MessageQueue`
state machines to the broker:

- **In.** After each group commit the broker hands the committed entries to
  :meth:`QueueService.on_committed`; those of a queue's underlying topic join the queue.
- **Subscribe.** A ``subscribe`` whose topic is a queue's name becomes a queue
  subscription (:meth:`QueueService.subscribe`). Its processed ack carries the granted
  backlog as ``o``/``opts`` ``max_backlog=N``, which the official clients use to cap their
  ack batches. A bookmark, a ``sow`` on a queue, or options other than ``max_backlog``,
  ``replace`` and ``timestamp`` are refused with a reason.
- **Out.** Deliveries are ordinary ``p`` frames with the queue's name as ``t``, the
  message's bookmark and ``lp`` (the lease period in milliseconds): its presence is what
  makes the clients treat the message as a queue message and acknowledge it with a
  ``sow_delete``.
- **Acks.** :meth:`QueueService.sow_delete` takes a ``sow_delete`` on a queue topic with
  ``bm`` (one bookmark or a comma list: batched acks). No option acknowledges, ``cancel``
  returns the message, ``expire`` removes it. A publish-store client's ack (``a=persisted``
  with ``s``) is answered with the cumulative persisted ack once its record is durable.
- **Durability.** Every removal is appended to the transaction log as a queue record
  (topic :data:`~ampsflow.devbroker.queues.RECORD_TOPIC`, never delivered) and so is
  committed with the same ``fdatasync`` as everything else; :meth:`QueueService.recover`
  replays the log at start.
- **Time.** :meth:`QueueService.tick` (every broker tick) returns expired leases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from ampsflow.config import DevbrokerQueueConfig
from ampsflow.devbroker import protocol
from ampsflow.devbroker.counters import Counters
from ampsflow.devbroker.filters import compile_filter, compile_topic
from ampsflow.devbroker.queues import (
    ACK,
    EXPIRE,
    RECORD_TOPIC,
    TAKE,
    Consumer,
    MessageQueue,
    QueuedMessage,
    decode_record,
    encode_record,
    split_bookmarks,
)
from ampsflow.devbroker.session import Connection, Subscription
from ampsflow.devbroker.txlog import LogEntry, ReplayCursor, TransactionLog
from ampsflow.errors import FilterError, ProtocolError

logger = logging.getLogger(__name__)

RECORD_CLIENT = "\x00ampsflow.queue"
"""Client name the queue records are logged under (so they take no client's sequences)."""
QUEUE_OPTIONS = frozenset({"replace", "timestamp"})
"""Subscribe options a queue subscription accepts besides ``max_backlog=N``."""
ACK_OPTIONS = frozenset({"cancel", "expire"})
_RECOVERY_CHUNK = 4096
_IMMEDIATE = ("received", "parsed", "processed")


class Broker(Protocol):
    """What the queues use of :class:`~ampsflow.devbroker.broker.Broker`."""

    counters: Counters

    def remove_subscription(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""

    def append_record(self, topic: str, client_name: str, body: bytes) -> None:
        """Append a record to the transaction log (committed with the next group commit)."""

    def after_durable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything appended so far is committed."""


def _max_backlog(options: Iterable[str]) -> tuple[int | None, list[str]]:
    """Split a subscribe's options into its ``max_backlog`` and the options left unknown."""
    backlog: int | None = None
    unknown: list[str] = []
    for option in options:
        name, sep, value = option.partition("=")
        if name == "max_backlog" and sep:
            if not value.strip().isdigit():
                raise ProtocolError(f"max_backlog {value!r} is not a number")
            backlog = int(value)
        elif option not in QUEUE_OPTIONS:
            unknown.append(option)
    return backlog, unknown


class QueueService:
    """The queues of one broker (see the module docstring)."""

    def __init__(
        self,
        broker: Broker,
        configs: Iterable[DevbrokerQueueConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self._clock = clock
        self.queues: dict[str, MessageQueue] = {c.name: MessageQueue(c) for c in configs}
        self._inputs: list[tuple[Callable[[str], bool], MessageQueue]] = []
        self._by_topic: dict[str, list[MessageQueue]] = {}
        self._consumers: dict[Subscription, tuple[MessageQueue, Consumer]] = {}

    def __bool__(self) -> bool:
        return bool(self.queues)

    def is_queue(self, topic: object) -> bool:
        """Whether ``topic`` names a queue."""
        return isinstance(topic, str) and topic in self.queues

    # ------------------------------------------------------------------ messages in

    def _queues_of(self, topic: str) -> list[MessageQueue]:
        found = self._by_topic.get(topic)
        if found is None:
            if len(self._by_topic) > 10_000:
                self._by_topic.clear()
            found = [] if topic == RECORD_TOPIC else [q for m, q in self._inputs if m(topic)]
            self._by_topic[topic] = found
        return found

    def open(self, log: TransactionLog) -> int:
        """Rebuild every queue from the transaction log (at start, before any client).

        Returns the number of log entries read.

        Raises:
            TopicError: an underlying topic is a regular expression that does not compile.
        """
        if not self.queues:
            return 0
        self._inputs = [(compile_topic(q.config.topic), q) for q in self.queues.values()]
        self._by_topic.clear()
        cursor = ReplayCursor(position=log.first_position)
        durable = log.durable_position
        read = 0
        while cursor.position <= durable:
            entries, cursor = log.read(cursor, up_to=durable, limit=_RECOVERY_CHUNK)
            if not entries:
                break
            read += len(entries)
            for entry in entries:
                self._recover_entry(entry)
        for queue in self.queues.values():
            logger.info(
                "queue %s: %d messages waiting after recovery (%d removed by records)",
                queue.name,
                queue.depth,
                queue.counters.acked,
            )
            queue.counters.enqueued = 0
            queue.counters.acked = 0
        return read

    def _recover_entry(self, entry: LogEntry) -> None:
        if entry.topic == RECORD_TOPIC:
            record = decode_record(entry.body)
            if record is None:
                logger.warning("ignoring a malformed queue record at position %d", entry.position)
                return
            name, _op, bookmarks = record
            queue = self.queues.get(name)
            if queue is not None:
                queue.counters.acked += queue.forget(bookmarks)
            return
        for queue in self._queues_of(entry.topic):
            queue.offer(entry)

    def on_committed(self, batch: Iterable[LogEntry]) -> None:
        """Offer committed entries to the queues of their topics, then deliver."""
        touched: set[MessageQueue] = set()
        for entry in batch:
            queues = self._queues_of(entry.topic)
            for queue in queues:
                queue.offer(entry)
                touched.add(queue)
        for queue in touched:
            self._dispatch(queue)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, conn: Connection, header: protocol.Header, sub_id: str) -> None:
        """Place (or replace) a queue subscription; answers the command itself."""
        topic = str(header["t"])
        queue = self.queues[topic]
        if header.get("bm") not in (None, ""):
            self._refuse(conn, header, "queue subscriptions take no bookmark")
            return
        try:
            backlog, unknown = _max_backlog(protocol.options(header))
        except ProtocolError as exc:
            self._refuse(conn, header, f"invalid options: {exc}")
            return
        if unknown:
            self._refuse(
                conn,
                header,
                f"invalid options: {', '.join(sorted(unknown))} (a queue subscription takes "
                "max_backlog, replace and timestamp)",
            )
            return
        text = header.get("filter")
        try:
            matches_body = compile_filter(str(text)) if text else None
        except FilterError as exc:
            logger.info("%r: queue subscribe %s refused: bad filter: %s", conn, sub_id, exc)
            conn.nack(header, "bad filter")
            return
        old = conn.subs.pop(sub_id, None)
        if old is not None:
            self.broker.remove_subscription(old)
        sub = Subscription(
            conn=conn,
            sub_id=sub_id,
            cid=str(header.get("cid", sub_id)),
            topic=topic,
            matches_topic=lambda _topic: False,
            matches_body=matches_body,
            is_regex=False,
            with_timestamp="timestamp" in protocol.options(header),
            command=header,
        )
        conn.subs[sub_id] = sub
        consumer = queue.subscribe(sub, backlog, matches_body)
        self._consumers[sub] = (queue, consumer)
        self.broker.counters.subscriptions += 1
        granted = f"max_backlog={consumer.backlog}"
        for ack_type in protocol.ack_types(header):
            if ack_type == "processed":
                conn.send(
                    protocol.ack(header, "processed", extra=[("o", granted), ("opts", granted)])
                )
            elif ack_type in _IMMEDIATE:
                conn.send(protocol.ack(header, ack_type))
        logger.debug(
            "%r: subscribed %s to queue %s with backlog %d", conn, sub_id, topic, consumer.backlog
        )
        self._dispatch(queue)

    def remove(self, sub: Subscription) -> None:
        """Forget a queue subscription; its leased messages go back to the queue."""
        found = self._consumers.pop(sub, None)
        if found is None:
            return
        queue, consumer = found
        returned = queue.unsubscribe(consumer)
        if returned:
            logger.debug(
                "%r: %d leased messages of %s returned to the queue", sub.conn, returned, queue.name
            )
        self._dispatch(queue)

    def _refuse(self, conn: Connection, header: protocol.Header, reason: str) -> None:
        self.broker.counters.unsupported_commands += 1
        logger.info(
            "%r: %s on queue %s refused: %s", conn, header.get("c"), header.get("t"), reason
        )
        conn.nack(header, reason)

    def refuse_query(self, conn: Connection, header: protocol.Header) -> None:
        """Answer a ``sow``-family command on a queue topic (browsing is not supported)."""
        self._refuse(conn, header, "queues cannot be queried (no sow on queues in the devbroker)")

    # ------------------------------------------------------------------ acknowledgements

    def sow_delete(self, conn: Connection, header: protocol.Header) -> None:
        """Handle a ``sow_delete`` on a queue topic: ack, cancel or expire by bookmark."""
        queue = self.queues[str(header["t"])]
        bookmarks = split_bookmarks(header.get("bm"))
        if not bookmarks:
            if header.get("filter") or header.get("sow_keys"):
                reason = "queue messages are removed by bookmark only (no filter or keys)"
            else:
                reason = "invalid bookmark"
            self._refuse(conn, header, reason)
            return
        options = protocol.options(header)
        unknown = options - ACK_OPTIONS
        if unknown or len(options) > 1:
            self._refuse(
                conn,
                header,
                f"invalid options: {', '.join(sorted(options))} (a queue ack takes cancel or "
                "expire)",
            )
            return
        seq = protocol.parse_sequence(header.get("s"))
        if "cancel" in options:
            holders = [c for s, (q, c) in self._consumers.items() if s.conn is conn and q is queue]
            for consumer in holders:
                queue.cancel(consumer, bookmarks)
        else:
            op = EXPIRE if "expire" in options else ACK
            removed = queue.expire(bookmarks) if op == EXPIRE else queue.ack(bookmarks)
            if removed:
                self._record(queue, op, removed)
        types = protocol.ack_types(header)
        if types:
            conn.send_acks(header, [t for t in types if t in _IMMEDIATE])
            if seq is not None and "persisted" in types:
                conn.add_persisted(seq)
            later = [t for t in types if t not in _IMMEDIATE and t != "persisted"]
            if seq is None and "persisted" in types:
                later.append("persisted")
            if later:
                self.broker.after_durable(lambda: conn.send_acks(header, later))
        self._dispatch(queue)

    def _record(self, queue: MessageQueue, op: str, bookmarks: list[str]) -> None:
        self.broker.append_record(
            RECORD_TOPIC, RECORD_CLIENT, encode_record(queue.name, op, bookmarks)
        )

    # ------------------------------------------------------------------ delivery

    def _dispatch(self, queue: MessageQueue) -> None:
        deliveries = queue.dispatch(self._clock())
        if not deliveries:
            return
        taken: list[str] = []
        for consumer, message in deliveries:
            self._send(queue, consumer, message)
            if queue.at_most_once:
                taken.append(message.bookmark)
        if taken:
            self._record(queue, TAKE, taken)

    def _send(self, queue: MessageQueue, consumer: Consumer, message: QueuedMessage) -> None:
        sub = cast("Subscription", consumer.handle)
        entry = message.entry
        timestamp = protocol.format_timestamp(entry.timestamp_us) if sub.with_timestamp else None
        tail = protocol.delivery_tail(queue.name, entry.bookmark, entry.correlation_id, timestamp)
        lease_ms = round(queue.config.lease_period_s * 1000)
        sub.conn.deliver(sub.sid, tail + b',"lp":"%dms"' % lease_ms, entry.body)
        sub.last_bookmark = entry.bookmark
        self.broker.counters.delivered += 1

    # ------------------------------------------------------------------ periodic

    def tick(self) -> None:
        """Return expired leases to their queues and deliver them again."""
        if not self.queues:
            return
        now = self._clock()
        for queue in self.queues.values():
            if queue.expire_leases(now):
                self._dispatch(queue)

    def stats_text(self) -> str:
        """One ``queue=..`` group per queue for the broker's stats line ("" without queues)."""
        return "; ".join(q.stats_text() for q in self.queues.values())
