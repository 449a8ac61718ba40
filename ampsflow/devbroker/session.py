"""One client connection of the devbroker: command handling, acks, subscriptions.

A :class:`Connection` is transport-agnostic: the TCP and WebSocket adapters in
:mod:`ampsflow.devbroker.transports` feed it decoded ``(header, body)`` pairs through
:meth:`Connection.receive` and implement :meth:`Connection.send` / :meth:`Connection.close`.
Everything that touches the transaction log or other connections goes through the
:class:`SessionBroker` interface, which :class:`~ampsflow.devbroker.broker.Broker`
implements.

Commands are handled in arrival order; a logon (which may verify a password off the event
loop and waits for the client name's last sequence to be durable) holds back the frames
that follow it until it is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ampsflow.config import DevbrokerConfig
from ampsflow.devbroker import protocol
from ampsflow.devbroker.auth import Users
from ampsflow.devbroker.bookmarks import ReplaySpec, parse_bookmark, publisher_id
from ampsflow.devbroker.counters import Counters
from ampsflow.devbroker.filters import (
    FilterLimits,
    compile_filter,
    compile_topic,
    is_regex_topic,
)
from ampsflow.errors import BookmarkError, FilterError, ProtocolError, TopicError

logger = logging.getLogger(__name__)

Header = protocol.Header

UNSUPPORTED = {
    "sow": "sow queries are not supported by the devbroker (it has no state of the world)",
    "sow_and_subscribe": "sow_and_subscribe is not supported by the devbroker (no state of "
    "the world); use subscribe with a bookmark",
    "sow_and_delta_subscribe": "sow_and_delta_subscribe is not supported by the devbroker (no "
    "state of the world); use subscribe with a bookmark",
    "sow_delete": "sow_delete is not supported by the devbroker (no state of the world)",
    "start_timer": "start_timer is not supported by the devbroker",
    "stop_timer": "stop_timer is not supported by the devbroker",
}
"""Commands the devbroker refuses, with the failure reason it answers."""

UNSUPPORTED_OPTIONS = frozenset({"pause", "resume", "conflation", "conflation_key", "projection"})
"""Subscribe options that would change what is delivered and that the devbroker lacks."""

QUEUE_ACK_CID = "AMPS-queue-ack"
"""The Python client acknowledges every bookmarked message with a ``sow_delete`` under
this command id (queue semantics); without queues there is nothing to do."""

_IMMEDIATE_ACKS = ("received", "parsed")
MALFORMED = "\x00malformed"
"""Command name the transports give a frame whose header could not be parsed but whose
``cid`` could be found: it is answered with a failure ack in its turn."""
MAX_BACKLOG = 100_000
"""Frames a client may send before its logon is answered (their bodies may add up to
``max_frame_bytes`` at most)."""
MAX_CLIENT_NAME = 1024
"""Longest client name a logon may carry, in characters."""


def _is_utf8_text(text: str) -> bool:
    """False for a string with lone surrogates (JSON ``"\\ud800"``): it has no UTF-8 form."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def logon_problem(header: Header) -> tuple[str, str] | None:
    """Return ``(failure reason, detail)`` when a logon's fields cannot be used, else None.

    The client name is written to the transaction log, into bookmarks and into log lines:
    it must be text that has a UTF-8 form (a JSON ``"\\ud800"`` escape does not), without
    control characters, at most :data:`MAX_CLIENT_NAME` characters long.
    """
    name = header.get("client_name", "")
    if isinstance(name, str):
        if len(name) > MAX_CLIENT_NAME:
            return "invalid client name", f"client name longer than {MAX_CLIENT_NAME} characters"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "invalid client name", f"client name {protocol.excerpt(name)} is not UTF-8 text"
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
            return (
                "invalid client name",
                f"client name {protocol.excerpt(name)} has control characters",
            )
    return None


@dataclass(slots=True, eq=False)
class Subscription:
    """One subscription of one connection."""

    conn: Connection
    sub_id: str
    cid: str
    topic: str
    matches_topic: Callable[[str], bool]
    matches_body: Callable[[object], bool] | None
    is_regex: bool
    with_timestamp: bool = False
    live: bool = True
    wants_persisted: bool = False
    wants_completed: bool = False
    last_bookmark: str = ""
    """The last message a queue delivered to it (bookmark subscriptions do not use it)."""
    acked_bookmark: str = ""
    command: Header = field(default_factory=dict)
    sid: bytes = b""

    def __post_init__(self) -> None:
        self.sid = protocol.sid_literal(self.sub_id)


class SessionQueues(Protocol):
    """The broker's message queues as a connection uses them
    (:class:`~ampsflow.devbroker.queueing.QueueService` implements it)."""

    def is_queue(self, topic: object) -> bool:
        """Whether ``topic`` names a queue."""
        ...

    def subscribe(self, conn: Connection, header: Header, sub_id: str) -> None:
        """Place a queue subscription and answer the command."""
        ...

    def sow_delete(self, conn: Connection, header: Header) -> None:
        """Handle a queue ack (``sow_delete`` by bookmark) and answer the command."""
        ...


class SessionBroker(Protocol):
    """What a :class:`Connection` needs from the broker (:class:`~ampsflow.devbroker.broker.Broker`
    implements it); the connection knows the broker only through this."""

    counters: Counters
    users: Users | None
    config: DevbrokerConfig

    @property
    def queues(self) -> SessionQueues:
        """The broker's message queues."""
        ...

    @property
    def appended_position(self) -> int:
        """The log position of the last entry appended (durable or not)."""
        ...

    def persisted_seq(self, client_name: str) -> int:
        """The highest publish-store sequence of ``client_name`` that is durable."""
        ...

    def appended_seq(self, client_name: str) -> int:
        """The highest publish-store sequence of ``client_name`` appended (durable or not)."""
        ...

    @property
    def delivered_position(self) -> int:
        """The log position the fan-out has reached."""
        ...

    @property
    def persisted_bookmark(self) -> str:
        """Bookmark of the log entry at :attr:`delivered_position` ("" while there is none)."""
        ...

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` alive until it ends (cancelled when the broker stops)."""
        ...

    def publish(
        self, conn: Connection, topic: str, correlation_id: str | None, body: bytes, seq: int | None
    ) -> None:
        """Append a publish to the log; it is delivered after the next commit."""
        ...

    def wants_persisted_ack(self, conn: Connection) -> None:
        """``conn`` has publish-store sequences to acknowledge after a commit."""
        ...

    def after_durable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything appended so far is committed and delivered."""
        ...

    async def wait_durable(self) -> None:
        """Wait until everything appended so far is committed and delivered."""
        ...

    def add_subscription(self, sub: Subscription, spec: ReplaySpec | None) -> None:
        """Start delivering to ``sub``: live at once, or after replaying from ``spec``."""
        ...

    def remove_subscription(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        ...

    async def check_password(self, conn: Connection, user: str, password: str) -> bool:
        """Verify a logon's password off the event loop (False if ``conn`` closed first)."""
        ...


class Connection:
    """The broker side of one client connection (see the module docstring)."""

    transport_name = "?"

    def __init__(self, broker: SessionBroker, peer: str) -> None:
        self.broker = broker
        self.counters = broker.counters
        self.peer = peer
        self.client_name = ""
        self.logged_on = False
        self.closed = False
        self.subs: dict[str, Subscription] = {}
        self.heartbeat_s: float | None = None
        self.next_heartbeat = 0.0
        self.last_received = time.monotonic()
        self.pending_persisted: deque[tuple[int, int]] = deque()
        self.close_reason = ""
        self._backlog: list[tuple[Header, bytes]] | None = None
        self._backlog_bytes = 0
        self._logon_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ transport side

    def send(self, header: bytes, body: bytes | None = None) -> None:
        """Queue one frame: ``body`` is ``None`` for frames without one (acks, heartbeats)."""
        raise NotImplementedError

    def close(self, reason: str) -> None:
        """Close the connection; ``reason`` goes to the log."""
        raise NotImplementedError

    def outbound_bytes(self) -> int:
        """Bytes queued for this client and not yet written to the socket."""
        raise NotImplementedError

    def sent_bytes(self) -> int:
        """Bytes written to the socket so far (slow-consumer detection watches it grow)."""
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """Drop the connection at once, discarding what is queued; ``reason`` goes to the log."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Wait until the outbound queue is below its high-water mark."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Release transport resources once the connection has ended (default: nothing)."""

    def deliver(self, sids: bytes, tail: bytes, body: bytes) -> None:
        """Send a message to this connection's subscriptions ``sids`` (escaped, see
        :func:`~ampsflow.devbroker.protocol.sid_literal`)."""
        self.send(protocol.delivery_header(sids, tail, empty_body=not body), body)

    def __repr__(self) -> str:
        return f"<{self.transport_name} {self.peer} {self.client_name or '-'}>"

    @property
    def logon_seen(self) -> bool:
        """True once a logon has arrived (answered or pending): larger frames are allowed."""
        return self.logged_on or self._backlog is not None

    def start_logon_timer(self) -> None:
        """Close the connection if it is not logged on within ``logon_timeout_s``."""
        timeout = self.broker.config.logon_timeout_s
        self._logon_timer = asyncio.get_running_loop().call_later(timeout, self._logon_timed_out)

    def cancel_logon_timer(self) -> None:
        """Forget the logon deadline (logged on, or the connection ended)."""
        if self._logon_timer is not None:
            self._logon_timer.cancel()
            self._logon_timer = None

    def _logon_timed_out(self) -> None:
        self._logon_timer = None
        if self.logged_on or self.closed:
            return
        self.counters.logon_timeouts += 1
        logger.warning(
            "%r: not logged on %g s after connecting; closing",
            self,
            self.broker.config.logon_timeout_s,
        )
        self.close("logon timeout")

    # ------------------------------------------------------------------ receiving

    def receive(self, header: Header, body: bytes) -> None:
        """Handle one client command (frames after a pending logon wait for it).

        The transport updates :attr:`last_received`.
        """
        self.counters.frames_in += 1
        if self._backlog is not None:
            self._backlog_bytes += len(body)
            if (
                len(self._backlog) >= MAX_BACKLOG
                or self._backlog_bytes > self.broker.config.max_frame_bytes
            ):
                logger.warning(
                    "%r: more than %d frames or %d bytes before the logon ack; closing",
                    self,
                    MAX_BACKLOG,
                    self.broker.config.max_frame_bytes,
                )
                self.close("flooding before logon")
                return
            self._backlog.append((header, body))
            return
        self._handle(header, body)

    def _handle(self, header: Header, body: bytes) -> None:
        try:
            self._dispatch(header, body)
        except ProtocolError as exc:
            self.counters.malformed_frames += 1
            logger.warning(
                "%r: bad %s command: %s", self, protocol.excerpt(header.get("c", "?")), exc
            )
            self.nack(header, "invalid header")
        except Exception:
            # One command's failure must not take the connection or the broker down.
            self.counters.internal_errors += 1
            logger.exception("%r: %s command failed", self, protocol.excerpt(header.get("c", "?")))
            self.nack(header, "internal error")

    def _dispatch(self, header: Header, body: bytes) -> None:
        c = header.get("c")
        if c in {"p", "publish"} and self.logged_on:
            self._publish(header, body)
            return
        cmd = protocol.command_name(header)
        if cmd == "publish" and self.logged_on:
            self._publish(header, body)
        elif cmd == "logon":
            self._backlog = []
            self._backlog_bytes = 0
            task = asyncio.get_running_loop().create_task(self._logon(header))
            self.broker.track(task)
        elif cmd == "heartbeat":
            self._heartbeat(header)
        elif cmd == MALFORMED:
            self.nack({"cid": header["cid"]}, "invalid header")
        elif not self.logged_on:
            self.counters.malformed_frames += 1
            logger.warning("%r: %s before logon; closing", self, protocol.excerpt(cmd))
            self.nack(header, "logon required")
            self.close("command before logon")
        elif cmd == "subscribe":
            self._subscribe(header)
        elif cmd == "unsubscribe":
            self._unsubscribe(header)
        elif cmd == "flush":
            self._flush_command(header)
        elif cmd == "sow_delete" and self.broker.queues.is_queue(header.get("t")):
            self.broker.queues.sow_delete(self, header)
        elif cmd == "sow_delete" and header.get("cid") == QUEUE_ACK_CID:
            self._queue_ack(header)
        elif cmd in UNSUPPORTED:
            self.counters.unsupported_commands += 1
            logger.info("%r: refused unsupported command %s", self, cmd)
            self.nack(header, UNSUPPORTED[cmd])
        else:
            self.counters.unsupported_commands += 1
            logger.warning("%r: unknown command %s", self, protocol.excerpt(cmd))
            self.nack(
                header, f"unknown command {protocol.excerpt(cmd, 40)}" if cmd else "missing command"
            )

    # ------------------------------------------------------------------ acks

    def send_acks(self, command: Header, types: list[str] | tuple[str, ...]) -> None:
        """Send the success acks of ``types`` for ``command``."""
        for ack_type in types:
            self.send(protocol.ack(command, ack_type))

    def nack(self, command: Header, reason: str) -> None:
        """Answer ``command`` with a failure ack (processed, or the first type it asked for).

        A command that asked for no ack and has no ``cid`` cannot be answered; the failure
        is only logged.
        """
        self.counters.nacks += 1
        types = protocol.ack_types(command)
        if not types and not command.get("cid"):
            logger.info(
                "%r: %s failed (%s); the command asked for no ack",
                self,
                protocol.excerpt(command),
                reason,
            )
            return
        ack_type = "processed" if "processed" in types or not types else types[0]
        self.send(protocol.ack(command, ack_type, reason=reason))

    def add_persisted(self, seq: int) -> None:
        """Acknowledge publish-store sequence ``seq`` once all logged so far is durable."""
        if self.broker.appended_position <= self.broker.delivered_position:
            self.send(protocol.persisted_publish_ack(seq))
            return
        self.pending_persisted.append((self.broker.appended_position, seq))
        self.broker.wants_persisted_ack(self)

    def flush_persisted(self, durable: int) -> None:
        """Send the cumulative persisted ack for sequences durable up to ``durable``."""
        pending = self.pending_persisted
        seq = -1
        while pending and pending[0][0] <= durable:
            seq = max(seq, pending.popleft()[1])
        if seq >= 0:
            self.send(protocol.persisted_publish_ack(seq))

    # ------------------------------------------------------------------ commands

    async def _logon(self, header: Header) -> None:
        try:
            await self._logon_steps(header)
        except Exception:
            # A logon always gets an answer: the client would otherwise wait forever.
            self.counters.internal_errors += 1
            logger.exception("%r: logon failed", self)
            if not self.closed:
                self.nack(header, "internal error")
                self.close("logon failed")
        finally:
            backlog, self._backlog = self._backlog or [], None
            for index, (queued_header, queued_body) in enumerate(backlog):
                if self.closed:
                    break
                if self._backlog is not None:
                    # Another logon is pending: what follows it waits for it too.
                    self._backlog.extend(backlog[index:])
                    break
                self._handle(queued_header, queued_body)

    async def _logon_steps(self, header: Header) -> None:
        refused = logon_problem(header)
        if refused is not None:
            reason, detail = refused
            self.counters.bad_logons += 1
            logger.warning("%r: logon refused (%s): %s", self, reason, detail)
            self.nack(header, reason)
            self.close(reason)
            return
        ok = await self._authenticate(header)
        if self.closed:
            return
        if not ok:
            self.counters.auth_failures += 1
            logger.warning(
                "%r: auth failure for user %s", self, protocol.excerpt(header.get("user_id", ""))
            )
            self.nack(header, "auth failure")
            self.close("auth failure")
            return
        mt = str(header.get("mt", "json") or "json")
        if mt != "json":
            logger.warning("%r: unsupported message type %s", self, protocol.excerpt(mt))
            self.nack(header, "invalid message type")
            self.close("unsupported message type")
            return
        self.client_name = str(header.get("client_name", ""))
        # The client discards its publish store up to this sequence: report only what
        # is durable, after waiting for what this name already has in flight.
        if self.broker.appended_seq(self.client_name) > self.broker.persisted_seq(self.client_name):
            await self.broker.wait_durable()
        if self.closed:
            return
        last = self.broker.persisted_seq(self.client_name)
        self.logged_on = True
        self.cancel_logon_timer()
        self.counters.logons += 1
        logger.debug("%r: logged on (last persisted sequence %d)", self, last)
        self.send(
            protocol.logon_ack(
                header,
                client_name=self.client_name,
                name_hash=publisher_id(self.client_name),
                last_seq=last,
            )
        )

    async def _authenticate(self, header: Header) -> bool:
        if self.broker.users is None:
            return True
        user = str(header.get("user_id", ""))
        password = str(header.get("pw", ""))
        return await self.broker.check_password(self, user, password)

    def _publish(self, header: Header, body: bytes) -> None:
        topic = header.get("t")
        if not topic or not isinstance(topic, str) or topic.startswith("\x00"):
            self.counters.malformed_frames += 1
            logger.warning("%r: publish without a (usable) topic", self)
            self.nack(header, "invalid topic")
            return
        x = header.get("x")
        if not _is_utf8_text(topic) or (isinstance(x, str) and not _is_utf8_text(x)):
            # A lone surrogate (a JSON "\\ud800" escape) cannot be logged or delivered.
            self.counters.malformed_frames += 1
            logger.warning(
                "%r: publish with a topic or correlation id that is not UTF-8 text: %s",
                self,
                protocol.excerpt(topic),
            )
            self.nack(header, "invalid topic" if not _is_utf8_text(topic) else "invalid header")
            return
        seq = protocol.parse_sequence(header.get("s"))
        types = protocol.ack_types(header) if "a" in header else []
        if seq is not None and seq <= self.broker.appended_seq(self.client_name):
            self.counters.duplicates += 1
            logger.debug("%r: duplicate publish s=%d not logged again", self, seq)
        else:
            self.broker.publish(self, topic, str(x) if x else None, body, seq)
        if not types:
            return
        immediate = [t for t in types if t in _IMMEDIATE_ACKS]
        self.send_acks(header, immediate)
        if seq is not None and "persisted" in types:
            self.add_persisted(seq)
        later = [t for t in types if t not in _IMMEDIATE_ACKS and (seq is None or t != "persisted")]
        if later:
            self.broker.after_durable(lambda: self.send_acks(header, later))

    def _flush_command(self, header: Header) -> None:
        types = protocol.ack_types(header) or ["processed"]
        self.send_acks(header, [t for t in types if t in _IMMEDIATE_ACKS])
        later = [t for t in types if t not in _IMMEDIATE_ACKS]
        if later:
            self.broker.after_durable(lambda: self.send_acks(header, later))

    def _queue_ack(self, header: Header) -> None:
        seq = protocol.parse_sequence(header.get("s"))
        if seq is not None:
            self.add_persisted(seq)

    def _heartbeat(self, header: Header) -> None:
        option = str(header.get("o", ""))
        if option.startswith("start"):
            _, _, value = option.partition(",")
            try:
                interval = float(value) if value else 0.0
            except ValueError:
                interval = 0.0
            if interval <= 0:
                self.nack(header, "invalid options")
                return
            self.heartbeat_s = interval
            self.next_heartbeat = time.monotonic() + interval
        elif option == "stop":
            self.heartbeat_s = None
        self.send_acks(header, protocol.ack_types(header))

    def _subscribe(self, header: Header) -> None:
        topic = header.get("t")
        sub_id = str(header.get("sub_id") or header.get("cid") or "")
        opts = protocol.options(header)
        if not sub_id:
            self.nack(header, "invalid subid")
            return
        if not isinstance(topic, str) or not topic:
            self.nack(header, "invalid topic")
            return
        refused = opts & UNSUPPORTED_OPTIONS
        if refused:
            logger.info(
                "%r: subscribe %s refused: options %s",
                self,
                protocol.excerpt(sub_id),
                protocol.excerpt(sorted(refused)),
            )
            self.nack(header, "invalid options")
            return
        if sub_id in self.subs and "replace" not in opts:
            self.nack(header, "subscription already exists")
            return
        if self.broker.queues.is_queue(topic):
            self.broker.queues.subscribe(self, header, sub_id)
            return
        try:
            config = self.broker.config
            limits = FilterLimits(
                max_bytes=config.max_filter_bytes,
                max_depth=config.max_filter_depth,
                max_in_list=config.max_filter_in_list,
            )
            matches_topic = compile_topic(topic, limits)
            text = header.get("filter")
            matches_body = compile_filter(str(text), limits, self._filter_failed) if text else None
            bookmark = header.get("bm")
            spec = parse_bookmark(str(bookmark)) if bookmark not in (None, "") else None
        except TopicError as exc:
            logger.info(
                "%r: subscribe %s refused: %s %s",
                self,
                protocol.excerpt(sub_id),
                exc.reason,
                exc.detail[:300],
            )
            self.nack(header, exc.reason)
            return
        except FilterError as exc:
            logger.info(
                "%r: subscribe %s refused: bad filter: %s",
                self,
                protocol.excerpt(sub_id),
                str(exc)[:300],
            )
            self.nack(header, "bad filter")
            return
        except BookmarkError as exc:
            logger.info(
                "%r: subscribe %s refused: %s", self, protocol.excerpt(sub_id), str(exc)[:300]
            )
            self.nack(header, "invalid bookmark")
            return
        types = protocol.ack_types(header)
        old = self.subs.pop(sub_id, None)
        if old is not None:
            self.broker.remove_subscription(old)
        sub = Subscription(
            conn=self,
            sub_id=sub_id,
            cid=str(header.get("cid", sub_id)),
            topic=topic,
            matches_topic=matches_topic,
            matches_body=matches_body,
            is_regex=is_regex_topic(topic),
            with_timestamp="timestamp" in opts,
            wants_persisted=spec is not None and "persisted" in types,
            wants_completed=spec is not None and "completed" in types,
            command=header,
        )
        self.subs[sub_id] = sub
        self.send_acks(header, [t for t in types if t in (*_IMMEDIATE_ACKS, "processed")])
        self.broker.add_subscription(sub, spec)

    def _filter_failed(self, exc: Exception) -> None:
        # The fan-out logs undecodable bodies; a failure inside the predicate is rarer
        # still (an exhausted stack): count it with them.
        self.counters.filter_errors += 1
        logger.debug("%r: filter evaluation failed: %s", self, exc)

    def _unsubscribe(self, header: Header) -> None:
        wanted = str(header.get("sub_id", "all") or "all")
        ids = list(self.subs) if wanted == "all" else [s.strip() for s in wanted.split(",")]
        for sub_id in ids:
            sub = self.subs.pop(sub_id, None)
            if sub is not None:
                self.broker.remove_subscription(sub)
        self.send_acks(header, protocol.ack_types(header))

    # ------------------------------------------------------------------ periodic

    def tick(self, now: float) -> None:
        """Heartbeats (send, and time out a silent client) and subscription persisted acks."""
        if self.heartbeat_s is not None:
            if now - self.last_received > 3 * self.heartbeat_s:
                self.counters.heartbeat_timeouts += 1
                logger.warning(
                    "%r: no traffic for %.1f s (heartbeat %g s); closing",
                    self,
                    now - self.last_received,
                    self.heartbeat_s,
                )
                self.close("heartbeat timeout")
                return
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + self.heartbeat_s
                self.send(protocol.HEARTBEAT)
        # What AMPS sends: the last bookmark written to the log (on any topic, matching or
        # not), and only once the subscription has caught up: every message up to it that
        # matches is already queued ahead of the ack. See docs/devbroker.md.
        persisted = self.broker.persisted_bookmark
        if not persisted:
            return
        for sub in self.subs.values():
            if sub.wants_persisted and sub.live and sub.acked_bookmark != persisted:
                sub.acked_bookmark = persisted
                self.send(protocol.subscription_persisted_ack(sub.cid, sub.sub_id, persisted))
