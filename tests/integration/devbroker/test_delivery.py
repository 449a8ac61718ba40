"""Delivery with the official Python client: bodies filters cannot evaluate, large
batches to a subscriber that reads, large replays, and a subscriber that does not read."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator

import AMPS
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.devbroker.conftest import RunningBroker, broker_config, wait_until
from tests.integration.devbroker.test_python_client import Received
from tests.strategies import Body, examples, hostile_bodies

DEEP = 100_000
"""Nesting depth of the body no JSON decoder in the broker can take."""


def topic() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def deep_body(depth: int = DEEP) -> str:
    return '{"a":' * depth + "1" + "}" * depth


class TestFilterCannotEvaluate:
    def test_live_delivery_goes_on_for_everyone(
        self, start_broker: Callable[..., RunningBroker], connect, caplog
    ) -> None:
        """A body nested 100,000 deep reaches unfiltered subscribers; a filtered one just
        does not match it, is counted and logged, and keeps receiving what follows."""
        broker = start_broker()
        t = topic()
        unfiltered, filtered = Received(), Received()
        connect(broker.tcp_uri).subscribe(unfiltered, t)
        connect(broker.tcp_uri).subscribe(filtered, t, "/n > 0")
        publisher = connect(broker.tcp_uri)
        with caplog.at_level(logging.WARNING, logger="ampsflow.devbroker.broker"):
            publisher.publish(t, deep_body())
            publisher.publish(t, '{"n":1}')
            publisher.publish_flush(10_000)
            assert unfiltered.wait_for(2)[1] == '{"n":1}'
            assert filtered.wait_for(1) == ['{"n":1}']
        assert broker.counter("filter_errors") == 1
        assert "cannot be evaluated" in caplog.text
        assert broker.counter("internal_errors") == 0

    def test_filtered_replay_passes_it_and_goes_live(
        self, start_broker: Callable[..., RunningBroker], connect
    ) -> None:
        """A filtered bookmark replay over that body carries on past it and turns live."""
        broker = start_broker()
        t = topic()
        publisher = connect(broker.tcp_uri)
        publisher.publish(t, '{"n":1}')
        publisher.publish(t, deep_body())
        publisher.publish(t, '{"n":2}')
        publisher.publish_flush(10_000)
        replayed = Received()
        connect(broker.tcp_uri).bookmark_subscribe(replayed, t, "0", "/n > 0")
        assert replayed.wait_for(2) == ['{"n":1}', '{"n":2}']
        publisher.publish(t, '{"n":3}')
        assert replayed.wait_for(3)[2] == '{"n":3}'
        assert broker.counter("filter_errors") == 1

    def test_each_filtered_subscription_counts_its_own_failure(
        self, start_broker: Callable[..., RunningBroker], connect
    ) -> None:
        """Two filtered subscriptions: each treats the body as no match on its own."""
        broker = start_broker()
        t = topic()
        first, second = Received(), Received()
        connect(broker.tcp_uri).subscribe(first, t, "/n = 1")
        connect(broker.tcp_uri).subscribe(second, t, "/n = 2")
        publisher = connect(broker.tcp_uri)
        publisher.publish(t, deep_body())
        publisher.publish(t, '{"n":2}')
        publisher.publish(t, '{"n":1}')
        publisher.publish_flush(10_000)
        assert (first.wait_for(1), second.wait_for(1)) == (['{"n":1}'], ['{"n":2}'])
        assert broker.counter("filter_errors") == 2


class TestHostileBodies:
    @settings(
        max_examples=examples(20),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=hostile_bodies("x1", big_bytes=256 * 1024))
    def test_every_body_reaches_unfiltered_and_no_body_stops_filtered(
        self, shared_broker: RunningBroker, body: Body
    ) -> None:
        """Whatever the body, an unfiltered subscriber gets it and the canary after it, and
        a filtered subscriber still gets the canary: nothing stuck, nothing lost."""
        t = topic()
        publisher = AMPS.Client(f"p{uuid.uuid4().hex[:8]}")
        subscriber = AMPS.Client(f"s{uuid.uuid4().hex[:8]}")
        try:
            for client in (publisher, subscriber):
                client.connect(shared_broker.tcp_uri)
                client.logon()
            everything, filtered = RawReceived(), RawReceived()
            subscriber.subscribe(everything, t)
            subscriber.subscribe(filtered, t, "/id = 'canary' OR /a > 0")
            publisher.publish(t, body.data)
            publisher.publish(t, '{"id":"canary"}')
            publisher.publish_flush(10_000)
            got = everything.wait_for(2)
            assert got == [body.data, b'{"id":"canary"}']
            assert filtered.wait_for(1)[-1] == b'{"id":"canary"}'
        finally:
            publisher.close()
            subscriber.close()


class RawReceived:
    """Message bodies as bytes, in order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, message: AMPS.Message) -> None:
        raw = message.get_data_raw()
        with self.lock:
            self.bodies.append(raw if isinstance(raw, bytes) else str(raw).encode())

    def wait_for(self, count: int) -> list[bytes]:
        wait_until(lambda: len(self.bodies) >= count, f"{count} messages")
        with self.lock:
            return list(self.bodies)


class Sizes:
    """Sizes of the message bodies a subscription got, and whether its client lost the
    connection (a plain client does not reconnect)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.disconnects = 0
        self.lock = threading.Lock()

    def __call__(self, message: AMPS.Message) -> None:
        with self.lock:
            self.sizes.append(len(message.get_data_raw()))

    def on_disconnect(self, _client: AMPS.Client) -> None:
        self.disconnects += 1

    def wait_for(self, count: int, timeout: float = 60.0) -> list[int]:
        wait_until(lambda: len(self.sizes) >= count or self.disconnects > 0, "messages", timeout)
        with self.lock:
            return list(self.sizes)


def subscriber(uri: str, sizes: Sizes) -> AMPS.Client:
    """A plain client (heartbeats every second, so the broker also queues heartbeats
    while large messages are on their way out)."""
    client = AMPS.Client(f"s{uuid.uuid4().hex[:8]}")
    client.set_disconnect_handler(sizes.on_disconnect)
    client.connect(uri)
    client.logon()
    client.set_heartbeat(1)
    return client


class TestLargeBatches:
    def test_reader_gets_a_batch_of_a_hundred_one_mib_messages(
        self, start_broker: Callable[..., RunningBroker], connect
    ) -> None:
        """100 x 1 MiB committed together (more than max_outbound_bytes at once) all reach a
        subscriber that reads; it is not taken for a slow consumer."""
        # The commit waits long enough for all 100 MiB to be in one batch.
        broker = start_broker(commit_delay_ms=2000)
        t = topic()
        sizes = Sizes()
        client = subscriber(broker.tcp_uri, sizes)
        try:
            client.subscribe(sizes, t)
            publisher = connect(broker.tcp_uri)
            body = b'{"pad":"' + b"x" * (1024 * 1024 - 10) + b'"}'
            for _ in range(100):
                publisher.publish(t, body)
            publisher.publish_flush(60_000)
            assert (sizes.wait_for(100), sizes.disconnects) == ([len(body)] * 100, 0)
            assert broker.counter("slow_consumers") == 0
        finally:
            client.close()

    def test_bookmark_replay_of_600_messages_of_200_kb_completes(
        self, start_broker: Callable[..., RunningBroker], connect
    ) -> None:
        """A replay of 120 MB from epoch is paced by the socket, not cut off."""
        broker = start_broker(max_outbound_bytes=16 * 1024 * 1024)
        t = topic()
        publisher = connect(broker.tcp_uri)
        body = b'{"pad":"' + b"y" * (200 * 1000 - 10) + b'"}'
        for _ in range(600):
            publisher.publish(t, body)
        publisher.publish_flush(60_000)
        sizes = Sizes()
        client = subscriber(broker.tcp_uri, sizes)
        try:
            client.bookmark_subscribe(sizes, t, "0")
            assert (sizes.wait_for(600), sizes.disconnects) == ([len(body)] * 600, 0)
            publisher.publish(t, '{"live":1}')
            assert sizes.wait_for(601)[-1] == len('{"live":1}')
            assert broker.counter("slow_consumers") == 0
        finally:
            client.close()


class TestFlowControlProperty:
    @settings(
        max_examples=examples(8),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        sizes=st.lists(st.integers(1, 1536 * 1024), min_size=1, max_size=40),
        from_log=st.booleans(),
    )
    def test_a_reader_gets_every_message_in_order(
        self, flow_broker: RunningBroker, sizes: list[int], from_log: bool
    ) -> None:
        """Whatever the mix of sizes (far above the flow-control threshold of 64 KiB
        here), live or replayed, a subscriber that reads gets every message, in order,
        and is never cut."""
        t = topic()
        cut_before = flow_broker.counter("slow_consumers")
        received = Sizes()
        client = subscriber(flow_broker.tcp_uri, received)
        publisher = AMPS.Client(f"p{uuid.uuid4().hex[:8]}")
        try:
            publisher.connect(flow_broker.tcp_uri)
            publisher.logon()
            bodies = [b'{"n":%d,"p":"%s"}' % (i, b"q" * size) for i, size in enumerate(sizes)]
            if not from_log:
                client.subscribe(received, t)
            for body in bodies:
                publisher.publish(t, body)
            publisher.publish_flush(60_000)
            if from_log:
                client.bookmark_subscribe(received, t, "0")
            got = received.wait_for(len(bodies))
            assert (got, received.disconnects) == ([len(b) for b in bodies], 0)
        finally:
            publisher.close()
            client.close()
        assert flow_broker.counter("slow_consumers") == cut_before


@pytest.fixture(scope="module")
def flow_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """One broker with a small ``max_outbound_bytes`` (flow control from 64 KiB queued)."""
    broker = RunningBroker(
        broker_config(tmp_path_factory.mktemp("flow"), max_outbound_bytes=256 * 1024)
    )
    broker.start()
    yield broker
    broker.stop()
