"""Bad input and load: each affects only the offending connection, with a counter.

A raw socket plays the misbehaving peer (a silent client, a garbage sender, a reader that
stops reading); whether the broker keeps serving everyone else is checked with the official
Python client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import uuid
from collections.abc import Iterator

import aiohttp
import AMPS
import pytest

from ampsflow.devbroker import broker as broker_module
from tests.integration.devbroker.conftest import DEADLINE_S, RunningBroker, wait_until


class RawClient:
    """A bare TCP peer speaking length-prefixed frames."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(DEADLINE_S)
        self.buffer = b""

    def send_raw(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def send(self, header: dict[str, object], body: bytes = b"") -> None:
        self.send_raw(json.dumps(header, separators=(",", ":")).encode() + body)

    def recv_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF."""
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) >= 4 + length:
                    payload = self.buffer[4 : 4 + length]
                    self.buffer = self.buffer[4 + length :]
                    return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk

    def recv_header(self) -> dict[str, object]:
        payload = self.recv_frame()
        assert payload is not None, "connection closed"
        header, _end = json.JSONDecoder().raw_decode(payload.decode())
        assert isinstance(header, dict)
        return header

    def logon(self, name: str) -> dict[str, object]:
        self.send({"c": "logon", "cid": "L", "client_name": name, "a": "processed"})
        return self.recv_header()

    def wait_closed(self) -> None:
        """Read until the broker closes the connection."""
        while self.recv_frame() is not None:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def official_roundtrip(broker: RunningBroker) -> str:
    """Publish and receive one message with the official client; return the body."""
    topic = f"ok{uuid.uuid4().hex[:8]}"
    got: list[str] = []
    client = AMPS.Client(f"ok{uuid.uuid4().hex[:8]}")
    client.connect(broker.tcp_uri)
    try:
        client.logon()
        client.subscribe(lambda m: got.append(m.get_data()), topic)
        client.publish(topic, '{"still":"serving"}')
        wait_until(lambda: bool(got), "the official client's message")
    finally:
        client.close()
    return got[0]


class TestHeartbeat:
    def test_silent_client_is_disconnected(self, start_broker, raw_clients):
        """A client that asked for 1 s heartbeats and then says nothing is disconnected."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("silent")
        raw.send({"c": "heartbeat", "o": "start,1"})
        raw.wait_closed()
        assert broker.counter("heartbeat_timeouts") == 1

    def test_heartbeating_official_client_stays_connected(self, start_broker):
        """The official client with heartbeats survives several heartbeat timeouts' worth."""
        broker = start_broker()
        client = AMPS.Client("beating")
        client.set_heartbeat(1)
        client.connect(broker.tcp_uri)
        client.logon()
        try:
            wait_until(lambda: broker.counter("frames_in") >= 6, "six frames of heartbeats")
            client.publish("hb", "{}")
            client.publish_flush(5000)
        finally:
            client.close()
        assert broker.counter("heartbeat_timeouts") == 0


class TestBadInput:
    def test_malformed_header_is_nacked(self, start_broker, raw_clients):
        """A header that is not JSON gets a failure ack and the connection stays usable."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("garbage")
        raw.send_raw(b'{"c":"subscribe","cid":"bad1","t":orders}')
        nack = raw.recv_header()
        raw.send({"c": "flush", "cid": "f1", "a": "processed"})
        flushed = raw.recv_header()
        assert (
            (nack["cid"], nack["status"]),
            (flushed["cid"], flushed["status"]),
        ) == (("bad1", "failure"), ("f1", "success"))
        assert broker.counter("malformed_frames") == 1

    def test_oversized_frame_closes_only_that_client(self, start_broker, raw_clients):
        """A frame above max_frame_bytes closes that connection; others keep working."""
        broker = start_broker(max_frame_bytes=1024)
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("big")
        raw.send({"c": "p", "t": "orders"}, b"x" * 2048)
        raw.wait_closed()
        assert (
            official_roundtrip(broker),
            broker.counter("oversized_frames"),
        ) == ('{"still":"serving"}', 1)

    def test_command_before_logon_is_refused(self, start_broker, raw_clients):
        """A subscribe before logon is nacked with 'logon required' and the connection closed."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.send({"c": "subscribe", "cid": "s1", "t": "orders", "a": "processed"})
        nack = raw.recv_header()
        raw.wait_closed()
        assert (nack["status"], nack["reason"]) == ("failure", "logon required")

    def test_logon_ack_has_s_before_last_key(self, start_broker, raw_clients):
        """The logon ack carries an unquoted s that is not the last key (the JS client's rule)."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.send({"c": "logon", "cid": "L", "client_name": "n", "a": "processed"})
        payload = raw.recv_frame()
        assert payload is not None
        assert b'"s":0,' in payload


class TestSlowConsumer:
    def test_subscriber_that_does_not_read_is_disconnected(self, start_broker, raw_clients, caplog):
        """A subscriber that reads nothing is cut off after slow_consumer_timeout_s without
        progress (counted, one WARNING line); publishing and other clients go on."""
        broker = start_broker(slow_consumer_timeout_s=1.0)
        stalled = RawClient(broker.broker.tcp_port, rcvbuf=4096)
        raw_clients.append(stalled)
        stalled.logon("stalled")
        stalled.send({"c": "subscribe", "cid": "s", "t": "flood", "a": "processed"})
        stalled.recv_header()
        publisher = RawClient(broker.broker.tcp_port)
        raw_clients.append(publisher)
        publisher.logon("flooder")
        body = b'{"pad":"' + b"x" * 100_000 + b'"}'
        with caplog.at_level(logging.WARNING, logger="ampsflow.devbroker.broker"):
            for _ in range(40):
                publisher.send({"c": "p", "t": "flood"}, body)
            publisher.send({"c": "flush", "cid": "f", "a": "processed"})
            assert publisher.recv_header()["status"] == "success"
            wait_until(lambda: broker.counter("slow_consumers") == 1, "the slow consumer cut")
        assert "none read for" in caplog.text
        assert "disconnecting slow consumer" in caplog.text
        with contextlib.suppress(ConnectionResetError):
            stalled.wait_closed()
        assert official_roundtrip(broker) == '{"still":"serving"}'

    def test_websocket_subscriber_that_does_not_read_is_disconnected(self, start_broker):
        """The same over WebSocket: the broker shuts the socket of a peer that reads nothing,
        although its writer is blocked sending to it."""
        broker = start_broker(slow_consumer_timeout_s=1.0)
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", broker.broker.websocket_port))
        stalled.settimeout(DEADLINE_S)
        try:
            stalled.sendall(
                b"GET /amps/json HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            response = b""
            while b"\r\n\r\n" not in response:
                response += stalled.recv(1)
            assert response.startswith(b"HTTP/1.1 101")
            stalled.sendall(_ws_frame(1, b"text"))
            for header in (
                {"c": "logon", "cid": "1", "client_name": "ws-stalled", "a": "processed"},
                {"c": "subscribe", "cid": "s", "sub_id": "s", "t": "wsflood", "a": "processed"},
            ):
                stalled.sendall(_ws_frame(2, struct.pack("<I", 1)))
                stalled.sendall(_ws_frame(1, json.dumps(header).encode()))
            wait_until(lambda: broker.counter("subscriptions") == 1, "the subscription")
            publisher = AMPS.Client(f"p{uuid.uuid4().hex[:8]}")
            publisher.connect(broker.tcp_uri)
            try:
                publisher.logon()
                body = '{"pad":"' + "w" * 100_000 + '"}'
                for _ in range(40):
                    publisher.publish("wsflood", body)
                publisher.publish_flush(10_000)
            finally:
                publisher.close()
            wait_until(lambda: broker.counter("slow_consumers") == 1, "the slow consumer cut")
            assert official_roundtrip(broker) == '{"still":"serving"}'
        finally:
            stalled.close()

    def test_slow_but_steady_reader_is_not_disconnected(self, start_broker, raw_clients):
        """A subscriber that reads a little at a time, slower than the publisher, gets every
        message: it is fed from the log as it reads, never cut as a slow consumer."""
        broker = start_broker(slow_consumer_timeout_s=2.0, max_outbound_bytes=256 * 1024)
        reader = RawClient(broker.broker.tcp_port, rcvbuf=4096)
        raw_clients.append(reader)
        reader.logon("steady")
        reader.send({"c": "subscribe", "cid": "s", "t": "steady", "a": "processed"})
        reader.recv_header()
        publisher = RawClient(broker.broker.tcp_port)
        raw_clients.append(publisher)
        publisher.logon("fast")
        body = b'{"pad":"' + b"z" * 20_000 + b'"}'
        for _ in range(200):
            publisher.send({"c": "p", "t": "steady"}, body)
        publisher.send({"c": "flush", "cid": "f", "a": "processed"})
        assert publisher.recv_header()["status"] == "success"
        got = 0
        while got < 200:
            frame = reader.recv_frame()
            assert frame is not None, "the reader was disconnected"
            got += 1
        assert broker.counter("slow_consumers") == 0


class TestPublishStoreDedupe:
    def test_replayed_sequence_is_acked_not_logged_again(self, start_broker, raw_clients):
        """A publish whose s was already logged is acknowledged but neither logged nor sent."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("store")
        for _ in range(2):
            raw.send({"c": "p", "t": "dedupe", "a": "persisted", "s": 42}, b'{"n":1}')
            ack = raw.recv_header()
            assert (ack["a"], ack["s"], ack["status"]) == ("persisted", 42, "success")
        relogon = RawClient(broker.broker.tcp_port)
        raw_clients.append(relogon)
        logon_ack = relogon.logon("store")
        assert (
            broker.counter("published"),
            broker.counter("duplicates"),
            logon_ack["s"],
            str(logon_ack["bm"]).split("|")[1],
        ) == (1, 1, 42, "42")


class TestSubscriptionPersistedAck:
    def test_bookmark_subscription_gets_persisted_ack(self, start_broker, raw_clients):
        """A bookmark subscription asking for persisted acks gets one naming sub_id and bm."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("bookmarked")
        raw.send(
            {"c": "subscribe", "cid": "c1", "sub_id": "s1", "t": "pa", "bm": "0",
             "a": "processed,persisted"}
        )  # fmt: skip
        assert raw.recv_header()["status"] == "success"
        raw.send({"c": "p", "t": "pa"}, b'{"n":1}')
        message = raw.recv_header()
        ack = raw.recv_header()
        assert {
            "c": "ack",
            "a": "persisted",
            "cid": "c1",
            "sub_id": "s1",
            "bm": message["bm"],
            "status": "success",
        } == ack


async def _websocket_exchange(
    url: str, frames: list[str | bytes], expect: int | None = None
) -> list[str]:
    """Send ``frames`` after the text preamble; return ``expect`` text frames (or all until
    the broker closes)."""
    received: list[str] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str("text")
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        while expect is None or len(received) < expect:
            message = await ws.receive(timeout=DEADLINE_S)
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            received.append(message.data)
    return received


def count_frame(n: int) -> bytes:
    return struct.pack("<I", n)


class TestWebSocketBadInput:
    def test_missing_count_frame_closes_connection(self, start_broker):
        """A header sent without its frame-count frame closes that WebSocket."""
        broker = start_broker()
        asyncio.run(_websocket_exchange(broker.ws_uri, ['{"c":"logon","cid":"1"}']))
        assert broker.counter("malformed_frames") == 1

    def test_bad_header_is_nacked_and_connection_kept(self, start_broker):
        """An unparseable header with a findable cid is nacked; later commands still work."""
        broker = start_broker()
        logon = '{"c":"logon","cid":"L","client_name":"ws-bad","a":"processed"}'
        flush = '{"c":"flush","cid":"F","a":"processed"}'
        frames: list[str | bytes] = [count_frame(1), logon, count_frame(1)]
        frames += ['{"c":"x","cid":"B",oops}', count_frame(1), flush]
        replies = asyncio.run(_websocket_exchange(broker.ws_uri, frames, expect=3))
        statuses = [(json.loads(r)["cid"], json.loads(r)["status"]) for r in replies]
        assert statuses == [("L", "success"), ("B", "failure"), ("F", "success")]


class TestRetention:
    def test_retention_bounds_the_log_and_replay_starts_at_oldest(self, start_broker, monkeypatch):
        """Old segments are deleted while serving; replay from 0 skips them, in order."""
        monkeypatch.setattr(broker_module, "RETENTION_INTERVAL_S", 0.2)
        broker = start_broker(segment_bytes=8 * 1024, retention_bytes=32 * 1024)
        client = AMPS.Client("retained")
        client.connect(broker.tcp_uri)
        try:
            client.logon()
            # Flushed rounds of ~15 KiB: segments roll at commit boundaries, so this makes
            # many segments whatever the commit batching.
            for n in range(1, 2001):
                client.publish("kept", f'{{"n":{n},"pad":"{"x" * 100}"}}')
                if n % 100 == 0:
                    client.publish_flush(10_000)
            wait_until(
                lambda: broker.call(lambda: broker.broker.log.first_position) > 1, "retention"
            )
            got: list[int] = []
            client.bookmark_subscribe(
                lambda m: got.append(json.loads(m.get_data())["n"]), "kept", "0"
            )
            wait_until(lambda: bool(got) and got[-1] == 2000, "the retained messages")
        finally:
            client.close()
        # A retention pass may still run during the replay (it then resumes at the new
        # oldest message), so only order, uniqueness and the end are certain here; gaps are
        # covered by the replay tests without retention.
        assert (True, True, 2000) == (got[0] > 1, got == sorted(set(got)), got[-1])


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client-to-server WebSocket frame (FIN set)."""
    mask = b"\x01\x02\x03\x04"
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
