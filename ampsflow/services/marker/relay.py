"""Forwarding span uploads to ``otlp_traces_upstream``, in the background.

:meth:`Forwarder.submit` never waits: it queues the upload (the bytes exactly
as received, with their Content-Type and Content-Encoding) or, when the queue
is at ``max_requests`` or ``max_bytes``, drops it and counts the drop. A few
worker tasks post the queue to the upstream. A connection error, a timeout,
or an answer of 429, 502, 503 or 504 is retried with the :mod:`ampsflow.backoff`
policy (0.5 s doubling to ``max_delay_s``, each wait drawn from its upper half)
until it succeeds, so an upstream that is down for a while only fills the
queue, and forwarding resumes by itself when it is back. Any other 4xx/5xx
answer is final: the upload is dropped and counted as rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

from ampsflow.backoff import Backoff, BackoffPolicy

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
INITIAL_DELAY_S = 0.5
WORKERS = 2


@dataclass(slots=True)
class ForwardCounters:
    """What forwarding did since startup."""

    forwarded: int = 0
    dropped_queue_full: int = 0
    retries: int = 0
    rejected: int = 0
    upstream_errors: int = 0
    upstream_timeouts: int = 0
    queued: int = 0
    queued_bytes: int = 0


@dataclass(slots=True)
class Forwarder:
    """The bounded queue of uploads and the tasks that forward it."""

    url: str
    session: Callable[[], aiohttp.ClientSession]
    timeout_s: float
    max_requests: int
    max_bytes: int
    max_delay_s: float
    counters: ForwardCounters = field(default_factory=ForwardCounters)
    _queue: deque[tuple[bytes, Mapping[str, str]]] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _failing: bool = False

    def submit(self, body: bytes, headers: Mapping[str, str]) -> bool:
        """Queue one upload; False (and counted) when the queue is full."""
        if (
            len(self._queue) >= self.max_requests
            or self.counters.queued_bytes + len(body) > self.max_bytes
        ):
            self.counters.dropped_queue_full += 1
            if (
                self.counters.dropped_queue_full == 1
                or self.counters.dropped_queue_full % 1000 == 0
            ):
                logger.warning(
                    "forward queue to %s is full (%d uploads, %d bytes): %d uploads dropped so far",
                    self.url,
                    len(self._queue),
                    self.counters.queued_bytes,
                    self.counters.dropped_queue_full,
                )
            return False
        self._queue.append((body, headers))
        self.counters.queued = len(self._queue)
        self.counters.queued_bytes += len(body)
        self._ready.set()
        return True

    def start(self) -> None:
        """Start the worker tasks."""
        self._tasks = [asyncio.create_task(self._work()) for _ in range(WORKERS)]

    async def stop(self) -> None:
        """Stop the workers; what is still queued is dropped (and logged)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue:
            logger.warning("stopping with %d span uploads not forwarded", len(self._queue))

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            body, headers = self._queue.popleft()
            self.counters.queued = len(self._queue)
            try:
                await self._deliver(body, headers)
            finally:
                self.counters.queued_bytes -= len(body)

    async def _deliver(self, body: bytes, headers: Mapping[str, str]) -> None:
        backoff = Backoff(
            BackoffPolicy(initial_s=INITIAL_DELAY_S, max_s=max(INITIAL_DELAY_S, self.max_delay_s))
        )
        while True:
            problem = await self._post(body, headers)
            if problem is None:
                self.counters.forwarded += 1
                if self._failing:
                    self._failing = False
                    logger.warning("OTLP upstream %s is accepting spans again", self.url)
                return
            if problem == "final":
                self.counters.rejected += 1
                return
            self.counters.retries += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "OTLP upstream %s: %s; retrying with backoff (spans queue meanwhile)",
                    self.url,
                    problem,
                )
            else:
                logger.debug("OTLP upstream %s: %s", self.url, problem)
            await backoff.sleep()

    async def _post(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        """None on success, ``final`` for a refusal, else the retryable problem."""
        try:
            async with self.session().post(
                self.url,
                data=body,
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            self.counters.upstream_timeouts += 1
            return f"no answer within {self.timeout_s:.1f} s"
        except aiohttp.ClientError as exc:
            self.counters.upstream_errors += 1
            return f"unavailable ({exc})"
        if status < 300:
            return None
        self.counters.upstream_errors += 1
        if status in RETRYABLE_STATUSES:
            return f"HTTP {status}"
        logger.warning("OTLP upstream %s refused an upload with HTTP %d; dropped", self.url, status)
        return "final"
