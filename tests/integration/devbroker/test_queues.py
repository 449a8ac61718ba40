"""Conformance of the devbroker's message queues with the official AMPS Python client.

Each test drives the client's own queue API (``subscribe`` with ``max_backlog``,
``message.ack()``, ``client.ack()``, ``set_ack_batch_size``, ``set_auto_ack``, the
``cancel`` and ``expire`` options) against an in-process broker, or a subprocess broker
for ``kill -9``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import AMPS
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.config import DevbrokerQueueConfig
from ampsflow.devbroker.queues import RECORD_TOPIC, decode_record
from ampsflow.devbroker.txlog import ReplayCursor
from tests.integration.devbroker.conftest import (
    BrokerProcess,
    RunningBroker,
    broker_config,
    wait_until,
)
from tests.strategies import queue_ack_noise, queue_ack_options

QUEUE = "work-queue"


@dataclass
class Leased:
    """What a queue subscription's handler saw: (body, bookmark, lease period) in order."""

    items: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail_on: set[str] = field(default_factory=set)

    def __call__(self, message: AMPS.Message) -> None:
        with self.lock:
            self.items.append(
                (message.get_data(), message.get_bookmark(), message.get_lease_period())
            )
        if message.get_data() in self.fail_on:
            self.fail_on.discard(message.get_data())
            raise RuntimeError("handler failed")

    def wait_for(self, count: int) -> list[tuple[str, str, str]]:
        wait_until(lambda: len(self.items) >= count, f"{count} queue messages")
        with self.lock:
            return list(self.items)

    @property
    def bodies(self) -> list[str]:
        with self.lock:
            return [body for body, _, _ in self.items]


@pytest.fixture
def queue_broker(start_broker) -> Callable[..., RunningBroker]:
    """Start a broker with one queue ``work-queue`` over topic ``work`` (options override)."""

    def start(**queue: object) -> RunningBroker:
        values: dict[str, object] = {"name": QUEUE, "underlying_topic": "work"}
        values.update(queue)
        return start_broker(queues=(DevbrokerQueueConfig(**values),))  # type: ignore[arg-type]

    return start


def publish(client: AMPS.Client, count: int, start: int = 0) -> list[str]:
    bodies = [f'{{"n":{n}}}' for n in range(start, start + count)]
    for body in bodies:
        client.publish("work", body)
    client.publish_flush(5000)
    return bodies


def stats(broker: RunningBroker) -> dict[str, int]:
    def read() -> dict[str, int]:
        q = broker.broker.queues.queues[QUEUE]
        return {"depth": q.depth, "leased": q.leased, "waiting": q.waiting, **vars_of(q)}

    return broker.call(read)


def vars_of(q: object) -> dict[str, int]:
    counters = q.counters  # type: ignore[attr-defined]
    return {name: getattr(counters, name) for name in counters.__slots__}


def records(broker: RunningBroker) -> list[tuple[str, str, list[str]]]:
    """The queue records in the broker's transaction log, in order."""

    def read() -> list[tuple[str, str, list[str]]]:
        log = broker.broker.log
        entries, _ = log.read(ReplayCursor(position=1), up_to=log.durable_position, limit=100_000)
        return [decode_record(e.body) for e in entries if e.topic == RECORD_TOPIC]  # type: ignore[misc]

    return broker.call(read)


class TestSamples:
    def test_the_60east_queue_samples_pattern(self, queue_broker, connect):
        """AMPSQueuePublisher/AMPSQueueConsumer: publish 1000 to the queue's topic,
        publish_flush; iterate subscribe(topic) calling msg.ack(): all 1000 arrive once."""
        broker = queue_broker(underlying_topic=None, name="sample-queue")
        publisher = connect(broker.tcp_uri, "QueuePublisher-1")
        for i in range(1000):
            publisher.publish("sample-queue", f'{{ "hi" : "Hello, world! this is message {i}"}}')
        publisher.publish_flush(2000)
        consumer = connect(broker.tcp_uri, "QueueConsumer-1")
        seen = []
        for msg in consumer.subscribe(topic="sample-queue", timeout=5000):
            seen.append(msg.get_data())
            msg.ack()
            if len(seen) == 1000:
                break
        assert [f'{{ "hi" : "Hello, world! this is message {i}"}}' for i in range(1000)] == seen
        wait_until(
            lambda: broker.call(lambda: broker.broker.queues.queues["sample-queue"].depth) == 0,
            "every message acknowledged",
        )


class TestLeaseAndBacklog:
    def test_messages_carry_a_lease_and_backlog_one_waits_for_the_ack(self, queue_broker, connect):
        """Without max_backlog a subscription holds one message; the next follows its ack."""
        broker = queue_broker(lease_period_s=30)
        bodies = publish(connect(broker.tcp_uri), 3)
        consumer = connect(broker.tcp_uri)
        leased = Leased()
        consumer.subscribe(leased, QUEUE)
        first = leased.wait_for(1)
        assert [(bodies[0], first[0][1], "30000ms")] == first
        time.sleep(0.2)  # give a wrongly sent second message the time to arrive
        assert 1 == len(leased.bodies)
        consumer.ack(QUEUE, first[0][1])
        assert bodies[:2] == [b for b, _, _ in leased.wait_for(2)]

    def test_max_backlog_is_granted_up_to_the_queue_limit(self, queue_broker, connect):
        """max_backlog=50 against max_per_subscription_backlog 4: four leased at once."""
        broker = queue_broker(max_per_subscription_backlog=4)
        publish(connect(broker.tcp_uri), 10)
        leased = Leased()
        connect(broker.tcp_uri).subscribe(leased, QUEUE, options="max_backlog=50")
        leased.wait_for(4)
        wait_until(lambda: stats(broker)["leased"] == 4, "four leased")
        assert (4, 6) == (len(leased.bodies), stats(broker)["waiting"])


class TestFairness:
    def test_round_robin_spreads_evenly(self, queue_broker, connect):
        """Three consumers with room: 30 messages split 10/10/10."""
        broker = queue_broker(max_per_subscription_backlog=100)
        handlers = [Leased() for _ in range(3)]
        for handler in handlers:
            connect(broker.tcp_uri).subscribe(handler, QUEUE, options="max_backlog=100")
        publish(connect(broker.tcp_uri), 30)
        wait_until(lambda: sum(len(h.bodies) for h in handlers) == 30, "30 deliveries")
        assert [10, 10, 10] == [len(h.bodies) for h in handlers]

    def test_proportional_follows_the_room_each_consumer_has(self, queue_broker, connect):
        """Backlogs 6 and 2 against 8 waiting messages: 6 and 2."""
        broker = queue_broker(fairness="proportional", max_per_subscription_backlog=10)
        publish(connect(broker.tcp_uri), 8)
        big, small = Leased(), Leased()
        big_client = connect(broker.tcp_uri)
        small_client = connect(broker.tcp_uri)
        # Subscribed before anything is dispatched to either: pause delivery by
        # subscribing both with the queue already holding the messages.
        big_client.subscribe(big, QUEUE, options="max_backlog=6")
        small_client.subscribe(small, QUEUE, options="max_backlog=2")
        wait_until(lambda: len(big.bodies) + len(small.bodies) == 8, "8 deliveries")
        assert (6, 2) == (len(big.bodies), len(small.bodies))


class TestAcks:
    def test_batched_acks_arrive_as_one_sow_delete(self, queue_broker, connect):
        """set_ack_batch_size(5): five acks reach the broker as one comma list."""
        broker = queue_broker(max_per_subscription_backlog=10)
        publish(connect(broker.tcp_uri), 5)
        consumer = connect(broker.tcp_uri)
        consumer.set_ack_batch_size(5)
        leased = Leased()
        consumer.subscribe(leased, QUEUE, options="max_backlog=10")
        items = leased.wait_for(5)
        for _, bookmark, _ in items:
            consumer.ack(QUEUE, bookmark)
        wait_until(lambda: stats(broker)["depth"] == 0, "the batch acknowledged")
        wait_until(lambda: bool(records(broker)), "the ack record committed")
        assert [(QUEUE, "ack", [b for _, b, _ in items])] == records(broker)

    def test_auto_ack_acknowledges_after_the_handler_and_cancels_on_exception(
        self, queue_broker, connect
    ):
        """set_auto_ack(True): handled messages are acked; one whose handler raised is
        cancelled and delivered again."""
        broker = queue_broker()
        bodies = publish(connect(broker.tcp_uri), 3)
        consumer = connect(broker.tcp_uri)
        consumer.set_auto_ack(True)
        leased = Leased(fail_on={bodies[1]})
        consumer.subscribe(leased, QUEUE)
        leased.wait_for(4)
        wait_until(lambda: stats(broker)["depth"] == 0, "all auto-acknowledged")
        assert [bodies[0], bodies[1], bodies[1], bodies[2]] == leased.bodies
        assert (1, 3) == (stats(broker)["cancelled"], stats(broker)["acked"])

    def test_cancel_returns_and_expire_removes(self, queue_broker, connect):
        """message.ack('cancel') gets the message again; ack('expire') drops it for good."""
        broker = queue_broker()
        bodies = publish(connect(broker.tcp_uri), 2)
        consumer = connect(broker.tcp_uri)
        stream = consumer.subscribe(topic=QUEUE, timeout=5000)
        seen = []
        for msg in stream:
            seen.append(msg.get_data())
            if len(seen) == 1:
                msg.ack("cancel")
            elif len(seen) == 2:
                msg.ack("expire")
            else:
                msg.ack()
            if len(seen) == 3:
                break
        assert [bodies[0], bodies[0], bodies[1]] == seen
        wait_until(lambda: stats(broker)["depth"] == 0, "the queue empty")
        assert (1, 1, 1) == tuple(stats(broker)[k] for k in ("cancelled", "expired", "acked"))


class TestRedelivery:
    def test_an_expired_lease_is_delivered_again(self, queue_broker, connect):
        """Not acknowledged within lease_period_s: the same message (same bookmark) again."""
        broker = queue_broker(lease_period_s=0.3)
        bodies = publish(connect(broker.tcp_uri), 1)
        leased = Leased()
        connect(broker.tcp_uri).subscribe(leased, QUEUE)
        items = leased.wait_for(2)
        assert [bodies[0], bodies[0]] == [b for b, _, _ in items[:2]]
        assert items[0][1] == items[1][1]
        assert stats(broker)["lease_expiries"] >= 1

    def test_a_disconnect_returns_the_leases_to_another_consumer(self, queue_broker, connect):
        """A consumer holding three messages disconnects: another gets exactly those."""
        broker = queue_broker(lease_period_s=60)
        bodies = publish(connect(broker.tcp_uri), 3)
        first = connect(broker.tcp_uri)
        held = Leased()
        first.subscribe(held, QUEUE, options="max_backlog=3")
        held.wait_for(3)
        first.close()
        second = Leased()
        connect(broker.tcp_uri).subscribe(second, QUEUE, options="max_backlog=3")
        assert bodies == [b for b, _, _ in second.wait_for(3)]
        assert stats(broker)["returned_on_unsubscribe"] == 3


class TestAtMostOnce:
    def test_delivered_once_and_never_again(self, queue_broker, connect):
        """at-most-once: messages leave the queue as they are delivered; a consumer that
        disconnects without acknowledging leaves nothing to redeliver."""
        broker = queue_broker(semantics="at-most-once")
        bodies = publish(connect(broker.tcp_uri), 3)
        first = connect(broker.tcp_uri)
        leased = Leased()
        first.subscribe(leased, QUEUE)
        assert bodies == [b for b, _, _ in leased.wait_for(3)]
        first.close()
        wait_until(lambda: bool(records(broker)), "the take records committed")
        second = Leased()
        connect(broker.tcp_uri).subscribe(second, QUEUE)
        time.sleep(0.3)  # a wrongly redelivered message would arrive by now
        assert ([], 0) == (second.bodies, stats(broker)["depth"])


class TestKill9:
    def test_acked_never_again_leased_again_after_kill9(self, tmp_path, connect):
        """kill -9 of the broker: acknowledged messages stay gone, leased-but-unacked and
        waiting ones are delivered after the restart."""
        proc = BrokerProcess(tmp_path)
        proc.config.write_text(
            "logging:\n  level: debug\ndevbroker:\n  queues:\n"
            f"    - name: {QUEUE}\n      underlying_topic: work\n",
            encoding="utf-8",
        )
        proc.start()
        try:
            bodies = publish(connect(proc.tcp_uri), 20)
            consumer = connect(proc.tcp_uri)
            leased = Leased()
            consumer.subscribe(leased, QUEUE, options="max_backlog=5")
            acked = 0
            while acked < 10:
                items = leased.wait_for(acked + 1)
                consumer.ack(QUEUE, items[acked][1])
                acked += 1
            leased.wait_for(15)  # ten acked, five leased and not acknowledged
            consumer.publish_flush(5000)  # the acks are durable once the flush is answered
            proc.kill9()
            proc.start()
            again = Leased()
            connect(proc.tcp_uri).subscribe(again, QUEUE, options="max_backlog=20")
            got = sorted(b for b, _, _ in again.wait_for(10))
            time.sleep(0.3)  # an acked message delivered by mistake would arrive by now
            assert sorted(bodies[10:]) == got
            assert 10 == len(again.bodies)
            assert 0 == proc.terminate()
            # The stats line at shutdown shows the queue: the ten unacknowledged messages
            # (waiting again: the broker closed the consumer's connection first).
            assert f"queue={QUEUE} depth=10 waiting=10 leased=0" in proc.output()
        finally:
            proc.kill9()


class TestRefused:
    @pytest.mark.parametrize(
        ("kwargs", "reason"),
        [
            ({"options": "pull"}, "invalid options 'pull'"),
            ({"options": "max_backlog=x"}, "invalid options"),
        ],
    )
    def test_unsupported_subscribe_options_are_nacked_with_a_reason(
        self, queue_broker, connect, kwargs, reason
    ):
        """A queue subscription with an option the devbroker lacks fails with the reason."""
        broker = queue_broker()
        client = connect(broker.tcp_uri)
        with pytest.raises(AMPS.AMPSException, match=reason):
            client.subscribe(lambda m: None, QUEUE, timeout=5000, **kwargs)

    def test_bookmark_subscription_to_a_queue_is_nacked(self, queue_broker, connect):
        """Queues have no replay: a bookmark subscribe is refused with the reason."""
        broker = queue_broker()
        client = connect(broker.tcp_uri)
        with pytest.raises(AMPS.AMPSException, match="queue subscriptions take no bookmark"):
            client.execute(AMPS.Command("subscribe").set_topic(QUEUE).set_bookmark("0"))

    def test_sow_delete_by_filter_on_a_queue_is_nacked(self, queue_broker, connect):
        """Removing queue messages by filter is not supported: refused with the reason."""
        broker = queue_broker()
        client = connect(broker.tcp_uri)
        with pytest.raises(AMPS.AMPSException, match="removed by bookmark only"):
            client.sow_delete(QUEUE, "/n = 1", timeout=5000)

    def test_publishing_to_the_record_topic_is_refused(self, queue_broker, connect):
        """Clients cannot forge queue records."""
        broker = queue_broker()
        client = connect(broker.tcp_uri)
        client.publish(RECORD_TOPIC, '{"q":"work-queue","op":"ack","bm":[]}')
        wait_until(lambda: broker.counter("malformed_frames") == 1, "the publish refused")
        assert [] == records(broker)


@pytest.fixture(scope="module")
def fuzz_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One broker with the work queue for the property test's many examples."""
    broker = RunningBroker(
        broker_config(
            tmp_path_factory.mktemp("queue-fuzz"),
            queues=(
                DevbrokerQueueConfig(
                    name=QUEUE,
                    underlying_topic="work",
                    lease_period_s=60,
                    max_per_subscription_backlog=100_000,
                ),
            ),
        )
    )
    broker.start()
    yield broker
    broker.stop()


@given(
    st.lists(
        st.tuples(
            st.one_of(st.integers(min_value=0, max_value=3), queue_ack_noise),
            queue_ack_options,
        ),
        max_size=8,
    )
)
def test_any_acks_keep_the_queue_consistent(fuzz_broker, acks):
    """Acks with real or garbage bookmarks and any options: the broker keeps serving, and
    exactly the messages acknowledged or expired by a real bookmark leave the queue."""
    broker = fuzz_broker
    publisher = AMPS.Client(f"fuzz-pub-{uuid.uuid4().hex[:8]}")
    publisher.connect(broker.tcp_uri)
    publisher.logon()
    consumer = AMPS.Client(f"fuzz-sub-{uuid.uuid4().hex[:8]}")
    try:
        before = stats(broker)["depth"]
        bodies = publish(publisher, 4)
        consumer.connect(broker.tcp_uri)
        consumer.logon()
        leased = Leased()
        consumer.subscribe(leased, QUEUE, options="max_backlog=100000")
        wait_until(lambda: len(leased.bodies) >= 4 + before, "the messages leased")
        mine = {b: bm for b, bm, _ in leased.items if b in bodies}
        removed: set[str] = set()
        for target, options in acks:
            bookmark = mine[bodies[target]] if isinstance(target, int) else target
            command = AMPS.Command("sow_delete").set_topic(QUEUE).set_bookmark(bookmark)
            if options:
                command.set_options(options)
            with contextlib.suppress(AMPS.AMPSException):  # refused: its reason is raised
                consumer.execute_async(command, None)
            if isinstance(target, int) and options in ("", "expire"):
                removed.add(bookmark)
        consumer.publish_flush(5000)  # answered after every command sent before it
        left = broker.call(
            lambda: {bm for bm in mine.values() if broker.broker.queues.queues[QUEUE].get(bm)}
        )
        assert set(mine.values()) - removed == left
    finally:
        consumer.close()
        publisher.close()
    # Disconnected: whatever it still held waits again, nothing is lost.
    wait_until(lambda: stats(broker)["leased"] == 0, "the leases returned")
