"""The TCP transport's outbound accounting: what flow control sees is what the socket has
not taken, not how much one event-loop step queued."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from ampsflow.config import DevbrokerConfig
from ampsflow.devbroker import protocol
from ampsflow.devbroker.counters import Counters
from ampsflow.devbroker.transports import WRITE_CHUNK, TcpConnection


class FakeTransport(asyncio.Transport):
    """A socket that takes at most ``accept`` bytes; the rest stays in its buffer."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept
        self.sent = bytearray()
        self.buffered = bytearray()

    def write(self, data: Any) -> None:
        taken = max(0, min(len(data), self.accept - len(self.sent)))
        self.sent += data[:taken]
        self.buffered += data[taken:]

    def get_write_buffer_size(self) -> int:
        return len(self.buffered)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def broker() -> Any:
    return SimpleNamespace(
        config=DevbrokerConfig(),
        counters=Counters(),
        flow_bytes=1024 * 1024,
        admit=lambda _transport, _peer: True,
        add_connection=lambda _conn: None,
    )


def burst(transport: FakeTransport, frames: int) -> tuple[TcpConnection, list[int], bytes]:
    """Queue ``frames`` deliveries in one event-loop step (as one commit's fan-out does),
    recording what flow control sees before each one."""
    seen: list[int] = []
    expected = bytearray()

    async def run() -> TcpConnection:
        conn = TcpConnection(broker())
        conn.connection_made(transport)
        tail = protocol.delivery_tail("internal", "1|1|", None)
        for i in range(frames):
            seen.append(conn.outbound_bytes())
            body = b'{"i":%d,"pad":"%s"}' % (i, b"x" * 400)
            conn.deliver(b"s1", tail, body)
            expected.extend(protocol.frame(protocol.delivery_header(b"s1", tail), body))
        await asyncio.sleep(0)
        return conn

    return asyncio.run(run()), seen, bytes(expected)


def test_a_socket_that_keeps_up_never_looks_behind() -> None:
    """Thousands of messages (megabytes) queued in one step to a socket that takes
    everything: outbound bytes stay below one write chunk plus a message, far below the
    flow-control threshold, and every byte leaves in order."""
    transport = FakeTransport(accept=1 << 40)
    conn, seen, expected = burst(transport, 5000)
    assert len(expected) > 2 * 1024 * 1024
    assert max(seen) < WRITE_CHUNK + 1024
    assert bytes(transport.sent) == expected
    assert conn.outbound_bytes() == 0


def test_a_socket_that_does_not_take_the_bytes_is_seen_behind() -> None:
    """What the socket did not take counts: flow control still sees a reader that lags."""
    transport = FakeTransport(accept=256 * 1024)
    conn, seen, expected = burst(transport, 5000)
    assert max(seen) > 1024 * 1024
    assert bytes(transport.sent + transport.buffered) == expected
    assert conn.outbound_bytes() == len(expected) - 256 * 1024
