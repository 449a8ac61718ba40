"""The devbroker process: listeners, group commit, fan-out, replay, lifecycle.

:class:`Broker` is the in-process API (tests start one on port 0); :func:`run` is
``ampsflow devbroker``.

Durability and ordering. A publish is appended to the transaction log (buffered) and
nothing else happens to it until a group commit has ``fdatasync``'d it: one commit at a
time runs in a worker thread and takes everything appended meanwhile. After each commit,
on the event loop and in log order: the committed entries are fanned out to live
subscriptions, publish-store persisted acks (cumulative ``s`` per connection) are sent,
and flush acks waiting for those entries are answered. Subscribers therefore only ever
see durable messages, so replay and live delivery always agree.

A bookmark subscription starts "catching up": it replays log entries in chunks up to
:attr:`Broker.delivered_position` (what the fan-out has reached), skipped by the fan-out
meanwhile, and turns live in the same event-loop step in which its cursor passes that
position, so the switch has no gap and no duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import resource
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ampsflow.backoff import Backoff, BackoffPolicy
from ampsflow.config import Config, DevbrokerConfig, parse_host_port
from ampsflow.devbroker import protocol
from ampsflow.devbroker.auth import Users
from ampsflow.devbroker.bookmarks import ReplaySpec
from ampsflow.devbroker.queueing import QueueService
from ampsflow.devbroker.queues import RECORD_TOPIC
from ampsflow.devbroker.session import MALFORMED, Connection, Counters, Subscription
from ampsflow.devbroker.txlog import LogEntry, ReplayCursor, TransactionLog
from ampsflow.errors import (
    AuthError,
    OversizedHeaderError,
    ProtocolError,
    StartupError,
    TransactionLogError,
)
from ampsflow.lifecycle import LIVE_KEYS_COMMON, Daemon, run_service, serve_until_stopped

logger = logging.getLogger(__name__)

TICK_S = 0.1
"""Granularity of heartbeats, heartbeat timeouts and subscription persisted acks."""
STATS_INTERVAL_S = 60.0
RETENTION_INTERVAL_S = 60.0
REPLAY_CHUNK = 512
"""Log entries read per replay step (at most :attr:`Broker.flow_bytes` of bodies); replay
waits for the socket to drain between steps."""
OUTBOUND_HIGH_WATER = 1024 * 1024
"""Flow control: a connection with more than this (or a quarter of ``max_outbound_bytes``
when that is less) queued gets no more live messages; its subscriptions fall behind and are
fed from the transaction log as its socket drains (see :meth:`Broker._fall_behind`)."""
MAX_PENDING_ENTRIES = 200_000
"""Appended but not yet committed entries above which publishers' sockets stop being
read until the log catches up."""
GIL_SWITCH_INTERVAL_S = 0.0005
COMMIT_RETRY = BackoffPolicy(initial_s=0.05, max_s=1.0)
"""Waits between retries of a failed commit (a full or failing disk); acks wait meanwhile."""
_CID = re.compile(rb'"(?:cid|cmd_id)":"([^"\\]{1,200})"')
_UNPARSED = object()
LOG_EVERY_S = 10.0
"""Refused connections and accept errors are logged at most once per this interval (with
how many were not logged); the counters count every one."""
FD_RESERVE = 64
"""Open files the broker needs besides client connections (log segments, listeners...)."""


class _Throttle:
    """Say when a repeated event may be logged again: at most once per ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0
        self.suppressed = 0

    def allow(self) -> int | None:
        """Return how many were held back since the last one logged, or None to stay quiet."""
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + self.interval_s
        held, self.suppressed = self.suppressed, 0
        return held


def _ensure_fd_limit(wanted: int) -> None:
    """Raise the soft open-file limit towards ``wanted`` (within the hard limit); warn when
    it stays below, since accepting then fails with EMFILE before ``max_connections``."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError) as exc:
        logger.warning("cannot raise the open-file limit: %s", exc)
        return
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "open-file limit %d is below max_connections + %d = %d: at the limit new "
            "connections fail to be accepted (logged at most every %g s)",
            soft,
            FD_RESERVE,
            wanted,
            LOG_EVERY_S,
        )


_UNDECODABLE = object()
"""What :func:`_parse_body` returns for a body no filter can be evaluated on."""


def _parse_body(body: bytes) -> object:
    """The JSON value filters are evaluated on: ``None`` when the body is not JSON (filters
    on fields then do not match), :data:`_UNDECODABLE` when it is JSON the decoder cannot
    take (nesting deeper than the interpreter's recursion limit, or out of memory)."""
    try:
        return json.loads(body)
    except ValueError:
        return None
    except (RecursionError, MemoryError):
        return _UNDECODABLE


def _tail(entry: LogEntry, bookmark: str, with_timestamp: bool) -> bytes:
    timestamp = protocol.format_timestamp(entry.timestamp_us) if with_timestamp else None
    return protocol.delivery_tail(entry.topic, bookmark, entry.correlation_id, timestamp)


class Broker:
    """The devbroker: one transaction log, a TCP and a WebSocket listener.

    Args:
        config: the ``devbroker`` config section; ports may be 0 (see :attr:`tcp_port`).
        users: overrides ``config.users_file`` (tests); ``None`` reads the file if set.
    """

    def __init__(self, config: DevbrokerConfig, *, users: Users | None = None) -> None:
        self.config = config
        self.counters = Counters()
        self.users = users
        self.log = TransactionLog(
            Path(config.data_dir),
            segment_bytes=config.segment_bytes,
            retention_bytes=config.retention_bytes,
            retention_age_s=config.retention_age_s,
        )
        self.delivered_position = 0
        self.queues = QueueService(self, config.queues)
        self.persisted_bookmark = ""
        """Bookmark of the entry at :attr:`delivered_position` ("" while the log is empty):
        what bookmark subscriptions' persisted acks name."""
        self._pending: deque[LogEntry] = deque()
        self._after: deque[tuple[int, Callable[[], None]]] = deque()
        self._ack_conns: set[Connection] = set()
        self._conns: set[Connection] = set()
        self._subs: list[Subscription] = []
        self._topic_cache: dict[str, list[Subscription]] = {}
        self._paused: set[TcpConnection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dirty: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="devbroker-txlog")
        self._auth_executor = ThreadPoolExecutor(
            config.max_concurrent_logons, thread_name_prefix="devbroker-auth"
        )
        self._logon_slots = asyncio.Semaphore(config.max_concurrent_logons)
        self._refused_log = _Throttle(LOG_EVERY_S)
        self._filter_log = _Throttle(LOG_EVERY_S)
        self.flow_bytes = max(1, min(OUTBOUND_HIGH_WATER, config.max_outbound_bytes // 4))
        """Outbound bytes above which a connection is fed from the log (flow control)."""
        self._progress: dict[Connection, tuple[int, float]] = {}
        self._accept_log = _Throttle(LOG_EVERY_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self._tcp_server: asyncio.Server | None = None
        self._ws_runner: web.AppRunner | None = None
        self._tcp_port = 0
        self._ws_port = 0
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def tcp_port(self) -> int:
        """The TCP listener's bound port (useful when configured as 0)."""
        return self._tcp_port

    @property
    def websocket_port(self) -> int:
        """The WebSocket listener's bound port (useful when configured as 0)."""
        return self._ws_port

    def reload_users(self, users_file: str | None) -> None:
        """Read ``users_file`` again (SIGHUP); an unreadable file keeps the users in effect.

        ``None`` turns authentication off. Connections already logged on are not
        affected; the next logon uses the new users.
        """
        if not users_file:
            if self.users is not None:
                logger.warning("reload: no users file any more: logons are not checked")
            self.users = None
            self.config = dataclasses.replace(self.config, users_file=None)
            return
        try:
            users = Users.load(Path(users_file))
        except AuthError as exc:
            logger.error("reload: keeping the previous users: %s", exc)  # noqa: TRY400
            return
        self.users = users
        self.config = dataclasses.replace(self.config, users_file=users_file)
        logger.info("reload: %d users from %s", len(users), users_file)

    async def start(self) -> None:
        """Open the log, start the committer and the listeners.

        Raises:
            TransactionLogError: the data directory is unusable.
            AuthError: the users file cannot be read.
            OSError: a listener cannot bind.
        """
        if self.users is None and self.config.users_file:
            self.users = Users.load(Path(self.config.users_file))
        report = self.log.open()
        self._started = True
        logger.info(
            "transaction log %s: %d entries in %d segments, last position %d",
            self.config.data_dir,
            report.entries,
            report.segments,
            report.last_position,
        )
        self.queues.open(self.log)
        self.delivered_position = self.log.durable_position
        last, _ = self.log.read(
            ReplayCursor(position=self.delivered_position), up_to=self.delivered_position, limit=1
        )
        self.persisted_bookmark = last[-1].bookmark if last else ""
        self._dirty = asyncio.Event()
        self._spawn(self._committer())
        self._spawn(self._ticker())
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        _ensure_fd_limit(self.config.max_connections + FD_RESERVE)
        try:
            host, port = parse_host_port(self.config.tcp)
            self._tcp_server = await loop.create_server(
                lambda: TcpConnection(self), host, port, reuse_address=True
            )
            self._tcp_port = self._tcp_server.sockets[0].getsockname()[1]
            app = web.Application()
            app.router.add_get("/amps/json", self._websocket)
            self._ws_runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self._ws_runner.setup()
            host, port = parse_host_port(self.config.websocket)
            site = web.TCPSite(self._ws_runner, host, port, reuse_address=True)
            await site.start()
            self._ws_port = self._ws_runner.addresses[0][1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop accepting, commit, answer what waits for that commit, close everything."""
        if self._stopped or not self._started:
            self._executor.shutdown(wait=False)
            self._auth_executor.shutdown(wait=False, cancel_futures=True)
            return
        self._stopped = True
        if self._tcp_server is not None:
            self._tcp_server.close()
        try:
            durable = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.log.commit
            )
            self._on_durable(durable)
        except TransactionLogError as exc:
            logger.error("final commit failed: %s", exc)  # noqa: TRY400 - one line says it all
        for conn in list(self._conns):
            conn.close("broker shutting down")
        if self._ws_runner is not None:
            await self._ws_runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._executor.shutdown(wait=True)
        self._auth_executor.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous_handler)
        self.log.close()
        logger.info("devbroker stopped: %s %s", self.counters.as_text(), self.queues.stats_text())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.track(task)
        return task

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a reference to ``task`` until it ends (cancelled at :meth:`stop`)."""
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("devbroker task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ connections

    def admit(self, transport: str, peer: str) -> bool:
        """Whether a new connection may open (fewer than ``max_connections`` are open).

        A refusal is counted and logged (at most every :data:`LOG_EVERY_S`).
        """
        if len(self._conns) < self.config.max_connections:
            return True
        self.counters.connections_refused += 1
        held = self._refused_log.allow()
        if held is not None:
            logger.warning(
                "refused %s connection from %s: max_connections (%d) open (%d more refused "
                "since the last report)",
                transport,
                peer,
                self.config.max_connections,
                held,
            )
        return False

    def add_connection(self, conn: Connection) -> None:
        """Register a new client connection; it must log on within ``logon_timeout_s``."""
        self._conns.add(conn)
        self.counters.connections_opened += 1
        conn.start_logon_timer()
        logger.debug("%r: connected", conn)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # At the open-file limit asyncio's accept loop reports every failed accept() with a
        # traceback, thousands a second: count them, log one line now and then.
        exc = context.get("exception")
        if isinstance(exc, OSError) and str(context.get("message", "")).startswith(
            "socket.accept()"
        ):
            self.counters.accept_errors += 1
            held = self._accept_log.allow()
            if held is not None:
                logger.error(
                    "cannot accept connections: %s (%d more since the last report; "
                    "raise the open-file limit or lower max_connections)",
                    exc,
                    held,
                )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def check_password(self, conn: Connection, user: str, password: str) -> bool:
        """Verify a logon's password in a worker thread, ``max_concurrent_logons`` at a time.

        The event loop goes on serving meanwhile; a connection that closed while waiting
        for its turn is not checked (False).
        """
        users = self.users
        if users is None:
            return True
        async with self._logon_slots:
            if conn.closed:
                return False
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._auth_executor, users.verify, user, password)

    def remove_connection(self, conn: Connection, reason: str) -> None:
        """Forget a closed connection and its subscriptions."""
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        conn.cancel_logon_timer()
        self._ack_conns.discard(conn)
        self._progress.pop(conn, None)
        if isinstance(conn, TcpConnection):
            self._paused.discard(conn)
        for sub in list(conn.subs.values()):
            self.remove_subscription(sub)
        conn.subs.clear()
        self.counters.connections_closed += 1
        logger.debug("%r: disconnected (%s)", conn, reason)

    def add_subscription(self, sub: Subscription, spec: ReplaySpec | None) -> None:
        """Start delivering to ``sub``: live at once, or after replaying from ``spec``."""
        self._subs.append(sub)
        self._topic_cache.clear()
        self.counters.subscriptions += 1
        if spec is None:
            sub.live = True
            return
        sub.live = False
        self._spawn(self._replay(sub, self.log.replay_start(spec)))

    def remove_subscription(self, sub: Subscription) -> None:
        """Stop delivering to ``sub`` (a replay in progress ends at its next step)."""
        sub.live = False
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        self._topic_cache.clear()
        self.queues.remove(sub)

    # ------------------------------------------------------------------ publishing

    def publish(
        self, conn: Connection, topic: str, correlation_id: str | None, body: bytes, seq: int | None
    ) -> None:
        """Append a publish to the log; it is delivered after the next commit."""
        entry = self.log.append(
            topic=topic,
            client_name=conn.client_name,
            correlation_id=correlation_id,
            body=body,
            client_seq=seq,
            timestamp_us=time.time_ns() // 1000,
        )
        self._pending.append(entry)
        self.counters.published += 1
        assert self._dirty is not None
        self._dirty.set()

    def append_record(self, topic: str, client_name: str, body: bytes) -> None:
        """Append a broker record (never delivered to subscriptions) to the log."""
        self._pending.append(
            self.log.append(
                topic=topic,
                client_name=client_name,
                correlation_id=None,
                body=body,
                client_seq=None,
                timestamp_us=time.time_ns() // 1000,
            )
        )
        assert self._dirty is not None
        self._dirty.set()

    @property
    def congested(self) -> bool:
        """True while too many entries wait for a commit (publishers are paused)."""
        return len(self._pending) > MAX_PENDING_ENTRIES

    def pause(self, conn: TcpConnection) -> None:
        """Remember a connection whose reading was paused because of congestion."""
        self._paused.add(conn)

    def wants_persisted_ack(self, conn: Connection) -> None:
        """``conn`` has publish-store sequences to acknowledge after a commit."""
        self._ack_conns.add(conn)
        assert self._dirty is not None
        self._dirty.set()

    def after_durable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything appended so far is committed and delivered."""
        position = self.log.last_position
        if position <= self.delivered_position:
            callback()
            return
        self._after.append((position, callback))
        assert self._dirty is not None
        self._dirty.set()

    async def wait_durable(self) -> None:
        """Wait until everything appended so far is committed and delivered."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        self.after_durable(finished)
        await done

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.commit_delay_ms / 1000
        retry = Backoff(COMMIT_RETRY)
        assert self._dirty is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                durable = await loop.run_in_executor(self._executor, self.log.commit)
            except TransactionLogError as exc:
                self.counters.commit_failures += 1
                wait = retry.next_delay()
                logger.error("commit failed, acks withheld, retrying in %.2fs: %s", wait, exc)  # noqa: TRY400 - one line says it all
                await retry.sleep(wait)
                self._dirty.set()
                continue
            retry.reset()
            self.counters.commits += 1
            self._on_durable(durable)

    def _on_durable(self, durable: int) -> None:
        pending = self._pending
        if pending and pending[0].position <= durable:
            batch = []
            while pending and pending[0].position <= durable:
                batch.append(pending.popleft())
            self._fan_out(batch)
            if self.queues:
                self.queues.on_committed(batch)
            self.persisted_bookmark = batch[-1].bookmark
        self.delivered_position = max(self.delivered_position, durable)
        if self._ack_conns:
            for conn in list(self._ack_conns):
                conn.flush_persisted(durable)
                if not conn.pending_persisted:
                    self._ack_conns.discard(conn)
        after = self._after
        while after and after[0][0] <= durable:
            try:
                after.popleft()[1]()
            except Exception:
                self.counters.internal_errors += 1
                logger.exception("post-commit callback failed")
        if self._paused and not self.congested:
            for conn in list(self._paused):
                conn.resume()
            self._paused.clear()

    def _fan_out(self, batch: list[LogEntry]) -> None:
        cache = self._topic_cache
        for entry in batch:
            subs = cache.get(entry.topic)
            if subs is None:
                if len(cache) > 10_000:
                    cache.clear()
                subs = [
                    s
                    for s in self._subs
                    if entry.topic != RECORD_TOPIC and s.matches_topic(entry.topic)
                ]
                cache[entry.topic] = subs
            if subs:
                try:
                    self._deliver(entry, subs)
                except Exception:
                    # A failing delivery must not stop the committer (everyone's acks).
                    self.counters.internal_errors += 1
                    logger.exception("delivery of log position %d failed", entry.position)

    def _matches(self, sub: Subscription, entry: LogEntry, body: object) -> bool:
        """Evaluate ``sub``'s content filter on ``entry`` (decoded as ``body``).

        A filter that cannot be evaluated (the body cannot be decoded, or evaluation
        fails) does not match, for that subscription only: counted in ``filter_errors``
        and logged at most every :data:`LOG_EVERY_S`; delivery to everyone else and the
        subscription itself go on.
        """
        assert sub.matches_body is not None
        problem: str
        if body is _UNDECODABLE:
            problem = "the body cannot be decoded (nested too deeply)"
        else:
            try:
                return sub.matches_body(body)
            except Exception as exc:  # any failure means "no match" for this subscription
                problem = f"{type(exc).__name__}: {exc}"[:200]
        self.counters.filter_errors += 1
        held = self._filter_log.allow()
        if held is not None:
            logger.warning(
                "%r: filter of subscription %s cannot be evaluated on log position %d (%d "
                "bytes on %s): %s; treated as no match (%d more since the last such line)",
                sub.conn,
                sub.sub_id,
                entry.position,
                len(entry.body),
                entry.topic,
                problem,
                held,
            )
        return False

    def _deliver(self, entry: LogEntry, subs: list[Subscription]) -> None:
        body: object = _UNPARSED
        targets: dict[Connection, list[Subscription]] = {}
        for sub in subs:
            if not sub.live:
                continue
            if sub.matches_body is not None:
                if body is _UNPARSED:
                    body = _parse_body(entry.body)
                if not self._matches(sub, entry, body):
                    continue
            group = targets.get(sub.conn)
            if group is None:
                targets[sub.conn] = [sub]
            else:
                group.append(sub)
        if not targets:
            return
        bookmark = entry.bookmark
        plain: bytes | None = None
        flow_bytes = self.flow_bytes
        for conn, group in targets.items():
            if conn.outbound_bytes() > flow_bytes:
                self._fall_behind(group, entry)
                continue
            with_ts = False
            for sub in group:
                with_ts = with_ts or sub.with_timestamp
            if with_ts:
                tail = _tail(entry, bookmark, True)
            else:
                if plain is None:
                    plain = _tail(entry, bookmark, False)
                tail = plain
            sids = group[0].sid if len(group) == 1 else b",".join(s.sid for s in group)
            try:
                conn.deliver(sids, tail, entry.body)
            except Exception:
                # One connection's failure must not keep the message from the others.
                self.counters.internal_errors += 1
                logger.exception("%r: delivery of log position %d failed", conn, entry.position)
                conn.close("internal error")
                continue
            self.counters.delivered += 1

    def _fall_behind(self, subs: list[Subscription], entry: LogEntry) -> None:
        """Stop live delivery to ``subs`` (their connection's socket is not keeping up) and
        feed them from the log from ``entry`` on, as fast as the socket drains; they turn
        live again when they catch up. Nothing is skipped and memory stays bounded."""
        for sub in subs:
            if not sub.live:
                continue
            sub.live = False
            self.counters.fell_behind += 1
            logger.debug(
                "%r: %s falls behind at log position %d (%d bytes queued); fed from the log",
                sub.conn,
                sub.sub_id,
                entry.position,
                sub.conn.outbound_bytes(),
            )
            self._spawn(self._replay(sub, ReplayCursor(position=entry.position), completed=False))

    async def _replay(
        self, sub: Subscription, cursor: ReplayCursor, *, completed: bool = True
    ) -> None:
        """Deliver log entries to ``sub`` from ``cursor``, a chunk at a time, waiting for the
        connection to drain between chunks; turn it live once it has caught up. A
        ``completed`` ack (when asked for) ends the subscribe's own replay."""
        conn = sub.conn
        try:
            while True:
                if conn.closed or conn.subs.get(sub.sub_id) is not sub:
                    return
                entries, cursor = self.log.read(
                    cursor,
                    up_to=self.delivered_position,
                    limit=REPLAY_CHUNK,
                    max_bytes=self.flow_bytes,
                )
                for entry in entries:
                    if entry.topic == RECORD_TOPIC or not sub.matches_topic(entry.topic):
                        continue
                    if sub.matches_body is not None and not self._matches(
                        sub, entry, _parse_body(entry.body)
                    ):
                        continue
                    bookmark = entry.bookmark
                    conn.deliver(sub.sid, _tail(entry, bookmark, sub.with_timestamp), entry.body)
                    self.counters.replayed += 1
                if cursor.position > self.delivered_position:
                    sub.live = True
                    break
                await conn.drain()
            if completed and sub.wants_completed:
                conn.send(protocol.ack(sub.command, "completed"))
        except (TransactionLogError, OSError) as exc:
            logger.error("%r: replay for %s failed: %s", conn, sub.sub_id, exc)  # noqa: TRY400 - one line says it all
            conn.close("replay failed")
        except Exception:
            # Never a subscription that silently stays behind: the client resubscribes.
            self.counters.internal_errors += 1
            logger.exception("%r: replay for %s failed; closing", conn, sub.sub_id)
            conn.close("replay failed")

    # ------------------------------------------------------------------ periodic work

    def _check_progress(self, conn: Connection, now: float) -> None:
        """Disconnect ``conn`` when it has had bytes queued and read none of them for
        ``slow_consumer_timeout_s`` (a slow consumer: one that does not read, however
        little or much is queued)."""
        queued = conn.outbound_bytes()
        sent = conn.sent_bytes()
        last = self._progress.get(conn)
        if queued == 0 or last is None or sent != last[0]:
            self._progress[conn] = (sent, now)
            return
        stalled = now - last[1]
        if stalled < self.config.slow_consumer_timeout_s:
            return
        self.counters.slow_consumers += 1
        logger.warning(
            "%r: %d bytes queued and none read for %.1f s (slow_consumer_timeout_s %g); "
            "disconnecting slow consumer",
            conn,
            queued,
            stalled,
            self.config.slow_consumer_timeout_s,
        )
        conn.abort("slow consumer")

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_stats = time.monotonic() + STATS_INTERVAL_S
        next_retention = time.monotonic() + RETENTION_INTERVAL_S
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for conn in list(self._conns):
                self._check_progress(conn, now)
                if conn.closed:
                    continue
                try:
                    conn.tick(now)
                except Exception:
                    self.counters.internal_errors += 1
                    logger.exception("%r: periodic work failed; closing", conn)
                    conn.close("internal error")
            try:
                self.queues.tick()
            except Exception:
                self.counters.internal_errors += 1
                logger.exception("queue lease expiry failed")
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                logger.debug(
                    "devbroker: %d connections, %d subscriptions, log position %d; %s %s",
                    len(self._conns),
                    len(self._subs),
                    self.delivered_position,
                    self.counters.as_text(),
                    self.queues.stats_text(),
                )
            if now >= next_retention:
                next_retention = now + RETENTION_INTERVAL_S
                try:
                    await loop.run_in_executor(self._executor, self.log.enforce_retention)
                except TransactionLogError as exc:
                    logger.error("retention failed: %s", exc)  # noqa: TRY400 - one line says it all

    # ------------------------------------------------------------------ bad frames

    def bad_frame(self, conn: Connection, raw: bytes, error: ProtocolError) -> None:
        """Count and log an unparseable header; answer it when its ``cid`` can be found.

        A header over ``max_header_bytes`` also closes the connection. Only the start of
        the frame is searched and logged.
        """
        oversized = isinstance(error, OversizedHeaderError)
        if oversized:
            self.counters.oversized_headers += 1
        else:
            self.counters.malformed_frames += 1
        logger.warning("%r: malformed frame (%s): %s", conn, error, protocol.excerpt(raw))
        match = _CID.search(raw, 0, self.config.max_header_bytes)
        if match is not None:
            # Through receive(), so the nack keeps its place behind a pending logon ack.
            cid = match.group(1).decode("utf-8", "replace")
            conn.receive({"c": MALFORMED, "cid": cid}, b"")
        if oversized:
            conn.close("oversized header")

    # ------------------------------------------------------------------ WebSocket

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "?"
        if not self.admit("ws", peer):
            return web.Response(status=503, text="too many connections\n")
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes)
        await ws.prepare(request)
        conn = WsConnection(self, ws, peer)
        self.add_connection(conn)
        reason = "client closed"
        try:
            first = await ws.receive()
            if first.type != WSMsgType.TEXT or first.data not in ("text", "binary"):
                reason = "no text/binary preamble"
                self.counters.malformed_frames += 1
                logger.warning("%r: expected the 'text' preamble frame, got %s", conn, first.type)
                return ws
            while not conn.closed:
                msg = await ws.receive()
                if msg.type == WSMsgType.ERROR:
                    reason = f"websocket error: {msg.data}"
                    if "too big" in str(msg.data).lower():
                        self.counters.oversized_frames += 1
                    logger.warning("%r: %s", conn, reason)
                    break
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type != WSMsgType.BINARY or len(msg.data) != 4:
                    reason = "expected a frame-count frame"
                    self.counters.malformed_frames += 1
                    logger.warning("%r: %s, got %s; closing", conn, reason, msg.type)
                    break
                (count,) = protocol.WS_COUNT.unpack(msg.data)
                if not 1 <= count <= 4096:
                    reason = f"bad frame count {count}"
                    self.counters.malformed_frames += 1
                    logger.warning("%r: %s; closing", conn, reason)
                    break
                parts, problem = await self._ws_command(conn, ws, count)
                if problem:
                    reason = problem
                    break
                raw_header = parts[0]
                body = b"".join(parts[1:])
                if len(raw_header) > self.config.max_header_bytes:
                    error = OversizedHeaderError(
                        f"header of {len(raw_header)} bytes exceeds max_header_bytes "
                        f"{self.config.max_header_bytes}"
                    )
                    self.bad_frame(conn, raw_header, error)
                    reason = "oversized header"
                    break
                try:
                    header = protocol.parse_header(raw_header)
                except ProtocolError as exc:
                    self.bad_frame(conn, raw_header, exc)
                    continue
                while self.congested and not conn.closed:
                    await asyncio.sleep(0.01)
                conn.last_received = time.monotonic()
                conn.receive(header, body)
        finally:
            self.remove_connection(conn, conn.close_reason or reason)
            await conn.finish()
        return ws

    async def _ws_command(
        self, conn: WsConnection, ws: web.WebSocketResponse, count: int
    ) -> tuple[list[bytes], str]:
        """Read the ``count`` frames of one command; return them, or a reason to close.

        The size limit is enforced as frames arrive: ``max_frame_bytes`` for the whole
        command, ``max_header_bytes`` until the client has sent its logon.
        """
        limit = self.config.max_frame_bytes if conn.logon_seen else self.config.max_header_bytes
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
                    self.counters.oversized_frames += 1
                    logger.warning("%r: %s; closing", conn, part.data)
                return parts, f"connection ended inside a command ({part.type.name})"
            total += len(data)
            if total > limit:
                self.counters.oversized_frames += 1
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
    broker: Broker

    def __init__(self, broker: Broker) -> None:
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
                self.broker.counters.oversized_frames += 1
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
                self.broker.bad_frame(self, frame, exc)
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
        """Queue a frame; frames queued in one event-loop step go out in one write."""
        if self.closed:
            return
        data = protocol.frame(header, body) if body else protocol.frame(header)
        if self._out_bytes > self._max_out:
            self._over_limit(self._out_bytes)
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
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
        self.broker.counters.slow_consumers += 1
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
    broker: Broker

    def __init__(self, broker: Broker, ws: web.WebSocketResponse, peer: str) -> None:
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
            self.broker.counters.slow_consumers += 1
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


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow devbroker``: serve until SIGTERM/SIGINT; exit 1 when it cannot start.

    The shared lifecycle (:mod:`ampsflow.lifecycle`) takes the signals, pings the
    watchdog from the event loop and reloads on SIGHUP: ``logging.*`` and
    ``devbroker.users_file`` apply live (the users file is read again on every
    reload); the listeners, data directory and log settings need a restart.
    """
    # The commit thread needs the GIL back right after each fdatasync to hand the batch to
    # the event loop; CPython's default 5 ms switch interval would add that to every ack
    # and delivery while the loop is busy.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    def work(daemon: Daemon, telemetry: object) -> None:
        del telemetry  # the broker emits no spans
        asyncio.run(_serve(daemon))

    return run_service(
        config,
        args,
        service="devbroker",
        service_name="devbroker",
        work=work,
        sections=("devbroker", "logging"),
        live_keys=LIVE_KEYS_COMMON | {"devbroker.users_file"},
        tracing=False,
    )


async def _serve(daemon: Daemon) -> None:
    config = daemon.config.devbroker
    broker = Broker(config)
    try:
        await broker.start()
    except (TransactionLogError, AuthError, OSError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    tcp_host = parse_host_port(config.tcp)[0]
    ws_host = parse_host_port(config.websocket)[0]
    status = (
        f"listening on tcp://{tcp_host}:{broker.tcp_port}/amps/json and "
        f"ws://{ws_host}:{broker.websocket_port}/amps/json"
    )
    logger.info("devbroker %s (data dir %s)", status, config.data_dir)
    # Runs on the lifecycle's signal thread: reading the file there keeps the event
    # loop serving, and replacing broker.users is one reference assignment.
    daemon.on_reload(lambda _running, new: broker.reload_users(new.devbroker.users_file))
    daemon.ready(status)
    try:
        await serve_until_stopped(daemon)
    finally:
        await broker.stop()
