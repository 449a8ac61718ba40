"""The receive thread's hand-off to the service loop: order, the bound, and closing."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ampsflow.adapters.handoff import Handoff


def test_items_come_out_in_the_order_they_went_in() -> None:
    handoff: Handoff[int] = Handoff(10)
    never = threading.Event()
    for i in range(5):
        assert handoff.put(i, never, 0.01)
    assert len(handoff) == 5
    assert [handoff.get(0.01) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert handoff.get(0.01) is None


def test_a_full_handoff_holds_the_producer_until_the_loop_takes_one() -> None:
    handoff: Handoff[int] = Handoff(2)
    never = threading.Event()
    handoff.put(1, never, 0.01)
    handoff.put(2, never, 0.01)
    done = threading.Event()

    def produce() -> None:
        handoff.put(3, never, 0.01)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not done.wait(0.2), "a put into a full hand-off returned"
    assert len(handoff) == 2
    assert handoff.get(0.1) == 1
    assert done.wait(2), "the put did not resume once there was room"
    producer.join()
    assert [handoff.get(0.1), handoff.get(0.1)] == [2, 3]


def test_a_blocked_producer_is_woken_once_half_the_handoff_is_taken() -> None:
    """Not once per item: the receive thread wakes once per half a hand-off."""
    handoff: Handoff[int] = Handoff(10)
    never = threading.Event()
    for i in range(10):
        handoff.put(i, never, 0.01)
    done = threading.Event()
    producer = threading.Thread(target=lambda: (handoff.put(10, never, 60.0), done.set()))
    producer.start()
    time.sleep(0.05)
    taken = [handoff.get(0.1) for _ in range(4)]
    assert not done.wait(0.2), "woken before half the hand-off was taken"
    taken.append(handoff.get(0.1))
    assert done.wait(2), "not woken once half the hand-off was taken"
    producer.join()
    taken += [handoff.get(0.1) for _ in range(6)]
    assert taken == list(range(11))


def test_closing_releases_a_blocked_producer_without_adding_its_item() -> None:
    handoff: Handoff[int] = Handoff(1)
    closing = threading.Event()
    handoff.put(1, closing, 0.01)
    results: list[bool] = []
    producer = threading.Thread(target=lambda: results.append(handoff.put(2, closing, 0.01)))
    producer.start()
    time.sleep(0.05)
    closing.set()
    producer.join(2)
    assert results == [False]
    assert len(handoff) == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Handoff(0)


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(1, 8),
    count=st.integers(0, 300),
    consumer_pauses=st.lists(st.sampled_from([0.0, 0.0, 0.0001, 0.001]), min_size=1, max_size=20),
)
def test_a_producer_thread_and_a_slow_loop_lose_nothing_and_keep_the_bound(
    capacity: int, count: int, consumer_pauses: list[float]
) -> None:
    """Any capacity and consumer timing: every item arrives once, in order, never over the bound."""
    handoff: Handoff[int] = Handoff(capacity)
    never = threading.Event()
    producer = threading.Thread(target=lambda: [handoff.put(i, never, 0.005) for i in range(count)])
    producer.start()
    taken: list[int] = []
    most_waiting = 0
    while len(taken) < count:
        most_waiting = max(most_waiting, len(handoff))
        item = handoff.get(2.0)
        assert item is not None, f"stalled after {len(taken)} of {count}"
        taken.append(item)
        pause = consumer_pauses[len(taken) % len(consumer_pauses)]
        if pause:
            time.sleep(pause)
    producer.join(2)
    assert taken == list(range(count))
    assert most_waiting <= capacity
    assert handoff.get(0.001) is None
