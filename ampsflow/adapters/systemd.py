"""systemd integration: readiness, status, watchdog and stop notifications.

Every call is a no-op when the process is not run by systemd (no
``NOTIFY_SOCKET``), so services call these unconditionally.
"""

from __future__ import annotations

import logging
import os
import time

import sdnotify

logger = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify(3) messages to the service manager."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None
        self.watchdog_interval_s = _watchdog_interval_s()
        self._last_watchdog = 0.0
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str = "") -> None:
        """Tell systemd startup is complete (``READY=1``), with an optional status."""
        self._send(f"READY=1\nMAINPID={os.getpid()}" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> None:
        """Set the free-form status shown by ``systemctl status`` (deduplicated)."""
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        """Announce a reload (``RELOADING=1`` with ``MONOTONIC_USEC``)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Announce that shutdown has begun (``STOPPING=1``)."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog, at most twice per ``WatchdogSec`` interval.

        Call this from the main work loop, never from a side thread: a wedged
        loop must stop the pings so systemd restarts the service.
        """
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval_s / 2:
            self._last_watchdog = now
            self._send("WATCHDOG=1")


def _watchdog_interval_s() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000
    except ValueError:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
