"""The devbroker's broker: the transaction log, group commit, fan-out and replay.

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

:class:`Broker` is the in-process API (tests start one on port 0); it starts the
listeners of :mod:`ampsflow.devbroker.transports`; :mod:`ampsflow.devbroker.server` is
the ``ampsflow devbroker`` process around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import resource
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from ampsflow.backoff import Backoff, BackoffPolicy
from ampsflow.config import DevbrokerConfig, parse_host_port
from ampsflow.devbroker import protocol
from ampsflow.devbroker.auth import Users
from ampsflow.devbroker.bookmarks import ReplaySpec
from ampsflow.devbroker.counters import Counters
from ampsflow.devbroker.queueing import QueueService
from ampsflow.devbroker.queues import RECORD_TOPIC
from ampsflow.devbroker.session import Connection, Subscription
from ampsflow.devbroker.transports import OUTBOUND_HIGH_WATER, TcpConnection, serve_websocket
from ampsflow.devbroker.txlog import LogEntry, ReplayCursor, TransactionLog
from ampsflow.errors import (
    AuthError,
    TransactionLogError,
)

logger = logging.getLogger(__name__)

TICK_S = 0.1
"""Granularity of heartbeats, heartbeat timeouts and subscription persisted acks."""
STATS_INTERVAL_S = 60.0
RETENTION_INTERVAL_S = 60.0
REPLAY_CHUNK = 512
"""Log entries read per replay step (at most :attr:`Broker.flow_bytes` of bodies); replay
waits for the socket to drain between steps."""
MAX_PENDING_ENTRIES = 200_000
"""Appended but not yet committed entries above which publishers' sockets stop being
read until the log catches up."""
COMMIT_RETRY = BackoffPolicy(initial_s=0.05, max_s=1.0)
"""Waits between retries of a failed commit (a full or failing disk); acks wait meanwhile."""
_UNPARSED = object()
LOG_EVERY_S = 10.0
"""Refused connections and accept errors are logged at most once per this interval (with
how many were not logged); the counters count every one."""
FD_RESERVE = 64
"""Open files the broker needs besides client connections (log segments, listeners...)."""
_UNDECODABLE = object()
"""What :func:`_parse_body` returns for a body no filter can be evaluated on."""


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
            app.router.add_get("/amps/json", functools.partial(serve_websocket, self))
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

    @property
    def appended_position(self) -> int:
        """The log position of the last entry appended (durable or not)."""
        return self.log.last_position

    def persisted_seq(self, client_name: str) -> int:
        """The highest publish-store sequence of ``client_name`` that is durable."""
        return self.log.highest_client_seq(client_name)

    def appended_seq(self, client_name: str) -> int:
        """The highest publish-store sequence of ``client_name`` appended (durable or not)."""
        return self.log.highest_appended_client_seq(client_name)

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
