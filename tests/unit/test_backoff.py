"""The retry policy: capped, jittered, interruptible, deadline-bound (clock and random pinned)."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from ampsflow.backoff import Backoff, BackoffPolicy


class Highest(random.Random):
    """Always draws the top of the range: the wait is the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    """Always draws the bottom of the range: the wait is the ceiling less the jitter."""

    def uniform(self, a: float, b: float) -> float:
        return a


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingEvent(threading.Event):
    """An event that records how long it was asked to wait, and never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


POLICY = BackoffPolicy(initial_s=0.1, max_s=1.0)


class TestDelays:
    def test_ceiling_doubles_up_to_the_cap(self) -> None:
        """Each wait's ceiling is twice the one before, until the cap."""
        backoff = Backoff(POLICY, rng=Highest())
        assert [0.1, 0.2, 0.4, 0.8, 1.0, 1.0] == [
            pytest.approx(backoff.next_delay()) for _ in range(6)
        ]

    def test_jitter_shortens_a_wait_by_at_most_its_fraction(self) -> None:
        """With jitter 0.5 the shortest draw is half the ceiling."""
        backoff = Backoff(POLICY, rng=Lowest())
        assert [0.05, 0.1, 0.2, 0.4, 0.5, 0.5] == [
            pytest.approx(backoff.next_delay()) for _ in range(6)
        ]

    def test_jittered_waits_differ_between_runs(self) -> None:
        """Two runs with different random sources do not retry in lock step."""
        first = Backoff(POLICY, rng=random.Random(1))
        second = Backoff(POLICY, rng=random.Random(2))
        assert [first.next_delay() for _ in range(8)] != [second.next_delay() for _ in range(8)]

    def test_no_jitter_waits_exactly_the_ceiling(self) -> None:
        """Jitter 0 makes the waits deterministic."""
        backoff = Backoff(BackoffPolicy(initial_s=0.5, max_s=2.0, jitter=0.0))
        assert [0.5, 1.0, 2.0, 2.0] == [backoff.next_delay() for _ in range(4)]

    def test_thousands_of_retries_stay_at_the_cap(self) -> None:
        """A long outage does not overflow the exponent: the wait stays at the cap."""
        backoff = Backoff(BackoffPolicy(initial_s=0.1, max_s=30.0, multiplier=10.0), rng=Highest())
        for _ in range(5000):
            delay = backoff.next_delay()
        assert 30.0 == delay

    def test_reset_starts_over(self) -> None:
        """After a success the next failure waits the first delay again."""
        backoff = Backoff(POLICY, rng=Highest())
        for _ in range(5):
            backoff.next_delay()
        backoff.reset()
        assert (0, pytest.approx(0.1)) == (backoff.attempt, backoff.next_delay())


class TestWait:
    def test_a_set_event_ends_the_wait(self) -> None:
        """wait returns true at once when the interrupt event is set, however long the delay."""
        backoff = Backoff(BackoffPolicy(initial_s=3600.0, max_s=3600.0))
        event = threading.Event()
        event.set()
        assert backoff.wait(event)

    def test_an_unset_event_waits_the_next_delay(self) -> None:
        """Without an interrupt the wait is the next delay, and the caller retries."""
        event = RecordingEvent()
        backoff = Backoff(POLICY, rng=Highest())
        assert (False, False) == (backoff.wait(event), backoff.wait(event))
        assert [pytest.approx(0.1), pytest.approx(0.2)] == event.waits

    def test_a_logged_delay_is_the_one_waited(self) -> None:
        """A delay drawn with next_delay (to log it) is waited as is, not drawn again."""
        event = RecordingEvent()
        backoff = Backoff(POLICY, rng=random.Random(7))
        delay = backoff.next_delay()
        backoff.wait(event, delay)
        assert ([delay], 1) == (event.waits, backoff.attempt)


class TestDeadline:
    def test_no_deadline_never_expires(self) -> None:
        """Without a deadline the loop retries until interrupted."""
        clock = FakeClock()
        backoff = Backoff(POLICY, clock=clock)
        clock.now += 1e9
        assert (False, None) == (backoff.expired, backoff.remaining())

    def test_expires_when_the_deadline_passes(self) -> None:
        """expired turns true once the clock reaches the deadline, not before."""
        clock = FakeClock()
        backoff = Backoff(POLICY, clock=clock)
        backoff.deadline_in(2.0)
        clock.now += 1.5
        before = backoff.expired
        clock.now += 0.5
        assert (False, True) == (before, backoff.expired)

    def test_a_wait_ends_at_the_deadline(self) -> None:
        """No wait runs past the deadline: it is cut to the time left."""
        clock = FakeClock()
        event = RecordingEvent()
        backoff = Backoff(BackoffPolicy(initial_s=10.0, max_s=10.0), clock=clock)
        backoff.deadline_in(0.3)
        clock.now += 0.25
        backoff.wait(event)
        assert [pytest.approx(0.05)] == event.waits

    def test_the_first_deadline_counts(self) -> None:
        """Setting the deadline again (each retry of a stopping loop) does not move it."""
        clock = FakeClock()
        backoff = Backoff(POLICY, clock=clock)
        backoff.deadline_in(1.0)
        clock.now += 0.8
        backoff.deadline_in(1.0)
        assert pytest.approx(0.2) == backoff.remaining()

    def test_reset_clears_the_deadline(self) -> None:
        """A success ends the run: the next failure starts without a deadline."""
        clock = FakeClock()
        backoff = Backoff(POLICY, clock=clock)
        backoff.deadline_in(1.0)
        backoff.reset()
        clock.now += 5
        assert not backoff.expired


class TestAsyncSleep:
    def test_cancelling_the_task_ends_the_sleep(self) -> None:
        """The asyncio wait ends when its task is cancelled (the broker stopping)."""

        async def scenario() -> bool:
            backoff = Backoff(BackoffPolicy(initial_s=3600.0, max_s=3600.0))
            task = asyncio.create_task(backoff.sleep())
            await asyncio.sleep(0)
            task.cancel()
            try:
                await asyncio.wait_for(task, timeout=5)
            except asyncio.CancelledError:
                return True
            return False

        assert asyncio.run(scenario())

    def test_sleep_ends_at_the_deadline(self) -> None:
        """An expired deadline makes the asyncio wait return at once."""
        clock = FakeClock()
        backoff = Backoff(BackoffPolicy(initial_s=3600.0, max_s=3600.0), clock=clock)
        backoff.deadline_in(0.0)
        asyncio.run(asyncio.wait_for(backoff.sleep(), timeout=5))
        assert 1 == backoff.attempt


class TestPolicy:
    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"initial_s": 0.0, "max_s": 1.0}, "initial_s must be more than 0"),
            ({"initial_s": 2.0, "max_s": 1.0}, "max_s must be at least initial_s"),
            ({"initial_s": 1.0, "max_s": 1.0, "multiplier": 0.5}, "multiplier must be at least 1"),
            ({"initial_s": 1.0, "max_s": 1.0, "jitter": 1.5}, "jitter must be between 0 and 1"),
            ({"initial_s": float("nan"), "max_s": 1.0}, "initial_s must be more than 0"),
        ],
    )
    def test_out_of_range_numbers_are_refused(self, values: dict[str, float], message: str) -> None:
        """A policy that cannot back off sensibly is refused with what is wrong."""
        with pytest.raises(ValueError, match=message):
            BackoffPolicy(**values)
