"""Conformance of the devbroker with the official AMPS JavaScript client over WebSocket.

Runs ``tests/js/client.js`` under Node (``npm ci`` in ``tests/js`` installs the pinned
``amps`` package); each scenario prints one JSON line with what the client saw.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import AMPS
import pytest

from ampsflow.config import DevbrokerQueueConfig
from ampsflow.devbroker.auth import Users, hash_password
from ampsflow.devbroker.queues import RECORD_TOPIC, decode_record
from ampsflow.devbroker.txlog import ReplayCursor
from tests.integration.devbroker.conftest import RunningBroker, wait_until

JS_DIR = Path(__file__).resolve().parents[2] / "js"


def run_js(scenario: str, *args: str) -> dict[str, Any]:
    """Run one scenario of the JS driver and return its JSON result."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "amps").is_dir():
        pytest.fail("Node and `npm ci` in tests/js are needed for the JavaScript conformance tests")
    done = subprocess.run(
        [node, str(JS_DIR / "client.js"), scenario, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output from client.js (exit {done.returncode}): {done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def topic() -> str:
    return f"js{uuid.uuid4().hex[:12]}"


@pytest.fixture
def python_client(shared_broker: RunningBroker):
    client = AMPS.Client(f"py{uuid.uuid4().hex[:8]}")
    client.connect(shared_broker.tcp_uri)
    client.logon()
    yield client
    client.close()


class TestJavaScriptClient:
    def test_roundtrip_with_python_carries_correlation_ids(self, shared_broker, python_client):
        """JS publishes to a Python subscriber, which answers; both see the other's x."""
        to_python, to_js = topic(), topic()
        seen: list[tuple[str, str]] = []

        def echo(message: AMPS.Message) -> None:
            seen.append((message.get_data(), message.get_correlation_id()))
            reply = json.loads(message.get_data())
            reply["echoed"] = True
            command = AMPS.Command("publish").set_topic(to_js).set_data(json.dumps(reply))
            python_client.execute_async(command.set_correlation_id("cHktcmVwbHk="), None)

        python_client.subscribe(echo, to_python)
        result = run_js(
            "roundtrip", shared_broker.ws_uri, to_js, "/echoed = 'true' OR /echoed = 1",
            to_python, "anMtY29ycg==", '{"id":7}',
        )  # fmt: skip
        assert seen == [('{"id":7}', "anMtY29ycg==")]
        [message] = result["received"]
        assert (
            message["data"],
            message["correlationId"],
        ) == ({"id": 7, "echoed": True}, "cHktcmVwbHk=")

    def test_publish_flush_persisted_then_replay(self, shared_broker):
        """JS publishes with flush('persisted'); a JS bookmark subscription replays them."""
        t = topic()
        assert run_js("publish", shared_broker.ws_uri, t, "3") == {"published": 3}
        result = run_js("replay", shared_broker.ws_uri, t, "0", "3")
        assert [m["data"] for m in result["received"]] == [{"n": 1}, {"n": 2}, {"n": 3}]

    def test_publish_store_is_emptied_by_persisted_acks(self, shared_broker):
        """A JS publish store is emptied by the broker's persisted acks, and the log has all."""
        t = topic()
        assert run_js("stored", shared_broker.ws_uri, t, "5") == {"unpersisted": 0}
        result = run_js("replay", shared_broker.ws_uri, t, "0", "5")
        assert [{"n": n} for n in range(1, 6)] == [m["data"] for m in result["received"]]

    def test_python_publisher_reaches_js_replay(self, shared_broker, python_client):
        """Messages from the Python client replay to the JS client with their bookmarks."""
        t = topic()
        python_client.publish(t, '{"from":"python"}')
        python_client.publish_flush(10_000)
        result = run_js("replay", shared_broker.ws_uri, t, "0", "1")
        [message] = result["received"]
        assert ({"from": "python"}, t) == (message["data"], message["topic"])

    def test_replay_larger_than_max_outbound_bytes_reaches_js(self, start_broker, connect_any):
        """A WebSocket replay of 6 MB to a client with max_outbound_bytes 1 MiB is paced by
        the socket (flow control), not cut as a slow consumer."""
        broker = start_broker(max_outbound_bytes=1024 * 1024)
        t = topic()
        publisher = connect_any(broker.tcp_uri)
        for n in range(30):
            publisher.publish(t, json.dumps({"n": n, "pad": "j" * 200_000}))
        publisher.publish_flush(10_000)
        result = run_js("replaysizes", broker.ws_uri, t, "0", "30")
        assert list(range(30)) == [m["n"] for m in result["received"]]
        assert all(m["size"] > 200_000 for m in result["received"])
        assert broker.counter("slow_consumers") == 0

    @pytest.mark.parametrize(
        ("topic_name", "expression", "reason"),
        [
            ("orders", "/a = ", "bad filter"),
            ("orders[", "", "bad regex topic"),
        ],
    )
    def test_refusal_reason_reaches_js(self, shared_broker, topic_name, expression, reason):
        """A refused JS subscribe rejects with the broker's failure reason."""
        assert {"refused": reason} == run_js("refuse", shared_broker.ws_uri, topic_name, expression)

    def test_invalid_bookmark_reaches_js(self, shared_broker):
        """A JS bookmark subscribe with an unparseable bookmark is refused."""
        result = run_js("replay", shared_broker.ws_uri, "orders", "garbage", "1")
        assert result == {"error": "invalid bookmark"}

    def test_js_connection_is_forgotten_after_disconnect(self, shared_broker):
        """After the JS client disconnects, the broker has closed its connection."""
        before = shared_broker.counter("connections_closed")
        run_js("publish", shared_broker.ws_uri, topic(), "1")
        wait_until(
            lambda: shared_broker.counter("connections_closed") > before,
            "the broker to close the JS connection",
        )


class TestJavaScriptAuthentication:
    @pytest.fixture
    def broker(self, start_broker):
        return start_broker(users=Users({"alice": hash_password("s3cret", iterations=1000)}))

    def test_valid_password_logs_on(self, broker):
        """The JS client logs on with the user and password from its URI."""
        uri = broker.ws_uri.replace("ws://", "ws://alice:s3cret@")
        assert run_js("logon", uri) == {"version": "5.3.4.0"}

    def test_wrong_password_is_refused(self, broker):
        """A wrong password rejects the JS client's connect with 'auth failure'."""
        uri = broker.ws_uri.replace("ws://", "ws://alice:wrong@")
        assert run_js("logon", uri) == {"error": "auth failure"}


class TestJavaScriptQueue:
    def test_queue_subscribe_and_batched_acks(self, start_broker):
        """The JS client sees queue messages (lp set), acknowledges them with client.ack()
        in batches of 3 as sow_delete bm lists, and the queue ends empty."""
        broker = start_broker(
            queues=(DevbrokerQueueConfig(name="js-queue", underlying_topic="js-work"),)
        )
        publisher = AMPS.Client("py-queue-publisher")
        publisher.connect(broker.tcp_uri)
        publisher.logon()
        for n in range(6):
            publisher.publish("js-work", json.dumps({"n": n}))
        publisher.publish_flush(5000)
        publisher.close()
        result = run_js("queue", broker.ws_uri, "js-queue", "6", "6", "3")
        assert [{"n": n} for n in range(6)] == [m["data"] for m in result["received"]]
        assert {"60000ms"} == {m["leasePeriod"] for m in result["received"]}
        queue = broker.broker.queues.queues["js-queue"]
        wait_until(lambda: broker.call(lambda: queue.depth) == 0, "every message acknowledged")

        def acked() -> list[list[str]]:
            log = broker.broker.log
            entries, _ = log.read(ReplayCursor(position=1), up_to=log.durable_position, limit=100)
            return [decode_record(e.body)[2] for e in entries if e.topic == RECORD_TOPIC]  # type: ignore[index]

        wait_until(lambda: sum(map(len, broker.call(acked))) == 6, "the ack records")
        assert [3, 3] == [len(batch) for batch in broker.call(acked)]


@pytest.fixture
def connect_any():
    """Official Python clients on any broker; all closed at teardown."""
    clients: list[AMPS.Client] = []

    def make(uri: str) -> AMPS.Client:
        client = AMPS.Client(f"py{uuid.uuid4().hex[:8]}")
        clients.append(client)
        client.connect(uri)
        client.logon()
        return client

    yield make
    for client in clients:
        client.close()
