"""The bounded hand-off from an AMPS client's receive thread to the service's loop.

``queue.Queue`` does this with a Python lock and ``Condition`` on both sides: its
``put`` and ``get`` were ~14% of the processor's CPU at burst with tracing on
(``py-spy``, BENCHMARKS.md). :class:`Handoff` keeps ``queue.SimpleQueue`` (in C)
for the items and adds the bound: a ``put`` that finds ``capacity`` items
waiting blocks until the loop has taken them down to half of that, so a slow
service still holds back the receive thread (and, through TCP, the broker)
instead of growing without limit. Only a full hand-off touches the Python
``Event`` that wakes a blocked ``put``, and it wakes it once per half a
hand-off, not once per item: at burst the processor is the pipeline's slowest
stage, its hand-off is always full, and waking the receive thread for every
message took 7% of the processor's GIL time (``py-spy``, BENCHMARKS.md).

One consumer; one producer at a time (a client has one receive thread). With
more producers the bound is approximate: each may add one item past it.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    """Up to ``capacity`` items waiting, first in first out."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._items: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._capacity = capacity
        self._refill_at = capacity // 2
        self._space = threading.Event()
        self._space.set()

    def put(self, item: T, closing: threading.Event, poll_s: float) -> bool:
        """Add ``item``; false if ``closing`` is set first.

        A full hand-off waits until the loop has taken it down to half (or for
        ``poll_s`` at a time, to look at ``closing``).
        """
        items = self._items
        while items.qsize() >= self._capacity:
            self._space.clear()
            if items.qsize() < self._capacity:  # taken between the check and the clear
                break
            if closing.is_set():
                return False
            self._space.wait(poll_s)
        items.put(item)
        return True

    def get(self, timeout_s: float) -> T | None:
        """The oldest item, or ``None`` after ``timeout_s`` without one."""
        try:
            item = self._items.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if not self._space.is_set() and self._items.qsize() <= self._refill_at:
            self._space.set()
        return item

    def __len__(self) -> int:
        return self._items.qsize()
