"""The AMPS connection of a daemon: the only module that imports the official client.

:class:`AmpsClient` wraps one ``AMPS.HAClient`` and gives a service three things:

- **A queue consumer.** :meth:`AmpsClient.subscribe_queue` subscribes to an AMPS message
  queue instead: the broker leases up to ``max_backlog`` messages at a time to this
  client, :meth:`AmpsClient.discard` acknowledges one (a ``sow_delete`` with its
  bookmark, stored in the publish store first when there is one, so it is re-sent after a
  reconnect or restart), and a message whose lease ran out or whose consumer went away
  is delivered again, possibly to another client.
- **A consumer.** :meth:`AmpsClient.subscribe` places a *bookmark subscription*
  backed by an ``MMapBookmarkStore`` file in ``state_dir``.
  :meth:`AmpsClient.receive` hands the service one
  :class:`~ampsflow.messaging.Received` message at
  a time; once the service has *finished* it (its output is safely stored or
  written) it calls :meth:`AmpsClient.discard`. The bookmark store records the
  discard in its file, and a later subscribe (a restart, or the client's own
  resubscribe after a reconnect) resumes right after the last message
  discarded *in order*: a message received but not discarded is delivered
  again, never skipped (this needs the broker's persisted acks for bookmark
  subscriptions, which AMPS and the devbroker send; see *Guarantees*).
- **A publisher.** With ``publish_store=True``, :meth:`AmpsClient.publish`
  writes each message into a file-backed ``PublishStore`` in ``state_dir``
  before sending it; it stays there until the broker acknowledges it as
  persisted, and everything unacknowledged is re-sent after a reconnect or a
  restart. :meth:`AmpsClient.flush` waits (bounded) for those acks.
- **Reconnects.** When the broker goes away the client reconnects on its own,
  trying ``amps.uris`` in turn with capped, jittered exponential backoff
  (``amps.reconnect_max_delay_s``), re-sends unacknowledged publishes and
  resubscribes from the bookmark store. The waits end at once when the stop
  event is set before the first connection, or when :meth:`AmpsClient.close`
  is called. Every failure and recovery is reported to ``on_status`` (the
  services forward it to systemd ``STATUS=``) and logged.

Guarantees (each holds across broker restarts, including ``kill -9``, and
restarts of the daemon itself):

- *No loss on input:* a message is discarded only after the service says it
  is finished, and the resume point after a restart is the last message
  discarded in order, so unfinished messages are redelivered.
- *No duplicate input within a process:* the bookmark store drops a
  redelivered message it has already handed out (per publisher, by sequence),
  e.g. after a reconnect resubscribes from an earlier point.
- *No loss on output:* a publish returns once the message is in the
  file-backed publish store (even if the connection is down at that moment);
  it is re-sent until the broker persists it.
- *No duplicate output from re-sends:* re-sent publishes keep their sequence
  numbers and the broker drops those it already persisted for this client
  name, so ``amps.client_name`` must stay the same across restarts (the
  default, ``ampsflow-<service>-<hostname>``, does).
- *Window:* if the daemon is killed (``kill -9``, power loss) after an output
  reached the publish store but before the input's discard reached the
  bookmark store, the input is processed again after the restart and its
  output published a second time (at-least-once). The window is two local
  memory-mapped writes wide; the persister's de-duplication removes the
  repeat. The stores are memory-mapped files: they survive a process crash,
  and survive an operating-system crash only for pages the kernel wrote back.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import AMPS

from ampsflow.adapters.handoff import Handoff
from ampsflow.backoff import Backoff, BackoffPolicy
from ampsflow.config import AmpsConfig, read_secret
from ampsflow.errors import AmpsError, StartupError
from ampsflow.messaging import Received

logger = logging.getLogger(__name__)

_DATA_COMMANDS = frozenset({"p", "publish", "sow", "oof"})
_INITIAL_DELAY_S = 0.2
_QUEUE_POLL_S = 0.2
_SEEN_QUEUE_BOOKMARKS = 100_000
"""Queue bookmarks remembered per process to recognise a redelivery to this consumer."""


def default_client_name(service: str) -> str:
    """``ampsflow-<service>-<hostname>``: stable across restarts, unique per host."""
    return f"ampsflow-{service}-{socket.gethostname()}"


def _with_credentials(uri: str, user: str | None, password: str | None) -> str:
    if user is None:
        return uri
    parts = urllib.parse.urlsplit(uri)
    userinfo = urllib.parse.quote(user, safe="")
    if password is not None:
        userinfo += ":" + urllib.parse.quote(password, safe="")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def _redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class _Backoff:
    """AMPS reconnect delay strategy: the :mod:`ampsflow.backoff` policy, capped at
    ``amps.reconnect_max_delay_s``.

    The client calls :meth:`get_connect_wait_duration` before every attempt;
    the wait happens here, on an event, so that stopping interrupts it, and
    the client is told to wait 0 ms more.
    """

    def __init__(
        self,
        max_delay_s: float,
        interrupt: Callable[[], threading.Event | None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        policy = BackoffPolicy(initial_s=_INITIAL_DELAY_S, max_s=max(max_delay_s, _INITIAL_DELAY_S))
        self._backoff = Backoff(policy, rng=rng)
        self._interrupt = interrupt
        self._first = True

    def get_connect_wait_duration(self, uri: str) -> int:
        if self._first or uri == "DUMMY_URI":
            self._first = False
            return 0
        delay = self._backoff.next_delay()
        event = self._interrupt()
        if event is None:
            return int(delay * 1000)
        self._backoff.wait(event, delay)
        return 0

    def reset(self) -> None:
        self._first = True
        self._backoff.reset()


class _Chooser:
    """AMPS server chooser over ``amps.uris``; returns no URI once stopping."""

    def __init__(self, client: AmpsClient, uris: list[str]) -> None:
        self._client = client
        self._uris = uris
        self._index = 0
        self._error = ""

    def get_current_uri(self) -> str | None:
        if self._client.giving_up():
            self._error = "stopping"
            return None
        return self._uris[self._index]

    def get_current_authenticator(self) -> Any:
        return AMPS.DefaultAuthenticator()

    def report_failure(self, exception: Exception, info: dict[str, str]) -> None:
        uri = _redact(self._uris[self._index])
        self._error = f"{uri}: {exception}"
        if isinstance(exception, AMPS.AuthenticationException):
            self._client.authentication_failed(f"{uri}: {exception}")
            self._client.report(f"AMPS at {uri} refused the logon: {exception}", failed=True)
        else:
            self._client.report(f"cannot reach AMPS at {uri}: {exception}; retrying", failed=True)
        self._index = (self._index + 1) % len(self._uris)

    def report_success(self, info: dict[str, str]) -> None:
        self._client.report(f"connected to AMPS at {_redact(self._uris[self._index])}")

    def next(self) -> None:
        self._index = (self._index + 1) % len(self._uris)

    def get_error(self) -> str:
        return self._error


class AmpsClient:
    """One HAClient with a durable bookmark store and, optionally, publish store.

    Args:
        config: The ``amps`` section.
        service: Service name, for the default client name and log lines.
        state_dir: Directory for ``bookmarks.mmap`` and ``publish.store``
            (created if missing). ``None`` keeps both stores in memory: for
            clients that must not resume (tests and tools).
        stop: The service's stop event: before the first connection it ends
            the connection attempts.
        on_status: Called with a one-line status on every connection change
            and failure (from client threads; must be quick and thread-safe).
        publish_store: Keep outbound publishes in a durable publish store.
        queue_size: How many received messages may wait for the service; the
            client's receive thread blocks (flow control) when it is full.
    """

    def __init__(
        self,
        config: AmpsConfig,
        *,
        service: str,
        state_dir: Path | None,
        stop: threading.Event,
        on_status: Callable[[str], None] | None = None,
        publish_store: bool = False,
        queue_size: int = 1000,
    ) -> None:
        self.name = config.client_name or default_client_name(service)
        self._config = config
        self._stop = stop
        self._closing = threading.Event()
        self._on_status = on_status
        self._connected_once = False
        self._connected = False
        self._auth_failure: str | None = None
        self._reconnects = 0
        self._on_reconnect: list[Callable[[], None]] = []
        self._received: Handoff[Received] = Handoff(queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._has_publish_store = publish_store
        password = read_secret(config.password_file) if config.password_file else None
        uris = [_with_credentials(u, config.user, password) for u in config.all_uris]

        self._client = AMPS.HAClient(self.name, no_store=True)
        self._bookmarks: Any
        try:
            if state_dir is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
                self._bookmarks = AMPS.MMapBookmarkStore(str(state_dir / "bookmarks.mmap"))
            else:
                self._bookmarks = AMPS.MemoryBookmarkStore()
            self._client.set_bookmark_store(self._bookmarks)
            if publish_store:
                store: Any = (
                    AMPS.PublishStore(str(state_dir / "publish.store"))
                    if state_dir is not None
                    else AMPS.MemoryPublishStore(10000)
                )
                self._client.set_publish_store(store)
        except (OSError, AMPS.AMPSException) as exc:
            raise StartupError(f"cannot open the AMPS stores in {state_dir}: {exc}") from exc
        self._client.set_server_chooser(_Chooser(self, uris))
        self._client.set_reconnect_delay_strategy(
            _Backoff(config.reconnect_max_delay_s, self._wait_event)
        )
        self._client.set_timeout(int(config.command_timeout_s * 1000))
        self._client.set_heartbeat(config.heartbeat_s)
        self._client.add_connection_state_listener(self._on_connection_state)
        self._client.set_failed_write_handler(self._on_failed_write)
        self._client.set_exception_listener(self._on_exception)

    # -- connection -------------------------------------------------------------------

    def giving_up(self) -> bool:
        """Whether connection attempts should stop.

        True when closing, or before the first connection when stopping or when
        the broker refused the credentials (an operator error, not an outage).
        """
        return self._closing.is_set() or (
            not self._connected_once and (self._stop.is_set() or self._auth_failure is not None)
        )

    def authentication_failed(self, detail: str) -> None:
        """The broker refused the logon; before the first connection this ends the attempts."""
        if not self._connected_once:
            self._auth_failure = detail

    def _wait_event(self) -> threading.Event | None:
        return self._stop if not self._connected_once else self._closing

    def report(self, status: str, *, failed: bool = False) -> None:
        """Log ``status`` and pass it to ``on_status``."""
        (logger.warning if failed else logger.info)("%s", status)
        if self._on_status is not None:
            try:
                self._on_status(status)
            except Exception:
                logger.exception("status callback failed")

    def add_reconnect_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on a client thread) after each re-established connection."""
        self._on_reconnect.append(callback)

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._connected

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and re-established."""
        return self._reconnects

    def _on_connection_state(self, state: object) -> None:
        up = bool(state) if isinstance(state, bool | int) else False
        if up:
            if self._connected_once and not self._connected:
                self._reconnects += 1
                for callback in self._on_reconnect:
                    try:
                        callback()
                    except Exception:
                        logger.exception("reconnect listener failed")
            self._connected = True
        elif self._connected:
            self._connected = False
            if self._connected_once and not self._closing.is_set():
                self.report("disconnected from AMPS; reconnecting", failed=True)

    def _on_failed_write(self, message: Any, reason: str) -> None:
        topic = message.get_topic() if message is not None else "?"
        self.report(f"AMPS did not store a publish to {topic}: {reason}", failed=True)

    def _on_exception(self, exc: BaseException) -> None:
        logger.warning("AMPS client error: %s", exc)

    def connect(self) -> None:
        """Connect and log on, retrying with backoff until it works.

        Raises:
            StartupError: when the stop event was set first, or the broker
                refused the logon (bad credentials).
        """
        try:
            self._client.connect_and_logon()
        except AMPS.AuthenticationException as exc:
            raise StartupError(f"AMPS refused the logon of {self.name}: {exc}") from exc
        except AMPS.AMPSException as exc:
            if self._auth_failure is not None:
                raise StartupError(
                    f"AMPS refused the logon of {self.name} at {self._auth_failure}"
                ) from exc
            if self.giving_up():
                raise StartupError("stopped before connecting to AMPS") from exc
            raise StartupError(f"cannot connect to AMPS: {exc}") from exc
        self._connected_once = True
        self._connected = True

    # -- consumer ---------------------------------------------------------------------

    def subscribe(self, topic: str, *, sub_id: str | None = None) -> None:
        """Place a bookmark subscription on ``topic`` resuming from the bookmark store.

        ``sub_id`` (default: ``topic``) names the subscription in the store, so
        keep it stable across restarts. Delivered messages go to :meth:`receive`.

        Raises:
            AmpsError: when the broker rejects the subscription.
        """
        sid = sub_id or topic
        try:
            self._client.bookmark_subscribe(
                self._on_message,
                topic,
                AMPS.Client.Bookmarks.MOST_RECENT,
                sub_id=sid,
                timeout=int(self._config.command_timeout_s * 1000),
            )
        except AMPS.AMPSException as exc:
            raise AmpsError(f"cannot subscribe to {topic}: {exc}") from exc
        logger.info(
            "subscribed to %s (sub_id %s) resuming after %s",
            topic,
            sid,
            self._bookmarks.get_most_recent(sid) or "the beginning",
        )

    def subscribe_queue(self, topic: str, *, max_backlog: int, sub_id: str | None = None) -> None:
        """Subscribe to the AMPS message queue ``topic``, holding up to ``max_backlog`` leases.

        Delivered messages go to :meth:`receive`; :meth:`discard` acknowledges them. The
        client re-places the subscription after a reconnect.

        Raises:
            AmpsError: when the broker rejects the subscription.
        """
        sid = sub_id or topic
        command = (
            AMPS.Command("subscribe")
            .set_topic(topic)
            .set_sub_id(sid)
            .set_options(f"max_backlog={max_backlog}")
        )
        try:
            self._client.execute_async(command, self._on_message)
        except AMPS.AMPSException as exc:
            raise AmpsError(f"cannot subscribe to queue {topic}: {exc}") from exc
        logger.info("subscribed to queue %s (sub_id %s, max_backlog %d)", topic, sid, max_backlog)

    def _on_message(self, message: Any) -> None:
        if message.get_command() not in _DATA_COMMANDS:
            return
        bookmark = message.get_bookmark() or ""
        queued = bool(message.get_lease_period())
        redelivered = False
        if queued and bookmark:
            seen = self._seen
            redelivered = bookmark in seen
            seen[bookmark] = None
            seen.move_to_end(bookmark)
            if len(seen) > _SEEN_QUEUE_BOOKMARKS:
                seen.popitem(last=False)
        received = Received(
            topic=message.get_topic() or "",
            body=message.get_data_raw() or b"",
            correlation_id=message.get_correlation_id() or None,
            bookmark=bookmark,
            sub_id=message.get_sub_id() or "",
            seq_no=0 if queued else int(message.get_bookmark_seq_no() or 0),
            queued=queued,
            redelivered=redelivered,
        )
        self._received.put(received, self._closing, _QUEUE_POLL_S)

    def receive(self, timeout_s: float) -> Received | None:
        """The next received message, or ``None`` after ``timeout_s`` without one."""
        return self._received.get(timeout_s)

    def pending(self) -> int:
        """Messages received but not yet taken by :meth:`receive`."""
        return len(self._received)

    def discard(self, message: Received) -> None:
        """Mark ``message`` finished.

        A bookmark subscription's message is discarded in the bookmark store (local,
        sends nothing); a queue message is acknowledged to the queue (through the publish
        store when there is one, so the ack survives a crash of this process).

        A queue ack that cannot be stored or sent is logged: the message's lease then
        runs out and it is delivered again, so nothing is lost.
        """
        if not message.queued:
            self._bookmarks.discard(message.sub_id, message.seq_no)
            return
        try:
            self._client.ack(message.topic, message.bookmark)
        except AMPS.DisconnectedException:
            if self._has_publish_store:
                logger.debug("queue ack of %s stored while disconnected", message.bookmark)
            else:
                logger.warning(
                    "queue ack of %s not sent (disconnected); it is delivered again",
                    message.bookmark,
                )
        except AMPS.AMPSException as exc:
            logger.warning(
                "queue ack of %s failed (%s); it is delivered again", message.bookmark, exc
            )

    # -- publisher --------------------------------------------------------------------

    def publish(self, topic: str, body: bytes | str, correlation_id: str | None) -> int:
        """Store, then send, one message; returns its publish-store sequence number.

        With a publish store the message is safe once this returns, even when
        the connection is down (it is sent after the reconnect).

        Raises:
            AmpsError: when the message could not be stored (or, without a
                publish store, could not be sent).
        """
        data = body.decode("utf-8") if isinstance(body, bytes) else body
        try:
            return int(self._client.publish(topic, data, correlation_id=correlation_id) or 0)
        except AMPS.DisconnectedException as exc:
            if self._has_publish_store:
                # The client stores before it sends: the reconnect re-sends it.
                logger.debug("publish to %s stored while disconnected", topic)
                return 0
            raise AmpsError(f"cannot publish to {topic}: {exc}") from exc
        except AMPS.AMPSException as exc:
            raise AmpsError(f"cannot publish to {topic}: {exc}") from exc

    def unpersisted(self) -> int:
        """Publishes stored but not yet acknowledged as persisted by the broker."""
        return int(self._client.get_unpersisted_count())

    def flush(self, timeout_s: float) -> bool:
        """Wait until every stored publish is persisted by the broker; false on timeout."""
        try:
            self._client.publish_flush(max(1, int(timeout_s * 1000)))
        except AMPS.TimedOutException:
            return False
        except AMPS.AMPSException as exc:
            logger.warning("publish flush failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        """Disconnect and stop reconnecting (idempotent). Stores stay on disk."""
        self._closing.set()
        try:
            self._client.close()
        except AMPS.AMPSException as exc:
            logger.debug("closing the AMPS client: %s", exc)
