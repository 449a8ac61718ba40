"""The devbroker's transports: TCP and WebSocket, bytes in and out of a :class:`Connection`.

- **TCP** (:class:`TcpConnection`, the official Python client): length-prefixed frames both
  ways; frames queued in one event-loop step leave in one write (in writes of
  :data:`WRITE_CHUNK` while more is queued); a client that lets more
  than ``max_outbound_bytes`` pile up is disconnected (slow consumer).
- **WebSocket** (:func:`serve_websocket` and :class:`WsConnection`, the JavaScript client on
  ``/amps/json``): a preamble, then per command a frame-count frame and the header and body
  frames; a writer task sends what the connection queues.

Each decodes frames (:mod:`ampsflow.devbroker.protocol`), enforces the size limits, and
hands ``(header, body)`` to :meth:`Connection.receive`; a header that cannot be parsed goes
to :func:`report_bad_frame`. What commands mean is the session's business
(:mod:`ampsflow.devbroker.session`). The transports know the broker only as
:class:`TransportBroker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections import deque
from typing import Protocol

from aiohttp import WSMsgType, web

from ampsflow.devbroker import protocol
from ampsflow.devbroker.session import MALFORMED, Connection, SessionBroker
from ampsflow.errors import (
    OversizedHeaderError,
    ProtocolError,
)

logger = logging.getLogger(__name__)

OUTBOUND_HIGH_WATER = 1024 * 1024
"""Flow control: a connection with more than this (or a quarter of ``max_outbound_bytes``
when that is less) queued gets no more live messages; its subscriptions fall behind and are
fed from the transaction log as its socket drains (see :meth:`Broker._fall_behind`)."""
WRITE_CHUNK = 64 * 1024
"""Bytes a TCP connection queues within one event-loop step before it writes them out
without waiting for the end of the step."""
_CID = re.compile(rb'"(?:cid|cmd_id)":"([^"\\]{1,200})"')


class TransportBroker(SessionBroker, Protocol):
    """What the transports need from the broker, besides what a session needs
    (:class:`~ampsflow.devbroker.broker.Broker` implements it)."""

    @property
    def flow_bytes(self) -> int:
        """Outbound bytes above which a connection is fed from the log (flow control)."""
        ...

    @property
    def congested(self) -> bool:
        """Whether publishers' reading should pause until the log catches up."""
        ...

    def admit(self, transport: str, peer: str) -> bool:
        """Whether a new connection may open."""
        ...

    def add_connection(self, conn: Connection) -> None:
        """Register a new client connection."""
        ...

    def remove_connection(self, conn: Connection, reason: str) -> None:
        """Forget a closed connection and its subscriptions."""
        ...

    def pause(self, conn: TcpConnection) -> None:
        """Remember a connection whose reading was paused because of congestion."""
        ...


def report_bad_frame(
    broker: TransportBroker, conn: Connection, raw: bytes, error: ProtocolError
) -> None:
    """Count and log an unparseable header; answer it when its ``cid`` can be found.

    A header over ``max_header_bytes`` also closes the connection. Only the start of
    the frame is searched and logged.
    """
    oversized = isinstance(error, OversizedHeaderError)
    if oversized:
        broker.counters.oversized_headers += 1
    else:
        broker.counters.malformed_frames += 1
    logger.warning("%r: malformed frame (%s): %s", conn, error, protocol.excerpt(raw))
    match = _CID.search(raw, 0, broker.config.max_header_bytes)
    if match is not None:
        # Through receive(), so the nack keeps its place behind a pending logon ack.
        cid = match.group(1).decode("utf-8", "replace")
        conn.receive({"c": MALFORMED, "cid": cid}, b"")
    if oversized:
        conn.close("oversized header")


async def serve_websocket(broker: TransportBroker, request: web.Request) -> web.StreamResponse:
    """Serve one WebSocket client on ``/amps/json`` until it or the broker closes."""
    peer = request.remote or "?"
    if not broker.admit("ws", peer):
        return web.Response(status=503, text="too many connections\n")
    ws = web.WebSocketResponse(max_msg_size=broker.config.max_frame_bytes)
    await ws.prepare(request)
    conn = WsConnection(broker, ws, peer)
    broker.add_connection(conn)
    reason = "client closed"
    try:
        first = await ws.receive()
        if first.type != WSMsgType.TEXT or first.data not in ("text", "binary"):
            reason = "no text/binary preamble"
            broker.counters.malformed_frames += 1
            logger.warning("%r: expected the 'text' preamble frame, got %s", conn, first.type)
            return ws
        while not conn.closed:
            msg = await ws.receive()
            if msg.type == WSMsgType.ERROR:
                reason = f"websocket error: {msg.data}"
                if "too big" in str(msg.data).lower():
                    broker.counters.oversized_frames += 1
                logger.warning("%r: %s", conn, reason)
                break
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            if msg.type != WSMsgType.BINARY or len(msg.data) != 4:
                reason = "expected a frame-count frame"
                broker.counters.malformed_frames += 1
                logger.warning("%r: %s, got %s; closing", conn, reason, msg.type)
                break
            (count,) = protocol.WS_COUNT.unpack(msg.data)
            if not 1 <= count <= 4096:
                reason = f"bad frame count {count}"
                broker.counters.malformed_frames += 1
                logger.warning("%r: %s; closing", conn, reason)
                break
            parts, problem = await _read_ws_command(broker, conn, ws, count)
            if problem:
                reason = problem
                break
            raw_header = parts[0]
            body = b"".join(parts[1:])
            if len(raw_header) > broker.config.max_header_bytes:
                error = OversizedHeaderError(
                    f"header of {len(raw_header)} bytes exceeds max_header_bytes "
                    f"{broker.config.max_header_bytes}"
                )
                report_bad_frame(broker, conn, raw_header, error)
                reason = "oversized header"
                break
            try:
                header = protocol.parse_header(raw_header)
            except ProtocolError as exc:
                report_bad_frame(broker, conn, raw_header, exc)
                continue
            while broker.congested and not conn.closed:
                await asyncio.sleep(0.01)
            conn.last_received = time.monotonic()
            conn.receive(header, body)
    finally:
        broker.remove_connection(conn, conn.close_reason or reason)
        await conn.finish()
    return ws


async def _read_ws_command(
    broker: TransportBroker, conn: WsConnection, ws: web.WebSocketResponse, count: int
) -> tuple[list[bytes], str]:
    """Read the ``count`` frames of one command; return them, or a reason to close.

    The size limit is enforced as frames arrive: ``max_frame_bytes`` for the whole
    command, ``max_header_bytes`` until the client has sent its logon.
    """
    limit = broker.config.max_frame_bytes if conn.logon_seen else broker.config.max_header_bytes
    parts: list[bytes] = []
    total = 0
    for _ in range(count):
        part = await ws.receive()
        if part.type == WSMsgType.TEXT:
            data = part.data.encode("utf-8")
        elif part.type == WSMsgType.BINARY:
            data = part.data
        else:
            if part.type == WSMsgType.ERROR and "too big" in str(part.data).lower():
                broker.counters.oversized_frames += 1
                logger.warning("%r: %s; closing", conn, part.data)
            return parts, f"connection ended inside a command ({part.type.name})"
        total += len(data)
        if total > limit:
            broker.counters.oversized_frames += 1
            name = "max_frame_bytes" if conn.logon_seen else "max_header_bytes before logon"
            logger.warning(
                "%r: command of more than %d bytes (%s) in %d of %d frames; closing",
                conn,
                limit,
                name,
                len(parts) + 1,
                count,
            )
            return parts, "oversized command"
        parts.append(data)
    return parts, ""


class TcpConnection(Connection, asyncio.Protocol):
    """A client on the TCP listener: length-prefixed frames both ways."""

    transport_name = "tcp"
    broker: TransportBroker

    def __init__(self, broker: TransportBroker) -> None:
        Connection.__init__(self, broker, "?")
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inbound = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._written = 0
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None
        self._max_frame = broker.config.max_frame_bytes
        self._max_header = broker.config.max_header_bytes
        # The hard bound, plus one message of any accepted size on its way out.
        self._max_out = broker.config.max_outbound_bytes + broker.config.max_frame_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the broker."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.broker.admit("tcp", self.peer):
            self.closed = True
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.broker.flow_bytes)
        self.broker.add_connection(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self.closed = True
        self.broker.remove_connection(self, self.close_reason or (str(exc) if exc else "EOF"))
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        """Split the stream into frames and hand each to :meth:`receive`."""
        self.last_received = time.monotonic()
        buf = self._inbound
        buf += data
        pos = 0
        size = len(buf)
        while size - pos >= 4 and not self.closed:
            (length,) = protocol.LENGTH.unpack_from(buf, pos)
            # Until its logon a client sends headers only: a frame must fit max_header_bytes.
            limit = self._max_frame if self.logon_seen else self._max_header
            if length > limit:
                self.counters.oversized_frames += 1
                logger.warning(
                    "%r: frame of %d bytes exceeds %s %d; closing",
                    self,
                    length,
                    "max_frame_bytes" if self.logon_seen else "max_header_bytes before logon",
                    limit,
                )
                self.close("oversized frame")
                return
            end = pos + 4 + length
            if end > size:
                break
            frame = bytes(buf[pos + 4 : end])
            pos = end
            try:
                raw_header, body = protocol.split_frame(frame, self._max_header)
                header = protocol.parse_header(raw_header)
            except ProtocolError as exc:
                report_bad_frame(self.broker, self, frame, exc)
                continue
            self.receive(header, body)
        if pos:
            del buf[:pos]
        if self.broker.congested and self._transport is not None and not self.closed:
            self._transport.pause_reading()
            self.broker.pause(self)

    def resume(self) -> None:
        """Resume reading after congestion."""
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()

    def send(self, header: bytes, body: bytes | None = None) -> None:
        """Queue a frame; frames queued in one event-loop step go out in one write, or in
        writes of :data:`WRITE_CHUNK` bytes while more is queued."""
        if self.closed:
            return
        data = protocol.frame(header, body) if body else protocol.frame(header)
        if self._out_bytes > self._max_out:
            self._over_limit(self._out_bytes)
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= WRITE_CHUNK:
            # Hand large runs (one commit fans out thousands of messages in one step) to
            # the socket now: what it cannot take at once is what outbound_bytes() reports,
            # so flow control sees a reader that falls behind, not the size of a batch.
            self._write_out()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        if not self._out or self._transport is None or self.closed:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_bytes = 0
        waiting = self._transport.get_write_buffer_size()
        if waiting > self._max_out:
            self._over_limit(waiting)
            return
        self._written += len(data)
        self._transport.write(data)

    def _over_limit(self, queued: int) -> None:
        """The hard memory bound: more than ``max_outbound_bytes`` was already waiting when
        more came (flow control keeps a client that reads far below it)."""
        self.counters.slow_consumers += 1
        logger.warning(
            "%r: %d bytes queued, more than max_outbound_bytes + max_frame_bytes (%d); "
            "disconnecting slow consumer",
            self,
            queued,
            self._max_out,
        )
        self.abort("slow consumer")

    def abort(self, reason: str) -> None:
        """Drop the connection at once, discarding what is queued."""
        self.closed = True
        self.close_reason = self.close_reason or reason
        self._out.clear()
        self._out_bytes = 0
        if self._transport is not None:
            self._transport.abort()
        self._wake_writers()

    def outbound_bytes(self) -> int:
        """Bytes queued here plus those in the transport's buffer."""
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._out_bytes + buffered

    def sent_bytes(self) -> int:
        """Bytes the kernel has taken from the transport so far."""
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._written - buffered

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark."""
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        """The transport's buffer drained."""
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        """Write what is queued and wait while the transport's buffer is full."""
        self._write_out()
        if self._writable is not None and not self.closed:
            await self._writable
        else:
            await asyncio.sleep(0)

    def close(self, reason: str) -> None:
        """Send what is queued, then close."""
        if self._transport is None or self._transport.is_closing():
            self.closed = True
            return
        self._write_out()
        self.closed = True
        self.close_reason = reason
        self._transport.close()


class WsConnection(Connection):
    """A JavaScript client on the WebSocket listener (header and body as separate frames)."""

    transport_name = "ws"
    broker: TransportBroker

    def __init__(self, broker: TransportBroker, ws: web.WebSocketResponse, peer: str) -> None:
        super().__init__(broker, peer)
        self._ws = ws
        self._queue: deque[tuple[str, bytes | None]] = deque()
        self._queued_bytes = 0
        self._sent = 0
        # The hard bound, plus one message of any accepted size on its way out.
        self._max_out = broker.config.max_outbound_bytes + broker.config.max_frame_bytes
        self._high_water = broker.flow_bytes
        self._wakeup = asyncio.Event()
        self._below_high_water = asyncio.Event()
        self._below_high_water.set()
        self._closing = False
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def send(self, header: bytes, body: bytes | None = None) -> None:
        """Queue a header text frame and, for a non-empty message body, a body frame."""
        if self.closed or self._closing:
            return
        if self._queued_bytes > self._max_out:
            # The hard memory bound (flow control keeps a client that reads far below it).
            self.counters.slow_consumers += 1
            logger.warning(
                "%r: %d bytes queued, more than max_outbound_bytes + max_frame_bytes (%d); "
                "disconnecting slow consumer",
                self,
                self._queued_bytes,
                self._max_out,
            )
            self.abort("slow consumer")
            return
        self._queue.append((header.decode("utf-8"), body or None))
        self._queued_bytes += len(header) + (len(body) if body else 0)
        if self._queued_bytes > self._high_water:
            self._below_high_water.clear()
        self._wakeup.set()

    async def _write_loop(self) -> None:
        ws = self._ws
        try:
            while not self.closed:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue and not self.closed:
                    header, body = self._queue.popleft()
                    await ws.send_str(header)
                    if body is not None:
                        try:
                            await ws.send_str(body.decode("utf-8"))
                        except UnicodeDecodeError:
                            await ws.send_bytes(body)
                    size = len(header) + (len(body) if body else 0)
                    self._queued_bytes -= size
                    self._sent += size
                    if self._queued_bytes <= self._high_water:
                        self._below_high_water.set()
                if self._closing and not self._queue:
                    break
        except (ConnectionError, RuntimeError) as exc:
            logger.debug("%r: write failed: %s", self, exc)
        finally:
            self.closed = True
            self._below_high_water.set()
            await ws.close()

    def outbound_bytes(self) -> int:
        """Bytes queued for the writer task."""
        return self._queued_bytes

    def sent_bytes(self) -> int:
        """Bytes the writer task has handed to the WebSocket so far."""
        return self._sent

    def abort(self, reason: str) -> None:
        """Drop the connection at once: discard what is queued and shut the socket down
        (the writer may be blocked on a peer that does not read)."""
        self._queue.clear()
        self._queued_bytes = 0
        self.close_reason = self.close_reason or reason
        self.closed = True
        self._wakeup.set()
        self._below_high_water.set()
        sock = self._ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def drain(self) -> None:
        """Wait while more than the high-water mark is queued."""
        await self._below_high_water.wait()
        await asyncio.sleep(0)

    def close(self, reason: str) -> None:
        """Send what is queued, then close the WebSocket."""
        if self._closing or self.closed:
            return
        self._closing = True
        self.close_reason = reason
        self._wakeup.set()

    async def finish(self) -> None:
        """Called when the reader ends: let the writer send what is queued, then close."""
        self._closing = True
        self._wakeup.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._writer, timeout=5)
        self.closed = True
