"""The AMPS adapter against a devbroker subprocess: resume points, publish store, reconnects."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ampsflow.adapters.amps import AmpsClient
from ampsflow.config import AmpsConfig
from ampsflow.messaging import Received
from tests.support.processes import Devbroker, Processes, wait_for

pytestmark = pytest.mark.slow

ClientFactory = Callable[..., AmpsClient]


@pytest.fixture
def broker(processes: Processes) -> Devbroker:
    return processes.devbroker()


@pytest.fixture
def make_client(broker: Devbroker, tmp_path: Path) -> Iterator[ClientFactory]:
    clients: list[AmpsClient] = []

    def make(name: str = "adapter", *, publish_store: bool = True) -> AmpsClient:
        config = AmpsConfig(
            uri=broker.uri, client_name=name, heartbeat_s=1, reconnect_max_delay_s=0.5
        )
        client = AmpsClient(
            config,
            service="test",
            state_dir=tmp_path / name,
            stop=threading.Event(),
            publish_store=publish_store,
        )
        clients.append(client)
        client.connect()
        return client

    yield make
    for client in clients:
        client.close()


def receive_all(client: AmpsClient, count: int) -> list[Received]:
    got: list[Received] = []

    def more() -> bool:
        message = client.receive(0.1)
        if message is not None:
            got.append(message)
        return len(got) >= count

    wait_for(more, timeout_s=30, what=f"{count} messages")
    return got


def bodies(messages: list[Received]) -> list[bytes]:
    return [m.body for m in messages]


class TestResume:
    def test_restart_resumes_after_the_last_discarded(self, make_client: ClientFactory) -> None:
        """A new client with the same stores gets exactly the messages not discarded."""
        first = make_client("c1")
        first.subscribe("t")
        for i in range(4):
            first.publish("t", f'{{"i":{i}}}', None)
        assert first.flush(10)
        got = receive_all(first, 4)
        first.discard(got[0])
        first.discard(got[2])
        first.close()
        second = make_client("c1")
        second.subscribe("t")
        again = receive_all(second, 2)
        assert [b'{"i":1}', b'{"i":3}'] == bodies(again)

    def test_correlation_id_and_bookmark_arrive(self, make_client: ClientFactory) -> None:
        """A received message carries the publisher's CorrelationId, topic and a bookmark."""
        client = make_client()
        client.subscribe("t")
        client.publish("t", b"{}", "00" + "ab" * 24 + "01")
        (message,) = receive_all(client, 1)
        assert ("00" + "ab" * 24 + "01", "t", True) == (
            message.correlation_id,
            message.topic,
            message.bookmark.count("|") >= 2,
        )


class TestPublishStore:
    def test_unacked_publishes_survive_a_restart(
        self, make_client: ClientFactory, broker: Devbroker
    ) -> None:
        """Publishes stored while the broker is down are sent by the next run of the client."""
        writer = make_client("writer")
        broker.kill()
        for i in range(5):
            writer.publish("p", f'{{"i":{i}}}', None)
        stored = writer.unpersisted()
        writer.close()
        broker.restart()
        again = make_client("writer")
        assert again.flush(30)
        reader = make_client("reader", publish_store=False)
        reader.subscribe("p")
        got = receive_all(reader, 5)
        assert (5, [f'{{"i":{i}}}'.encode() for i in range(5)], None) == (
            stored,
            bodies(got),
            reader.receive(0.5),
        )


class TestReconnect:
    def test_broker_restart_loses_and_duplicates_nothing(
        self, make_client: ClientFactory, broker: Devbroker
    ) -> None:
        """Across a broker kill -9 and restart, a subscriber gets every message exactly once."""
        client = make_client("both")
        client.subscribe("r")
        for i in range(50):
            client.publish("r", f'{{"i":{i}}}', None)
        first = receive_all(client, 50)
        for message in first:
            client.discard(message)
        broker.kill()
        broker.restart()
        for i in range(50, 100):
            client.publish("r", f'{{"i":{i}}}', None)
        assert client.flush(30)
        rest = receive_all(client, 50)
        # At least one reconnect: on a loaded machine an attempt can fail (the broker
        # still starting) and the client tries again, which is just as correct.
        assert ([f'{{"i":{i}}}'.encode() for i in range(100)], None, True) == (
            bodies(first + rest),
            client.receive(0.5),
            client.reconnects >= 1,
        )
