"""Conformance of the devbroker with the official AMPS Python client over TCP."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import AMPS
import pytest

from ampsflow.devbroker.auth import Users, hash_password
from ampsflow.devbroker.bookmarks import publisher_id
from tests.integration.devbroker.conftest import DEADLINE_S, BrokerProcess, wait_until


@dataclass
class Received:
    """What a subscription handler saw, in order."""

    bodies: list[str] = field(default_factory=list)
    correlation_ids: list[str] = field(default_factory=list)
    bookmarks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, message: AMPS.Message) -> None:
        with self.lock:
            self.bodies.append(message.get_data())
            self.correlation_ids.append(message.get_correlation_id())
            self.bookmarks.append(message.get_bookmark())

    def wait_for(self, count: int) -> list[str]:
        wait_until(lambda: len(self.bodies) >= count, f"{count} messages")
        with self.lock:
            return list(self.bodies)


def topic() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


class TestLogon:
    def test_logon_reports_server_version(self, shared_broker, connect):
        """The logon ack's version is what the client reports as the server version."""
        client = connect(shared_broker.tcp_uri)
        assert client.get_server_version() == 5030400

    def test_logon_reports_name_hash(self, shared_broker, connect):
        """The bookmark in the logon ack gives the client its publisher id as name hash."""
        client = connect(shared_broker.tcp_uri, name="hash-check")
        assert str(publisher_id("hash-check")) == client.get_name_hash()


class TestPublishSubscribe:
    def test_subscriber_receives_published_body(self, shared_broker, connect):
        """A published body reaches a subscriber of the topic unchanged."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, t)
        publisher = connect(shared_broker.tcp_uri)
        publisher.publish(t, '{"id":1,"text":"héllo"}')
        assert received.wait_for(1) == ['{"id":1,"text":"héllo"}']

    def test_other_topics_are_not_delivered(self, shared_broker, connect):
        """A subscriber only receives its own topic."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, t)
        publisher = connect(shared_broker.tcp_uri)
        publisher.publish(t + "x", '{"id":1}')
        publisher.publish(t, '{"id":2}')
        assert received.wait_for(1) == ['{"id":2}']

    def test_regex_topic_subscription(self, shared_broker, connect):
        """A topic with regex characters matches published topic names as a regex."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, f"^{t}\\.(a|b)$")
        publisher = connect(shared_broker.tcp_uri)
        for suffix in ("a", "c", "b"):
            publisher.publish(f"{t}.{suffix}", f'{{"s":"{suffix}"}}')
        assert received.wait_for(2) == ['{"s":"a"}', '{"s":"b"}']

    def test_correlation_id_is_delivered(self, shared_broker, connect):
        """The publisher's correlation id (x) arrives with the message."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, t)
        publisher = connect(shared_broker.tcp_uri)
        command = AMPS.Command("publish").set_topic(t).set_data("{}")
        publisher.execute_async(command.set_correlation_id("Y29ycjE="), None)
        received.wait_for(1)
        assert received.correlation_ids == ["Y29ycjE="]

    def test_delta_publish_is_delivered(self, shared_broker, connect):
        """A delta_publish reaches subscribers like a publish (no state of the world)."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, t)
        connect(shared_broker.tcp_uri).delta_publish(t, '{"id":1,"px":2}')
        assert received.wait_for(1) == ['{"id":1,"px":2}']

    def test_unsubscribe_stops_delivery(self, shared_broker, connect):
        """After unsubscribe, a subscription receives nothing more."""
        t = topic()
        stopped, control = Received(), Received()
        subscriber = connect(shared_broker.tcp_uri)
        sub_id = subscriber.subscribe(stopped, t)
        subscriber.unsubscribe(sub_id)
        subscriber.subscribe(control, t)
        connect(shared_broker.tcp_uri).publish(t, "{}")
        control.wait_for(1)
        assert stopped.bodies == []

    def test_flush_returns_after_delivery(self, shared_broker, connect):
        """publish_flush returns once the broker has processed the publishes."""
        t = topic()
        received = Received()
        connect(shared_broker.tcp_uri).subscribe(received, t)
        publisher = connect(shared_broker.tcp_uri)
        for i in range(100):
            publisher.publish(t, f'{{"i":{i}}}')
        publisher.publish_flush(10_000)
        assert len(received.wait_for(100)) == 100


FILTER_DATA = [
    '{"id":1,"sym":"A","px":10,"qty":5,"tag":"red","nested":{"k":"x"}}',
    '{"id":2,"sym":"B","px":20.5,"qty":0,"tag":"green"}',
    '{"id":3,"sym":"C","px":30,"qty":7,"nested":{"k":"y"}}',
    '{"id":4,"sym":"BB","px":"40","qty":9,"tag":""}',
]

FILTERS = [
    ("/sym = 'B'", [2]),
    ("/px != 10", [2, 3, 4]),
    ("/px <> 10", [2, 3, 4]),
    ("/px < 20.5", [1]),
    ("/px > 20.5", [3, 4]),
    ("/px <= 20.5", [1, 2]),
    ("/px >= 30", [3, 4]),
    ("/sym = 'A' OR /sym = 'C'", [1, 3]),
    ("/px > 5 AND /qty < 6", [1, 2]),
    ("NOT (/sym = 'A')", [2, 3, 4]),
    ("(/qty = 0 OR /qty = 9) AND /px > 20", [2, 4]),
    ("/sym IN ('A', 'BB')", [1, 4]),
    ("/px BETWEEN 20 AND 30", [2, 3]),
    ("/sym LIKE '^B'", [2, 4]),
    ("/tag IS NULL", [3, 4]),
    ("/tag IS NOT NULL", [1, 2]),
    ("/nested/k = 'y'", [3]),
]


class TestFilters:
    @pytest.mark.parametrize(("expression", "expected_ids"), FILTERS)
    def test_filter_selects_messages(self, shared_broker, connect, expression, expected_ids):
        """A content filter delivers exactly the matching messages."""
        t = topic()
        filtered, everything = Received(), Received()
        subscriber = connect(shared_broker.tcp_uri)
        subscriber.subscribe(filtered, t, expression)
        # Same connection: once the unfiltered subscription has everything, the filtered
        # one has had every frame meant for it.
        subscriber.subscribe(everything, t)
        publisher = connect(shared_broker.tcp_uri)
        for body in FILTER_DATA:
            publisher.publish(t, body)
        everything.wait_for(len(FILTER_DATA))
        assert [FILTER_DATA[i - 1] for i in expected_ids] == filtered.bodies


class TestFailureReasons:
    @pytest.mark.parametrize(
        ("topic_name", "expression", "exception"),
        [
            ("orders", "/a = ", AMPS.BadFilterException),
            ("orders", "/a = 1 garbage", AMPS.BadFilterException),
            ("orders[", None, AMPS.BadRegexTopicException),
        ],
    )
    def test_subscribe_refusal_raises_typed_exception(
        self, shared_broker, connect, topic_name, expression, exception
    ):
        """A refused subscribe raises the client's exception for the failure reason."""
        client = connect(shared_broker.tcp_uri)
        with pytest.raises(exception):
            client.subscribe(lambda _m: None, topic_name, expression)

    def test_unsupported_option(self, shared_broker, connect):
        """A subscribe option the broker lacks (pause) raises InvalidOptionsException."""
        client = connect(shared_broker.tcp_uri)
        with pytest.raises(AMPS.InvalidOptionsException):
            client.subscribe(lambda _m: None, "orders", None, "pause")

    def test_invalid_bookmark(self, shared_broker, connect):
        """A bookmark the broker cannot parse raises InvalidBookmarkException."""
        client = connect(shared_broker.tcp_uri)
        with pytest.raises(AMPS.InvalidBookmarkException):
            client.bookmark_subscribe(lambda _m: None, "orders", "not-a-bookmark")

    def test_duplicate_sub_id(self, shared_broker, connect):
        """Reusing a sub id without the replace option raises CommandException."""
        client = connect(shared_broker.tcp_uri)
        command = AMPS.Command("subscribe").set_topic("orders").set_sub_id("same-id")
        client.execute_async(command, lambda _m: None)
        again = AMPS.Command("subscribe").set_topic("orders").set_sub_id("same-id")
        with pytest.raises(AMPS.CommandException, match="subscription already exists"):
            client.execute_async(again, lambda _m: None)

    def test_sow_is_refused(self, shared_broker, connect):
        """An unsupported command (sow) is refused with a clear reason, not ignored."""
        client = connect(shared_broker.tcp_uri)
        with pytest.raises(AMPS.CommandException, match="not supported"):
            client.execute(AMPS.Command("sow").set_topic("orders"))


class TestAuthentication:
    @pytest.fixture
    def users(self) -> Users:
        return Users({"alice": hash_password("s3cret", iterations=1000)})

    def test_valid_password_logs_on(self, start_broker, users, connect):
        """A user from the users file logs on with the right password."""
        broker = start_broker(users=users)
        uri = broker.tcp_uri.replace("tcp://", "tcp://alice:s3cret@")
        assert connect(uri).get_server_version() == 5030400

    def test_wrong_password_is_refused(self, start_broker, users):
        """A wrong password raises AuthenticationException."""
        broker = start_broker(users=users)
        client = AMPS.Client("intruder")
        client.connect(broker.tcp_uri.replace("tcp://", "tcp://alice:wrong@"))
        try:
            with pytest.raises(AMPS.AuthenticationException):
                client.logon(5000)
        finally:
            client.close()
        assert broker.counter("auth_failures") == 1


class TestBookmarkReplay:
    def test_replay_from_epoch_then_live(self, shared_broker, connect):
        """A subscription from bookmark 0 gets the logged messages, then live ones."""
        t = topic()
        publisher = connect(shared_broker.tcp_uri)
        publisher.publish(t, '{"n":1}')
        publisher.publish(t, '{"n":2}')
        publisher.publish_flush(10_000)
        received = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(received, t, "0")
        received.wait_for(2)
        publisher.publish(t, '{"n":3}')
        assert received.wait_for(3) == ['{"n":1}', '{"n":2}', '{"n":3}']

    def test_replay_after_bookmark(self, shared_broker, connect):
        """A subscription from a bookmark resumes after that message."""
        t = topic()
        publisher = connect(shared_broker.tcp_uri)
        for n in range(1, 5):
            publisher.publish(t, f'{{"n":{n}}}')
        publisher.publish_flush(10_000)
        first = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(first, t, "0")
        first.wait_for(4)
        second = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(second, t, first.bookmarks[1])
        assert second.wait_for(2) == ['{"n":3}', '{"n":4}']

    def test_replay_filtered(self, shared_broker, connect):
        """Replay applies the subscription's filter."""
        t = topic()
        publisher = connect(shared_broker.tcp_uri)
        for n in range(1, 7):
            publisher.publish(t, f'{{"n":{n}}}')
        publisher.publish_flush(10_000)
        received = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(received, t, "0", "/n > 4")
        assert received.wait_for(2) == ['{"n":5}', '{"n":6}']

    def test_switch_to_live_under_load_has_no_gap_or_duplicate(self, shared_broker, connect):
        """A replay that starts while publishing goes on delivers every message exactly once."""
        t = topic()
        total = 10_000
        publisher = connect(shared_broker.tcp_uri)
        half_way = threading.Event()

        def publish_all() -> None:
            for n in range(total):
                publisher.publish(t, f'{{"n":{n}}}')
                if n == total // 3:
                    publisher.publish_flush(10_000)
                    half_way.set()

        thread = threading.Thread(target=publish_all)
        thread.start()
        try:
            half_way.wait(DEADLINE_S)
            received = Received()
            connect(shared_broker.tcp_uri).bookmark_subscribe(received, t, "0")
            bodies = received.wait_for(total)
        finally:
            thread.join(DEADLINE_S)
        assert [f'{{"n":{n}}}' for n in range(total)] == bodies

    def test_replay_from_timestamp(self, shared_broker, connect):
        """A timestamp bookmark replays the messages published at or after that instant."""
        t = topic()
        publisher = connect(shared_broker.tcp_uri)
        publisher.publish(t, '{"n":1}')
        publisher.publish_flush(10_000)
        since = datetime.now(UTC)
        publisher.publish(t, '{"n":2}')
        publisher.publish_flush(10_000)
        received = Received()
        stamp = since.strftime("%Y%m%dT%H%M%S.%fZ")
        connect(shared_broker.tcp_uri).bookmark_subscribe(received, t, stamp)
        received.wait_for(1)
        publisher.publish(t, '{"n":3}')
        assert received.wait_for(2) == ['{"n":2}', '{"n":3}']

    def test_replay_from_bookmark_list(self, shared_broker, connect):
        """A comma list of bookmarks resumes after the earliest of them, as AMPS does."""
        t = topic()
        alice, bob = connect(shared_broker.tcp_uri), connect(shared_broker.tcp_uri)
        for n in range(1, 4):
            alice.publish(t, f'{{"a":{n}}}')
            alice.publish_flush(10_000)
            bob.publish(t, f'{{"b":{n}}}')
            bob.publish_flush(10_000)
        everything = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(everything, t, "0")
        everything.wait_for(6)
        # a1 b1 a2 b2 a3 b3: a2 and b1 listed, so everything after b1 (a2 included).
        listed = f"{everything.bookmarks[2]},{everything.bookmarks[1]}"
        resumed = Received()
        connect(shared_broker.tcp_uri).bookmark_subscribe(resumed, t, listed)
        resumed.wait_for(4)
        alice.publish(t, '{"a":4}')
        expected = ['{"a":2}', '{"b":2}', '{"a":3}', '{"b":3}', '{"a":4}']
        assert resumed.wait_for(5) == expected


class TestBookmarkStore:
    def test_resubscribe_resumes_after_discarded(self, shared_broker, connect):
        """With the client's bookmark store, a resubscribe resumes after discarded messages."""
        t = topic()
        client = AMPS.Client(f"store{uuid.uuid4().hex[:8]}")
        store = AMPS.MemoryBookmarkStore()
        client.set_bookmark_store(store)
        client.connect(shared_broker.tcp_uri)
        try:
            client.logon()
            publisher = connect(shared_broker.tcp_uri)
            first = Received()

            def discard(message: AMPS.Message) -> None:
                first(message)
                store.discard_message(message)

            recent = AMPS.Client.Bookmarks.MOST_RECENT
            client.bookmark_subscribe(discard, t, recent, None, "resume")
            for n in range(1, 4):
                publisher.publish(t, f'{{"n":{n}}}')
            first.wait_for(3)
            client.unsubscribe("resume")
            for n in range(4, 6):
                publisher.publish(t, f'{{"n":{n}}}')
            publisher.publish_flush(10_000)
            second = Received()
            client.bookmark_subscribe(second, t, recent, None, "resume")
            assert second.wait_for(2) == ['{"n":4}', '{"n":5}']
        finally:
            client.close()

    def test_message_received_but_not_discarded_is_redelivered_with_two_publishers(
        self, shared_broker, connect
    ):
        """Publisher A's message discarded, B's only received: after the subscription's
        persisted ack, a resubscribe from the store still delivers B's message."""
        t = topic()
        client = AMPS.Client(f"store{uuid.uuid4().hex[:8]}")
        store = AMPS.MemoryBookmarkStore()
        client.set_bookmark_store(store)
        client.connect(shared_broker.tcp_uri)
        try:
            client.logon()
            alice, bob = connect(shared_broker.tcp_uri), connect(shared_broker.tcp_uri)
            first = Received()

            def discard_alice_only(message: AMPS.Message) -> None:
                first(message)
                if '"a"' in message.get_data():
                    store.discard_message(message)

            recent = AMPS.Client.Bookmarks.MOST_RECENT
            client.bookmark_subscribe(discard_alice_only, t, recent, None, "held")
            alice.publish(t, '{"a":1}')
            first.wait_for(1)
            bob.publish(t, '{"b":1}')
            first.wait_for(2)
            # The persisted ack has arrived once the store lists a second bookmark.
            wait_until(lambda: "," in store.get_most_recent("held"), "a persisted ack")
            client.unsubscribe("held")
            second = Received()
            client.bookmark_subscribe(second, t, recent, None, "held")
            assert second.wait_for(1) == ['{"b":1}']
        finally:
            client.close()


class TestRestart:
    def test_replay_after_kill9(self, broker_process: BrokerProcess, connect):
        """Messages acked before a kill -9 replay after the restart, from 0 and a bookmark."""
        publisher = connect(broker_process.tcp_uri)
        for n in range(1, 6):
            publisher.publish("orders", f'{{"n":{n}}}')
        publisher.publish_flush(10_000)
        before = Received()
        connect(broker_process.tcp_uri).bookmark_subscribe(before, "orders", "0")
        before.wait_for(5)
        broker_process.kill9()
        broker_process.start()
        from_epoch, from_bookmark = Received(), Received()
        subscriber = connect(broker_process.tcp_uri)
        subscriber.bookmark_subscribe(from_epoch, "orders", "0")
        subscriber.bookmark_subscribe(from_bookmark, "orders", before.bookmarks[2])
        assert before.bodies == from_epoch.wait_for(5)
        assert before.bodies[3:] == from_bookmark.wait_for(2)

    def test_sigterm_exits_cleanly(self, broker_process: BrokerProcess, connect):
        """SIGTERM stops the broker with exit status 0."""
        connect(broker_process.tcp_uri).publish("orders", "{}")
        assert broker_process.terminate() == 0

    def test_publish_store_replay_without_duplicates(self, broker_process: BrokerProcess, connect):
        """Publishes the broker never read are re-sent after a restart and logged once."""
        ha = AMPS.HAClient("ha-publisher")
        ha.set_publish_store(AMPS.MemoryPublishStore(1000))
        chooser = AMPS.DefaultServerChooser()
        chooser.add(broker_process.tcp_uri)
        ha.set_server_chooser(chooser)
        ha.set_reconnect_delay_strategy(AMPS.FixedDelayStrategy(100))
        ha.connect_and_logon()
        try:
            for n in range(1, 6):
                ha.publish("orders", f'{{"n":{n}}}')
            ha.publish_flush(10_000)
            broker_process.pause()
            for n in range(6, 11):
                ha.publish("orders", f'{{"n":{n}}}')
            broker_process.kill9()
            broker_process.start()
            received = Received()
            connect(broker_process.tcp_uri).bookmark_subscribe(received, "orders", "0")
            received.wait_for(10)
            ha.publish("orders", '{"n":11}')
            expected = [f'{{"n":{n}}}' for n in range(1, 12)]
            assert expected == received.wait_for(11)
        finally:
            ha.close()
