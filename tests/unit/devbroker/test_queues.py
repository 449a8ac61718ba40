"""The devbroker's queue state machine: leases, fairness, backlog, acks, redelivery."""

from __future__ import annotations

from collections import Counter

from hypothesis import given

from ampsflow.config import DevbrokerQueueConfig
from ampsflow.devbroker.queues import (
    Consumer,
    MessageQueue,
    decode_record,
    encode_record,
    split_bookmarks,
)
from ampsflow.devbroker.txlog import LogEntry
from tests.strategies import queue_operations


def entry(n: int, body: bytes = b"{}") -> LogEntry:
    return LogEntry(
        position=n,
        topic="work",
        publisher_id=7,
        sequence=n,
        timestamp_us=0,
        correlation_id=None,
        client_name="pub",
        client_seq=None,
        body=body,
    )


def queue(**overrides: object) -> MessageQueue:
    values: dict[str, object] = {"name": "work", "lease_period_s": 10.0}
    values.update(overrides)
    return MessageQueue(DevbrokerQueueConfig(**values))  # type: ignore[arg-type]


def filled(count: int, **overrides: object) -> MessageQueue:
    q = queue(**overrides)
    for n in range(1, count + 1):
        q.offer(entry(n))
    return q


def bookmarks(deliveries: list[tuple[Consumer, object]]) -> list[str]:
    return [m.bookmark for _, m in deliveries]  # type: ignore[attr-defined]


class TestLeases:
    def test_each_message_goes_to_one_subscription_up_to_its_backlog(self) -> None:
        """Backlog 2: two messages leased, the third waits until one is acknowledged."""
        q = filled(3)
        c = q.subscribe("a", 2)
        assert ["7|1|", "7|2|"] == bookmarks(q.dispatch(0.0))
        assert [] == q.dispatch(0.0)
        assert ["7|1|"] == q.ack(["7|1|"])
        assert ["7|3|"] == bookmarks(q.dispatch(0.0))
        assert (2, 2, 0) == (q.depth, q.leased, q.waiting)
        assert 2 == len(c.leased)

    def test_backlog_defaults_to_one_and_is_capped_by_the_queue(self) -> None:
        """No max_backlog means 1; asking for more than the queue allows gets the queue's."""
        q = queue(max_per_subscription_backlog=4)
        assert 1 == q.subscribe("a", None).backlog
        assert 4 == q.subscribe("b", 100).backlog
        assert 3 == q.subscribe("c", 3).backlog

    def test_an_expired_lease_returns_the_message_in_log_order(self) -> None:
        """After lease_period_s the message waits again, ahead of later ones."""
        q = filled(2, lease_period_s=5.0)
        q.subscribe("a", 1)
        q.dispatch(0.0)
        assert 0 == q.expire_leases(4.9)
        assert 1 == q.expire_leases(5.0)
        delivered = q.dispatch(5.0)
        assert ["7|1|"] == bookmarks(delivered)
        assert delivered[0][1].redelivered  # type: ignore[attr-defined]
        assert 1 == q.counters.redelivered

    def test_unsubscribe_returns_leased_messages_to_another_subscription(self) -> None:
        """A disconnect puts the leased messages back for the other consumers."""
        q = filled(2)
        a = q.subscribe("a", 2)
        q.dispatch(0.0)
        q.subscribe("b", 2)
        assert 2 == q.unsubscribe(a)
        assert ["7|1|", "7|2|"] == bookmarks(q.dispatch(0.0))

    def test_cancel_returns_only_the_holders_message(self) -> None:
        """cancel from a subscription that does not hold the message changes nothing."""
        q = filled(1)
        a = q.subscribe("a", 1)
        b = q.subscribe("b", 1)
        q.dispatch(0.0)
        holder, other = (a, b) if a.leased else (b, a)
        assert 0 == q.cancel(other, ["7|1|"])
        assert 1 == q.cancel(holder, ["7|1|"])
        assert 1 == q.waiting

    def test_expire_removes_and_acks_from_anyone_are_honoured(self) -> None:
        """expire removes a waiting message; an ack needs no lease (publish-store replays)."""
        q = filled(2)
        assert ["7|1|"] == q.expire(["7|1|"])
        assert ["7|2|"] == q.ack(["7|2|", "7|9|"])
        assert 0 == q.depth
        assert (1, 1) == (q.counters.expired, q.counters.acked)

    def test_at_most_once_removes_on_delivery(self) -> None:
        """at-most-once: delivered once, acks are no-ops, nothing comes back."""
        q = filled(3, semantics="at-most-once")
        a = q.subscribe("a", 1)
        assert 3 == len(q.dispatch(0.0))
        assert 0 == q.depth
        assert [] == q.ack(["7|1|"])
        assert 0 == q.unsubscribe(a)


class TestFairness:
    def test_round_robin_alternates(self) -> None:
        """Two subscriptions with room take turns."""
        q = filled(6)
        q.subscribe("a", 10)
        q.subscribe("b", 10)
        counts = Counter(c.handle for c, _ in q.dispatch(0.0))
        assert {"a": 3, "b": 3} == counts

    def test_proportional_favours_the_subscription_with_most_room(self) -> None:
        """Backlogs 6 and 2: messages go where there is most room, ending 6 and 2."""
        q = filled(8, fairness="proportional")
        q.subscribe("a", 6)
        q.subscribe("b", 2)
        counts = Counter(c.handle for c, _ in q.dispatch(0.0))
        assert {"a": 6, "b": 2} == counts

    def test_a_filter_skips_subscriptions_that_do_not_match(self) -> None:
        """A message no free subscription's filter matches keeps waiting, in place."""
        q = queue()
        q.offer(entry(1, b'{"k":1}'))
        q.offer(entry(2, b'{"k":2}'))
        q.subscribe("ones", 5, lambda body: isinstance(body, dict) and body.get("k") == 1)
        assert ["7|1|"] == bookmarks(q.dispatch(0.0))
        assert 1 == q.waiting
        q.subscribe("twos", 5, lambda body: isinstance(body, dict) and body.get("k") == 2)
        assert ["7|2|"] == bookmarks(q.dispatch(0.0))


class TestRecords:
    def test_round_trip(self) -> None:
        """A record decodes to what was encoded; anything else is not a record."""
        assert ("q", "ack", ["1|2|"]) == decode_record(encode_record("q", "ack", ["1|2|"]))
        assert decode_record(b"not json") is None
        assert decode_record(b'{"q":"q","op":"drop","bm":[]}') is None

    def test_split_bookmarks(self) -> None:
        """A batched ack is a comma list."""
        assert ["1|2|", "1|3|"] == split_bookmarks("1|2|, 1|3|,")
        assert [] == split_bookmarks(None)


@given(queue_operations)
def test_nothing_is_lost_or_held_twice(operations: list[tuple[str, int, int]]) -> None:
    """Under any sequence of events: every offered message is removed exactly once or is
    still in the queue; no message is leased to two subscriptions; backlogs hold."""
    q = queue(max_per_subscription_backlog=3, lease_period_s=2.0)
    consumers: list[Consumer] = []
    offered: list[str] = []
    removed: list[str] = []
    now = 0.0
    next_position = 1
    for name, a, b in operations:
        if name == "offer":
            for _ in range(b + 1):
                q.offer(entry(next_position))
                offered.append(f"7|{next_position}|")
                next_position += 1
        elif name == "subscribe":
            consumers.append(q.subscribe(f"c{len(consumers)}", b or None))
        elif name == "unsubscribe" and consumers:
            q.unsubscribe(consumers.pop(a % len(consumers)))
        elif name in ("ack", "expire") and offered:
            target = [offered[a % len(offered)]]
            removed += q.ack(target) if name == "ack" else q.expire(target)
        elif name == "cancel" and consumers and offered:
            q.cancel(consumers[a % len(consumers)], [offered[a % len(offered)]])
        elif name == "advance":
            now += b
            q.expire_leases(now)
        else:
            q.dispatch(now)
        holders: dict[str, Consumer] = {}
        for consumer in consumers:
            assert len(consumer.leased) <= consumer.backlog
            for bookmark in consumer.leased:
                assert bookmark not in holders
                holders[bookmark] = consumer
        assert len(removed) == len(set(removed))
        present = {b for b in offered if q.get(b) is not None}
        assert set(offered) == present | set(removed)
        assert not present & set(removed)
        assert q.depth == len(present) == q.waiting + q.leased
        assert set(holders) <= present
