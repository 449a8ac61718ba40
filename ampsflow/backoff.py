"""The one retry policy of ampsflow: capped, jittered, interruptible, deadline-bound backoff.

Every loop that retries uses it: the processor's publish into the publish store, the
persister's commit of a batch, the AMPS client's reconnects and the devbroker's commit of
its transaction log. Each keeps its own numbers (:class:`BackoffPolicy`), and all follow
the same rules:

- **Capped exponential.** The ``n``-th wait (from 0) has the ceiling
  ``min(max_s, initial_s * multiplier ** n)``.
- **Jittered.** The wait is drawn uniformly from ``[ceiling * (1 - jitter), ceiling]``, so
  daemons that failed together do not retry in lock step.
- **Interruptible.** :meth:`Backoff.wait` waits on an event (the service's stop or force
  event), never in ``time.sleep``: setting the event ends the wait at once.
  :meth:`Backoff.sleep` is the asyncio form; cancelling its task ends it.
- **Deadline-bound.** With a deadline (:meth:`Backoff.deadline_in`), no wait runs past it
  and :attr:`Backoff.expired` tells the loop to give up.

The clock and the random source are parameters, so tests pin both.

Hand-written rather than ``tenacity`` or ``stamina``: both wrap a call in their own loop,
while two of these retries are not loops of ours (the AMPS client asks a strategy object
for each reconnect delay) and the others do work between attempts (spans, ``STATUS=``,
watchdog pings); both sleep in ``time.sleep``/``asyncio.sleep`` instead of on a stop event,
and tenacity draws its jitter from the global ``random`` module, so a test cannot pin it.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffPolicy:
    """How long to wait before each retry.

    Attributes:
        initial_s: Ceiling of the first wait.
        max_s: Ceiling of every wait (the cap); at least ``initial_s``.
        multiplier: Growth of the ceiling per retry; at least 1.
        jitter: Fraction of the ceiling the wait may fall short of, from 0 (no jitter)
            to 1 ("full jitter").

    Raises:
        ValueError: when a number is out of its range.
    """

    initial_s: float
    max_s: float
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"initial_s must be more than 0, got {self.initial_s!r}")
        if not self.max_s >= self.initial_s:
            raise ValueError(f"max_s must be at least initial_s, got {self.max_s!r}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (counted from 0)."""
        try:
            grown = self.initial_s * self.multiplier**attempt
        except OverflowError:
            grown = math.inf
        return min(self.max_s, grown)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered wait before retry number ``attempt``, drawn with ``rng``."""
        ceiling = self.ceiling(attempt)
        return rng.uniform(ceiling * (1 - self.jitter), ceiling)


class Backoff:
    """One run of retries under a :class:`BackoffPolicy` (see the module docstring).

    Args:
        policy: The delays.
        clock: Monotonic seconds, for deadlines (tests pass a fake).
        rng: Source of the jitter (tests pass a seeded or fake one).
    """

    __slots__ = ("_rng", "attempt", "clock", "deadline", "policy")

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.attempt = 0
        """Waits handed out since the start or the last :meth:`reset`."""
        self.deadline: float | None = None
        """Clock time after which no wait runs and :attr:`expired` is true; ``None``: never."""

    def next_delay(self) -> float:
        """The wait before the next retry; each call moves one step up the policy."""
        delay = self.policy.delay(self.attempt, self._rng)
        self.attempt += 1
        return delay

    def deadline_in(self, seconds: float) -> None:
        """Set the deadline ``seconds`` from now, unless one is already set."""
        if self.deadline is None:
            self.deadline = self.clock() + seconds

    def remaining(self) -> float | None:
        """Seconds left before the deadline (0 once it passed); ``None`` without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.clock())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed: the loop should stop retrying."""
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def _bounded(self, delay: float | None) -> float:
        wait = self.next_delay() if delay is None else delay
        remaining = self.remaining()
        return wait if remaining is None else min(wait, remaining)

    def wait(self, interrupt: threading.Event, delay: float | None = None) -> bool:
        """Wait before the next retry, ending early when ``interrupt`` is set.

        Args:
            interrupt: The event that ends the wait (the service's stop or force event).
            delay: The wait, when the caller drew it with :meth:`next_delay` already (to
                log it); by default the next one. Either way it ends at the deadline.

        Returns:
            True when ``interrupt`` is set (the caller should stop retrying).
        """
        return interrupt.wait(self._bounded(delay))

    async def sleep(self, delay: float | None = None) -> None:
        """The asyncio form of :meth:`wait`: cancelling the task ends the wait."""
        await asyncio.sleep(self._bounded(delay))

    def reset(self) -> None:
        """Start over from the first delay, without a deadline (after a success)."""
        self.attempt = 0
        self.deadline = None
