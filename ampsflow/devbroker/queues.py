"""Message queues of the devbroker: leases, acks, fairness, backlog, redelivery.

A :class:`MessageQueue` is the state of one configured queue (``devbroker.queues``), as
AMPS documents queues:

- Every committed message of the queue's underlying topic is **offered** to the queue
  (:meth:`MessageQueue.offer`) and waits, in log order, until a subscription has room.
- **Leases.** With ``at-least-once`` semantics, :meth:`MessageQueue.dispatch` leases each
  waiting message to exactly one subscription (a :class:`Consumer`) for ``lease_period_s``.
  A subscription holds at most its backlog of leased messages: the ``max_backlog`` it asked
  for (1 when it asked for none), capped by the queue's ``max_per_subscription_backlog``.
- **Fairness.** ``round-robin`` gives the next message to the next subscription, in turn,
  that has room (and whose content filter matches); ``proportional`` gives it to the
  subscription with the most room left, ties in turn.
- **Acks.** :meth:`MessageQueue.ack` removes messages for good (from whichever subscription
  holds them: a client that restarts replays its acks from its publish store on a new
  connection); :meth:`MessageQueue.cancel` returns the holder's messages to the queue;
  :meth:`MessageQueue.expire` removes them like an ack but counts them as expired.
- **Redelivery.** A lease that runs out (:meth:`MessageQueue.expire_leases`) or a
  subscription that goes away (:meth:`MessageQueue.unsubscribe`: unsubscribe or disconnect)
  returns its messages to the queue, in their log order, for the next dispatch. A message
  delivered again counts as redelivered.
- ``at-most-once`` semantics remove a message from the queue as it is dispatched; there
  are no leases, acks change nothing and nothing is ever delivered twice.

Durability is the caller's: every removal (ack, expire, at-most-once delivery) must be
written to the transaction log as a queue record (:func:`encode_record`) before it is
acknowledged, and at start the log is replayed through :meth:`MessageQueue.offer` and
:func:`decode_record` / :meth:`MessageQueue.forget` in log order. Leases are not recorded:
after a broker restart every message that was leased but not acknowledged is waiting again.

This module is pure: no I/O, and the clock is passed in.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from ampsflow.config import DevbrokerQueueConfig
from ampsflow.devbroker.txlog import LogEntry

RECORD_TOPIC = "\x00ampsflow.queue"
"""Reserved topic of queue records in the transaction log: never delivered, and refused
as a publish topic."""

ACK = "ack"
EXPIRE = "expire"
TAKE = "take"
_OPS = (ACK, EXPIRE, TAKE)
_UNPARSED = object()


@dataclass(slots=True)
class QueueCounters:
    """What one queue has done since the broker started (logged with the broker's stats)."""

    enqueued: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    expired: int = 0
    cancelled: int = 0
    lease_expiries: int = 0
    returned_on_unsubscribe: int = 0


@dataclass(slots=True, eq=False)
class QueuedMessage:
    """One message waiting in, or leased from, a queue."""

    entry: LogEntry
    deliveries: int = 0
    holder: Consumer | None = None
    lease_expires: float = 0.0
    waiting: bool = False
    body: object = _UNPARSED

    @property
    def bookmark(self) -> str:
        """The message's bookmark: what consumers acknowledge it with."""
        return self.entry.bookmark

    @property
    def redelivered(self) -> bool:
        """Whether this message has been delivered before."""
        return self.deliveries > 1


@dataclass(slots=True, eq=False)
class Consumer:
    """One subscription to a queue (``handle`` is the broker's subscription object)."""

    handle: object
    backlog: int
    matches_body: Callable[[object], bool] | None = None
    leased: dict[str, QueuedMessage] = field(default_factory=dict)
    delivered: int = 0

    @property
    def room(self) -> int:
        """How many more messages it may hold."""
        return self.backlog - len(self.leased)


class MessageQueue:
    """The state of one queue (see the module docstring)."""

    def __init__(self, config: DevbrokerQueueConfig) -> None:
        self.config = config
        self.name = config.name
        self.at_most_once = config.semantics == "at-most-once"
        self.proportional = config.fairness == "proportional"
        self.counters = QueueCounters()
        self._messages: dict[str, QueuedMessage] = {}
        self._waiting: list[tuple[int, str]] = []
        self._waiting_count = 0
        self._consumers: list[Consumer] = []
        self._turn = 0
        self._leases: list[tuple[float, int, str]] = []
        self._lease_ids = itertools.count()

    # ------------------------------------------------------------------ figures

    @property
    def depth(self) -> int:
        """Messages in the queue: waiting plus leased."""
        return len(self._messages)

    @property
    def waiting(self) -> int:
        """Messages waiting for a subscription with room."""
        return self._waiting_count

    @property
    def leased(self) -> int:
        """Messages leased and not yet acknowledged."""
        return len(self._messages) - self._waiting_count

    @property
    def consumers(self) -> int:
        """Subscriptions to the queue."""
        return len(self._consumers)

    def stats_text(self) -> str:
        """``queue=NAME depth=.. leased=.. acked=..`` for the broker's stats line."""
        counters = " ".join(
            f"{f.name}={getattr(self.counters, f.name)}" for f in fields(self.counters)
        )
        return (
            f"queue={self.name} depth={self.depth} waiting={self.waiting} "
            f"leased={self.leased} subscriptions={self.consumers} {counters}"
        )

    def get(self, bookmark: str) -> QueuedMessage | None:
        """The queued message with this bookmark, if it is still in the queue."""
        return self._messages.get(bookmark)

    # ------------------------------------------------------------------ messages in

    def offer(self, entry: LogEntry) -> None:
        """Add a committed message of the underlying topic (in log order)."""
        bookmark = entry.bookmark
        if bookmark in self._messages:
            return
        message = QueuedMessage(entry)
        self._messages[bookmark] = message
        self._wait(message)
        self.counters.enqueued += 1

    def forget(self, bookmarks: Iterable[str]) -> int:
        """Apply a logged removal at recovery: the messages leave the queue."""
        return len(self._remove(bookmarks))

    def _wait(self, message: QueuedMessage) -> None:
        if not message.waiting:
            message.waiting = True
            self._waiting_count += 1
            heapq.heappush(self._waiting, (message.entry.position, message.bookmark))

    def _unwait(self, message: QueuedMessage) -> None:
        # The heap entry stays; dispatch skips entries whose message is not waiting.
        if message.waiting:
            message.waiting = False
            self._waiting_count -= 1

    def _release(self, message: QueuedMessage) -> None:
        holder = message.holder
        if holder is not None:
            holder.leased.pop(message.bookmark, None)
            message.holder = None

    # ------------------------------------------------------------------ subscriptions

    def subscribe(
        self,
        handle: object,
        max_backlog: int | None,
        matches_body: Callable[[object], bool] | None = None,
    ) -> Consumer:
        """Add a subscription; its backlog is ``max_backlog`` (default 1) capped by the queue's."""
        asked = 1 if max_backlog is None else max(1, max_backlog)
        consumer = Consumer(
            handle,
            min(asked, self.config.max_per_subscription_backlog),
            matches_body,
        )
        self._consumers.append(consumer)
        return consumer

    def unsubscribe(self, consumer: Consumer) -> int:
        """Remove a subscription; its leased messages wait again. Returns how many."""
        try:
            index = self._consumers.index(consumer)
        except ValueError:
            return 0
        del self._consumers[index]
        if index < self._turn:
            self._turn -= 1
        returned = 0
        for message in list(consumer.leased.values()):
            message.holder = None
            self._wait(message)
            returned += 1
        consumer.leased.clear()
        self.counters.returned_on_unsubscribe += returned
        return returned

    # ------------------------------------------------------------------ acknowledgements

    def ack(self, bookmarks: Iterable[str]) -> list[str]:
        """Remove acknowledged messages; returns the bookmarks removed (to be logged)."""
        if self.at_most_once:
            return []
        removed = self._remove(bookmarks)
        self.counters.acked += len(removed)
        return removed

    def expire(self, bookmarks: Iterable[str]) -> list[str]:
        """Remove messages without processing them; returns the bookmarks removed."""
        removed = self._remove(bookmarks)
        self.counters.expired += len(removed)
        return removed

    def _remove(self, bookmarks: Iterable[str]) -> list[str]:
        removed = []
        for bookmark in bookmarks:
            message = self._messages.pop(bookmark, None)
            if message is None:
                continue
            self._unwait(message)
            self._release(message)
            removed.append(bookmark)
        return removed

    def cancel(self, consumer: Consumer | None, bookmarks: Iterable[str]) -> int:
        """Return messages leased to ``consumer`` to the queue; others are left alone."""
        returned = 0
        for bookmark in bookmarks:
            message = self._messages.get(bookmark)
            if message is None or message.holder is None or message.holder is not consumer:
                continue
            self._release(message)
            self._wait(message)
            returned += 1
        self.counters.cancelled += returned
        return returned

    def expire_leases(self, now: float) -> int:
        """Return every message whose lease ran out by ``now`` to the queue."""
        leases = self._leases
        returned = 0
        while leases and leases[0][0] <= now:
            expires, _, bookmark = heapq.heappop(leases)
            message = self._messages.get(bookmark)
            if message is None or message.holder is None or message.lease_expires != expires:
                continue
            self._release(message)
            self._wait(message)
            returned += 1
        self.counters.lease_expiries += returned
        return returned

    # ------------------------------------------------------------------ delivery

    def dispatch(self, now: float) -> list[tuple[Consumer, QueuedMessage]]:
        """Lease (or, at-most-once, hand out) waiting messages to subscriptions with room.

        Returns the deliveries to send, in order. Messages no subscription's filter
        matches keep waiting, in place.
        """
        if not self._consumers or not self._waiting_count:
            return []
        unlimited = self.at_most_once
        free = [c for c in self._consumers if unlimited or c.room > 0]
        if not free:
            return []
        out: list[tuple[Consumer, QueuedMessage]] = []
        skipped: list[tuple[int, str]] = []
        waiting = self._waiting
        lease_s = self.config.lease_period_s
        while waiting and free:
            position, bookmark = heapq.heappop(waiting)
            message = self._messages.get(bookmark)
            if message is None or not message.waiting:
                continue
            consumer = self._choose(message, free)
            if consumer is None:
                skipped.append((position, bookmark))
                continue
            self._unwait(message)
            message.deliveries += 1
            consumer.delivered += 1
            self.counters.delivered += 1
            if message.deliveries > 1:
                self.counters.redelivered += 1
            if unlimited:
                del self._messages[bookmark]
            else:
                message.holder = consumer
                message.lease_expires = now + lease_s
                consumer.leased[bookmark] = message
                heapq.heappush(
                    self._leases, (message.lease_expires, next(self._lease_ids), bookmark)
                )
                if consumer.room <= 0:
                    free.remove(consumer)
            out.append((consumer, message))
        for item in skipped:
            heapq.heappush(waiting, item)
        return out

    def _choose(self, message: QueuedMessage, free: list[Consumer]) -> Consumer | None:
        consumers = self._consumers
        count = len(consumers)
        best: Consumer | None = None
        best_index = 0
        for step in range(count):
            index = (self._turn + step) % count
            consumer = consumers[index]
            if consumer not in free or not self._matches(consumer, message):
                continue
            if not self.proportional:
                best, best_index = consumer, index
                break
            if best is None or consumer.room > best.room:
                best, best_index = consumer, index
        if best is not None:
            self._turn = (best_index + 1) % count
        return best

    @staticmethod
    def _matches(consumer: Consumer, message: QueuedMessage) -> bool:
        if consumer.matches_body is None:
            return True
        if message.body is _UNPARSED:
            try:
                message.body = json.loads(message.entry.body)
            except ValueError:
                message.body = None
        return consumer.matches_body(message.body)


def encode_record(queue: str, op: str, bookmarks: Iterable[str]) -> bytes:
    """The body of a queue record: ``op`` (ack, expire, take) of ``bookmarks`` in ``queue``."""
    return json.dumps({"q": queue, "op": op, "bm": list(bookmarks)}, separators=(",", ":")).encode()


def decode_record(body: bytes) -> tuple[str, str, list[str]] | None:
    """``(queue, op, bookmarks)`` of a queue record, or ``None`` when it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    queue, op, bookmarks = data.get("q"), data.get("op"), data.get("bm")
    if not isinstance(queue, str) or op not in _OPS or not isinstance(bookmarks, list):
        return None
    return queue, str(op), [b for b in bookmarks if isinstance(b, str)]


def split_bookmarks(value: object) -> list[str]:
    """The bookmarks of an ack's ``bm``: one, or a comma list (batched acks)."""
    if not isinstance(value, str):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]
