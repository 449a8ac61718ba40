"""What the devbroker counts: one :class:`Counters` per broker, logged at shutdown and
every minute.

The broker owns it; sessions, transports and queues add to it through the ``counters``
member of the interface they know the broker by.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counters:
    """What the broker has seen since it started (logged at shutdown and every minute)."""

    connections_opened: int = 0
    connections_closed: int = 0
    logons: int = 0
    auth_failures: int = 0
    frames_in: int = 0
    published: int = 0
    duplicates: int = 0
    delivered: int = 0
    replayed: int = 0
    commits: int = 0
    commit_failures: int = 0
    subscriptions: int = 0
    nacks: int = 0
    malformed_frames: int = 0
    oversized_frames: int = 0
    unsupported_commands: int = 0
    slow_consumers: int = 0
    heartbeat_timeouts: int = 0
    internal_errors: int = 0
    filter_errors: int = 0
    fell_behind: int = 0
    oversized_headers: int = 0
    bad_logons: int = 0
    logon_timeouts: int = 0
    connections_refused: int = 0
    accept_errors: int = 0

    def as_text(self) -> str:
        """Return ``name=value`` pairs for a log line."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
