"""Bookmarks: the names the devbroker gives to logged messages, and what a subscribe asks for.

A bookmark is ``<publisher id>|<sequence>|``: the publisher id is a stable uint64 derived
from the publisher's client name (:func:`publisher_id`), the sequence strictly increases per
publisher (the publisher's own ``s`` when it sends one). Official client bookmark stores
remember the highest sequence seen per publisher and drop anything at or below it, so both
parts must be numeric and sequences must never go backwards.

A subscribe's ``bookmark`` (``bm``) header is parsed into a :class:`ReplaySpec`; values and
what the broker does with them (replay from the transaction log, then live):

``0``
    Epoch: replay every retained message.
``0|1|``
    Now: no replay, live only.
``pub|seq|``
    Resume after that message. Replay starts at the log position after that message; when
    the message is no longer in the log (retention) or never was, replay starts at the
    oldest retained message. In both cases messages of publisher ``pub`` with a sequence
    ``<= seq`` are skipped, so nothing the subscriber already saw is sent again.
``a|1|,b|9|`` or ``0,b|9|``
    A list, as the client bookmark stores send after a reconnect (their last discard point
    and the last persisted ack, side by side). As in AMPS, replay starts right after the
    *earliest* listed bookmark and delivers everything after it, whatever the publisher
    (the stores drop what they already handed out). ``0`` in the list means epoch. A listed
    bookmark that is not in the log has no position: replay then starts at the oldest
    retained message and skips only that publisher's messages with a sequence ``<=`` the
    listed one. A publisher listed twice keeps its highest sequence.
``YYYYMMDDTHHMMSS[.ffffff]Z``
    Timestamp (UTC): replay messages published at or after that instant.

Anything else (ranges ``[a:b]``, ``recent``, which clients resolve themselves, text) raises
:class:`~ampsflow.errors.BookmarkError`; the broker nacks with reason ``invalid bookmark``.
This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from ampsflow.errors import BookmarkError

UINT64_MAX = (1 << 64) - 1

EPOCH = "0"
"""The bookmark asking for the whole retained log."""

NOW = "0|1|"
"""The bookmark asking for live messages only."""

_TIMESTAMP = re.compile(r"(\d{8})T(\d{6})(?:\.(\d{1,6}))?Z")
_DECIMAL = re.compile(r"\d{1,20}")
_EMPTY: Mapping[int, int] = MappingProxyType({})


def publisher_id(client_name: str) -> int:
    """Return the stable, non-zero uint64 publisher id of ``client_name``.

    The first 8 bytes (big endian) of the BLAKE2b hash of the UTF-8 name; 0 is reserved for
    the epoch/now bookmarks and maps to 1.
    """
    digest = hashlib.blake2b(client_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def format_bookmark(publisher_id: int, sequence: int) -> str:
    """Return the wire form ``<publisher_id>|<sequence>|``."""
    return f"{publisher_id}|{sequence}|"


@dataclass(frozen=True, slots=True)
class ReplaySpec:
    """What a subscribe's bookmark asks the transaction log for (see the module docstring).

    ``after`` maps each listed publisher id to its listed sequence: the log starts replay
    after the earliest of those messages, and skips a publisher's messages up to its listed
    sequence only when that message is not in the log. ``since_timestamp_us`` is
    microseconds since the Unix epoch, UTC.
    """

    from_epoch: bool = False
    now: bool = False
    after: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    since_timestamp_us: int | None = None

    def skips(self, publisher: int, sequence: int) -> bool:
        """Return True when the message ``publisher``/``sequence`` is covered by ``after``."""
        seen = self.after.get(publisher)
        return seen is not None and sequence <= seen


def parse_bookmark(value: str) -> ReplaySpec:
    """Parse a subscribe's bookmark header value.

    Raises:
        BookmarkError: ``invalid bookmark: <what is wrong>`` for anything that is not epoch,
            now, a bookmark, a comma list of bookmarks (and ``0``) or a timestamp.
    """
    text = value.strip()
    if not text:
        raise BookmarkError("invalid bookmark: empty value")
    if text == EPOCH:
        return ReplaySpec(from_epoch=True)
    if text == NOW:
        return ReplaySpec(now=True)
    if text[0] in "[(":
        raise BookmarkError(f"invalid bookmark: ranges are not supported: {value!r}")
    if "," not in text and _TIMESTAMP.fullmatch(text):
        return ReplaySpec(since_timestamp_us=_parse_timestamp(text))
    from_epoch = False
    after: dict[int, int] = {}
    for raw in text.split(","):
        item = raw.strip()
        if item == EPOCH:
            from_epoch = True
            continue
        pub, seq = _parse_one(item, value)
        if pub == 0:
            # "0|0|" is another spelling of epoch; "0|1|" (now) means nothing inside a list.
            from_epoch = from_epoch or seq == 0
            continue
        if seq > after.get(pub, -1):
            after[pub] = seq
    if not after and not from_epoch:
        return ReplaySpec(now=True)
    return ReplaySpec(from_epoch=from_epoch, after=MappingProxyType(after))


def _parse_one(item: str, value: str) -> tuple[int, int]:
    """Parse ``pub|seq|`` (the trailing ``|`` optional) into two uint64 values."""
    parts = item.split("|")
    if len(parts) == 3 and parts[2] == "":
        parts = parts[:2]
    if len(parts) != 2 or not all(_DECIMAL.fullmatch(p) for p in parts):
        raise BookmarkError(f"invalid bookmark: {item!r} in {value!r} is not <pub>|<seq>|")
    pub, seq = int(parts[0]), int(parts[1])
    if pub > UINT64_MAX or seq > UINT64_MAX:
        raise BookmarkError(f"invalid bookmark: {item!r} does not fit in uint64")
    return pub, seq


def _parse_timestamp(text: str) -> int:
    """Return microseconds since the Unix epoch for ``YYYYMMDDTHHMMSS[.ffffff]Z``."""
    match = _TIMESTAMP.fullmatch(text)
    if match is None:  # pragma: no cover - callers match first
        raise BookmarkError(f"invalid bookmark: {text!r}")
    date, time_of_day, fraction = match.groups()
    try:
        moment = datetime.strptime(date + time_of_day, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError as exc:
        raise BookmarkError(f"invalid bookmark: {text!r} is not a valid date/time") from exc
    micros = int((fraction or "").ljust(6, "0"))
    return int(moment.timestamp()) * 1_000_000 + micros
