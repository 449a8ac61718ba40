"""The persisted JSONL record format, and the index that keeps replays from duplicating it.

A persisted line is the message's own JSON object with one extra member,
``_ampsflow``, that records where the line came from::

    {"id":"m-1","processed":true,"CorrelationId":"00...01","_ampsflow":{"trace_id":"...",
     "span_id":"...","topic":"external","bookmark":"123|45|","persisted_at":"2026-...Z"}}

as one line ending in ``"\\n"``: the body's own text with ``_ampsflow`` appended
when it can be (see :func:`build_line`), else serialised compactly. A body that is not a JSON
object is not dropped: it is kept verbatim in ``_ampsflow.raw`` (with the
reason in ``_ampsflow.error``), so the file loses nothing.

Pure: no files, no clock (the time is passed in), no logging.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ampsflow.errors import RecordError

PROVENANCE_KEY = "_ampsflow"
"""The member of every persisted line that holds its provenance."""

_BOOKMARK_PREFIX = "bm:"

UPSTREAM_KEY = "upstream"
"""Where an ``_ampsflow`` member already present in an incoming message is kept."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Where a persisted line came from: its span, topic, bookmark and write time."""

    trace_id: str
    span_id: str
    topic: str
    bookmark: str
    persisted_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The ``_ampsflow`` object (``persisted_at`` as RFC 3339 UTC, microseconds)."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "topic": self.topic,
            "bookmark": self.bookmark,
            "persisted_at": format_timestamp(self.persisted_at),
        }


@dataclass(frozen=True, slots=True)
class Record:
    """A parsed line: the message members (without ``_ampsflow``) and the provenance."""

    message: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def bookmark(self) -> str | None:
        """The AMPS bookmark the line was written from, if recorded."""
        value = self.provenance.get("bookmark")
        return value if isinstance(value, str) else None

    @property
    def is_raw(self) -> bool:
        """True when the line keeps a body that was not a JSON object."""
        return "raw" in self.provenance or "raw_base64" in self.provenance

    def dedupe_key(self) -> str | None:
        """The key replays are recognised by (see :func:`dedupe_key`)."""
        return dedupe_key(None if self.is_raw else self.message, self.bookmark)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z``: ``2026-11-24T16:15:24.123456Z``.

    Raises:
        ValueError: for a naive datetime (its zone would be a guess).
    """
    if moment.tzinfo is None:
        raise ValueError("persisted_at must be timezone-aware")
    # isoformat is ~2x faster than strftime; in UTC it ends in "+00:00".
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


# Compact, and non-ASCII kept as UTF-8: the line is what was received, not an
# escaped copy of it. allow_nan=False keeps every line standard JSON. One encoder
# of each kind (``json.dumps`` with options builds one per call).
_ENCODERS = {
    ascii_only: json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False)
    for ascii_only in (False, True)
}


def _dumps(value: object, *, ensure_ascii: bool = False) -> str:
    return _ENCODERS[ensure_ascii].encode(value)


def _encode_line(value: object) -> bytes:
    try:
        return (_dumps(value) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\ud800") has no UTF-8 form; escaped
        # ASCII JSON keeps it exactly and still parses back to the same string.
        return (_dumps(value, ensure_ascii=True) + "\n").encode("ascii")


def build_line(
    message: Mapping[str, Any], provenance: Provenance, *, text: bytes | None = None
) -> bytes:
    """Serialise one persisted line: the message plus ``_ampsflow``, ending in ``\\n``.

    ``text``, when given, is the UTF-8 JSON text ``message`` was parsed from (by
    :func:`ampsflow.core.transform.parse_body`'s rules). The line is then that
    text with ``,"_ampsflow":{...}`` put before its closing brace: the same JSON
    value as encoding ``message`` again, with the members kept byte for byte as
    received, for less (3.7 instead of 4.5 µs for a 200-byte mark, BENCHMARKS.md).
    A text with a line break in it (pretty-printed JSON) or with an ``_ampsflow``
    member is encoded again.

    An ``_ampsflow`` member already present in ``message`` (for example a record
    fed back from another pipeline) is kept as ``_ampsflow.upstream``, never
    overwritten.

    Raises:
        RecordError: when the message cannot be serialised as standard JSON.
    """
    if text is not None and PROVENANCE_KEY not in message:
        line = _splice(text, bool(message), provenance)
        if line is not None:
            return line
    body = dict(message)
    meta = provenance.to_json()
    if PROVENANCE_KEY in body:
        meta[UPSTREAM_KEY] = body.pop(PROVENANCE_KEY)
    body[PROVENANCE_KEY] = meta
    try:
        return _encode_line(body)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"message cannot be serialised as JSON: {exc}") from exc


def _splice(text: bytes, members: bool, provenance: Provenance) -> bytes | None:
    """``text`` (a JSON object with ``members`` or none) with ``_ampsflow`` appended, or
    None when it has a line break or does not end in ``}``."""
    if b"\n" in text or b"\r" in text:
        return None
    head = text.rstrip(b" \t")
    if not head.endswith(b"}"):
        return None
    head = head[:-1].rstrip(b" \t")
    meta = _dumps(provenance.to_json()).encode("utf-8")
    return b"".join((head, b',"_ampsflow":' if members else b'"_ampsflow":', meta, b"}\n"))


def build_raw_line(raw: bytes | str, error: str, provenance: Provenance) -> bytes:
    """Serialise a body that is not a JSON object, kept verbatim so nothing is lost.

    The line is ``{"_ampsflow": {..., "error": ERROR, "raw": TEXT}}``. Bytes that
    are not UTF-8 are kept as ``raw_base64`` instead of ``raw``.
    """
    meta = provenance.to_json()
    meta["error"] = error
    if isinstance(raw, bytes):
        try:
            meta["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            meta["raw_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        meta["raw"] = raw
    return _encode_line({PROVENANCE_KEY: meta})


def parse_line(line: bytes | str) -> Record:
    """Parse one persisted line (with or without its ``\\n``).

    Raises:
        RecordError: when the line is not a JSON object with an ``_ampsflow`` object.
    """
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RecordError(f"not a JSON object: {type(value).__name__}")
    meta = value.pop(PROVENANCE_KEY, None)
    if not isinstance(meta, dict):
        raise RecordError(f"no {PROVENANCE_KEY} object")
    return Record(value, meta)


def dedupe_key(message: Mapping[str, Any] | None, bookmark: str | None) -> str | None:
    """The key a persisted message is recognised by when it is delivered again.

    The message's ``id`` when it has one (a processor that re-publishes after a
    crash gives the same message a new bookmark, so only the id recognises it),
    else the AMPS bookmark. ``None`` when there is neither.
    """
    if message is not None and "id" in message and message["id"] is not None:
        ident = message["id"]
        # A string id is used as is; any other JSON value by its JSON text under
        # another prefix, so the id 7 and the id "7" stay distinct.
        if isinstance(ident, str):
            return "id:" + ident
        # NaN and Infinity are allowed here: the key only has to be stable.
        return "idv:" + json.dumps(ident, separators=(",", ":"), sort_keys=True)
    if bookmark:
        return _BOOKMARK_PREFIX + bookmark
    return None


def parse_bookmark(bookmark: str | None) -> tuple[str, int] | None:
    """Split an AMPS message bookmark ``PUBLISHER|SEQUENCE|`` into its parts.

    Returns ``None`` for anything else (lists, timestamps, epoch).
    """
    if not bookmark:
        return None
    parts = bookmark.split("|")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2]):
        return None
    publisher, sequence = parts[0], parts[1]
    if not publisher.isdigit() or not sequence.isdigit():
        return None
    return publisher, int(sequence)


class DedupeIndex:
    """Remembers what is already persisted, in bounded memory, so replays are skipped.

    Two parts:

    * the dedupe keys of the most recent ``max_keys`` persisted lines;
    * the highest bookmark sequence persisted per publisher.

    A message is already persisted when its key is among the recent keys. A
    message without an ``id`` (its key is its bookmark) is also persisted when
    its bookmark's sequence is at or below its publisher's high-water mark: a
    publisher's sequences only increase in delivery order and lines are written
    in delivery order. Messages with an ``id`` are judged by the id alone: the
    id is what recognises a processor's re-publish after a crash (same id, new
    bookmark), and a broker whose log was reset restarts a store-less
    publisher's sequences, which must not make new messages look old.

    Why the window suffices: the persister discards a message from its bookmark
    store only after its line is fsync'd, so the store's resume point never lies
    after the last durable line, and a resubscribe replays only what came after
    that point: the messages in flight at the crash (at most a batch or two),
    plus whatever the processor re-published. Both are far inside a window of
    many batches.
    """

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._high: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def high_water(self) -> dict[str, int]:
        """A copy of the highest persisted sequence per publisher."""
        return dict(self._high)

    def contains(self, key: str | None, bookmark: str | None) -> bool:
        """Whether a message with this key and bookmark is already persisted."""
        if key is not None and key in self._keys:
            return True
        if key is not None and not key.startswith(_BOOKMARK_PREFIX):
            return False
        parsed = parse_bookmark(bookmark)
        if parsed is None:
            return False
        publisher, sequence = parsed
        high = self._high.get(publisher)
        return high is not None and sequence <= high

    def is_beyond_window(self, key: str | None, bookmark: str | None) -> bool:
        """True when only the high-water mark (not the recent keys) knows the message."""
        return (key is None or key not in self._keys) and self.contains(key, bookmark)

    def add(self, key: str | None, bookmark: str | None) -> None:
        """Record one persisted line (call in file order)."""
        if key is not None:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        parsed = parse_bookmark(bookmark)
        if parsed is not None:
            publisher, sequence = parsed
            if sequence > self._high.get(publisher, -1):
                self._high[publisher] = sequence

    def add_records(self, records: Iterable[Record]) -> None:
        """Record persisted lines in file order."""
        for record in records:
            self.add(record.dedupe_key(), record.bookmark)
