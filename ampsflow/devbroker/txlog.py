"""The devbroker's on-disk transaction log: every publish, in order, durable before its ack.

Layout: ``directory/`` holds segment files named by the position of their first record
(``00000000000000000001.log``), a ``LOCK`` file (one broker per directory) and, once
retention has deleted segments, ``retired.json`` (highest sequence per publisher and
highest client ``s`` per client name of deleted segments, so sequences keep increasing and
duplicate detection keeps working after retention).

Record format (little endian), one per publish::

    u32 payload length | u32 crc32(payload) | payload
    payload = u64 position | u64 publisher id | u64 sequence | i64 timestamp_us |
              u64 client_seq | u8 flags (1: has correlation id, 2: has client_seq) |
              u32 topic length | u32 correlation id length | u32 client name length |
              topic | correlation id | client name | body

A record whose length, checksum or position is wrong ends the segment: at :meth:`open` the
file is truncated there (a torn tail after a crash) and a WARNING says how many bytes were
dropped.

Threading: :meth:`TransactionLog.append` runs on the event-loop thread; :meth:`commit` may
run in a worker thread at the same time (group commit). :meth:`replay_start` and
:meth:`read` only read files and snapshots, so they may run on the loop or in a worker
thread (a bookmark lookup scans one segment, which can take a while for 64 MiB segments).
Appends go to an in-memory buffer that :meth:`commit` swaps out under a lock, then
writes and ``fdatasync``\\ s without holding it. Only one commit runs at a time.

Memory is bounded per segment, not per message: each segment keeps its first/last
position, timestamps, size, per-publisher / per-client-name high-water marks and a sparse
index (the position and offset of the first record in every :data:`INDEX_STRIDE` bytes), so
finding a position reads at most one stride of records, and finding a bookmark or a
timestamp scans within one segment.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, NamedTuple

from ampsflow.devbroker.bookmarks import ReplaySpec, format_bookmark, publisher_id
from ampsflow.errors import TransactionLogError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
SEGMENT_SUFFIX = ".log"
_SEGMENT_NAME = re.compile(r"(\d{20})\.log")
_HEADER = struct.Struct("<II")
_FIXED = struct.Struct("<QQQqQBIII")
_POSITION = struct.Struct("<Q")
_MAX_PAYLOAD = 1 << 30
_READ_BLOCK = 256 * 1024
_HAS_CID = 1
_HAS_CLIENT_SEQ = 2
_RETIRED = "retired.json"
_EMPTY: Mapping[int, int] = MappingProxyType({})
INDEX_STRIDE = 64 * 1024
"""Bytes of a segment per sparse-index point: reading from a position decodes no more than
this before the first record it returns."""


class LogEntry(NamedTuple):
    """One logged publish (a named tuple: replay builds one per record read, and a tuple
    is built several times faster than a frozen dataclass)."""

    position: int
    topic: str
    publisher_id: int
    sequence: int
    timestamp_us: int
    correlation_id: str | None
    client_name: str
    client_seq: int | None
    body: bytes

    @property
    def bookmark(self) -> str:
        """The entry's bookmark, ``<publisher_id>|<sequence>|``."""
        return format_bookmark(self.publisher_id, self.sequence)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`TransactionLog.open` found on disk."""

    segments: int
    entries: int
    first_position: int
    last_position: int
    truncated_bytes: int
    removed_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplayCursor:
    """Where a replay continues: the next position to read and the skip rule.

    ``segment`` and ``offset`` are a hint (the segment base and byte offset of the record at
    ``position``) that saves a scan; they are ignored when that segment is gone.
    """

    position: int
    after: Mapping[int, int] = field(default_factory=lambda: _EMPTY)
    segment: int = 0
    offset: int = 0


@dataclass(slots=True)
class _Marks:
    """High-water marks and bounds of a run of records (a batch or a segment)."""

    first_position: int = 0
    last_position: int = 0
    first_timestamp_us: int = 0
    last_timestamp_us: int = 0
    pub_low: dict[int, int] = field(default_factory=dict)
    pub_high: dict[int, int] = field(default_factory=dict)
    client_seq: dict[str, int] = field(default_factory=dict)

    def add(  # noqa: PLR0917 - called once per append; positional keeps the hot path cheap
        self, position: int, pub: int, seq: int, ts: int, name: str, cseq: int | None
    ) -> None:
        """Account for one record (positions arrive in increasing order)."""
        if not self.first_position:
            self.first_position = position
            self.first_timestamp_us = ts
        self.last_position = position
        self.last_timestamp_us = max(self.last_timestamp_us, ts)
        if pub not in self.pub_low:
            self.pub_low[pub] = seq
        self.pub_high[pub] = seq
        if cseq is not None and cseq > self.client_seq.get(name, 0):
            self.client_seq[name] = cseq

    def merge(self, later: _Marks) -> None:
        """Fold the marks of a run that follows this one into this one."""
        if not later.first_position:
            return
        if not self.first_position:
            self.first_position = later.first_position
            self.first_timestamp_us = later.first_timestamp_us
        self.last_position = later.last_position
        self.last_timestamp_us = max(self.last_timestamp_us, later.last_timestamp_us)
        for pub, low in later.pub_low.items():
            self.pub_low.setdefault(pub, low)
        self.pub_high.update(later.pub_high)
        for name, cseq in later.client_seq.items():
            if cseq > self.client_seq.get(name, 0):
                self.client_seq[name] = cseq


@dataclass(slots=True)
class _Segment:
    """One segment file and its sparse index."""

    base: int
    path: Path
    size: int = 0
    marks: _Marks = field(default_factory=_Marks)
    index_positions: list[int] = field(default_factory=list)
    """Positions of the indexed records (increasing); only durable records are indexed."""
    index_offsets: list[int] = field(default_factory=list)
    """Byte offsets of the indexed records: at least :data:`INDEX_STRIDE` apart."""

    def index(self, position: int, offset: int) -> None:
        """Index the record at ``position``/``offset`` if it starts a new stride."""
        offsets = self.index_offsets
        if not offsets or offset >= offsets[-1] + INDEX_STRIDE:
            self.index_positions.append(position)
            offsets.append(offset)

    def index_batch(self, first_position: int, start: int, records: list[bytes]) -> None:
        """Index a run of consecutive records written from offset ``start``."""
        offsets = list(itertools.accumulate(map(len, records), initial=start))
        end = offsets[-1]
        due = self.index_offsets[-1] + INDEX_STRIDE if self.index_offsets else 0
        while due < end:
            i = bisect.bisect_left(offsets, due)
            if i >= len(records):
                break
            self.index_positions.append(first_position + i)
            self.index_offsets.append(offsets[i])
            due = offsets[i] + INDEX_STRIDE

    def offset_of(self, position: int) -> int:
        """The offset of the last indexed record at or before ``position`` (0 if none)."""
        i = bisect.bisect_right(self.index_positions, position) - 1
        return self.index_offsets[i] if i >= 0 else 0


def _segment_path(directory: Path, base: int) -> Path:
    return directory / f"{base:020d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(  # noqa: PLR0917 - called once per append; positional keeps the hot path cheap
    position: int,
    pub: int,
    seq: int,
    ts: int,
    cid: str | None,
    cseq: int | None,
    topic_b: bytes,
    name_b: bytes,
    body: bytes,
) -> bytes:
    cid_b = cid.encode("utf-8") if cid is not None else b""
    flags = (_HAS_CID if cid is not None else 0) | (_HAS_CLIENT_SEQ if cseq is not None else 0)
    payload = b"".join(
        (
            _FIXED.pack(
                position,
                pub,
                seq,
                ts,
                cseq or 0,
                flags,
                len(topic_b),
                len(cid_b),
                len(name_b),
            ),
            topic_b,
            cid_b,
            name_b,
            body,
        )
    )
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: memoryview) -> LogEntry:
    pos, pub, seq, ts, cseq, flags, tl, cl, nl = _FIXED.unpack_from(payload)
    i = _FIXED.size
    topic = str(payload[i : i + tl], "utf-8")
    i += tl
    cid = str(payload[i : i + cl], "utf-8") if flags & _HAS_CID else None
    i += cl
    name = str(payload[i : i + nl], "utf-8")
    i += nl
    return LogEntry(
        pos,
        topic,
        pub,
        seq,
        ts,
        cid,
        name,
        cseq if flags & _HAS_CLIENT_SEQ else None,
        bytes(payload[i:]),
    )


def _records(f: IO[bytes], offset: int) -> Iterator[tuple[int, int, memoryview]]:
    """Yield ``(offset, next_offset, payload)`` of the valid records from ``offset`` on.

    Stops at end of file or at the first incomplete, oversized or corrupt record; the
    caller compares the last ``next_offset`` with the file size to tell which.
    """
    f.seek(offset)
    data = b""
    i = 0
    while True:
        if len(data) - i < _HEADER.size:
            block = f.read(_READ_BLOCK)
            if not block:
                return
            data = data[i:] + block
            i = 0
            continue
        length, crc = _HEADER.unpack_from(data, i)
        if length < _FIXED.size or length > _MAX_PAYLOAD:
            return
        end = i + _HEADER.size + length
        while len(data) < end:
            block = f.read(max(_READ_BLOCK, end - len(data)))
            if not block:
                return
            data = data[i:] + block
            end -= i
            i = 0
        payload = memoryview(data)[i + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            return
        yield offset, offset + (end - i), payload
        offset += end - i
        i = end


class TransactionLog:
    """Segmented, checksummed, group-committed append-only log (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 * MIB,
        retention_bytes: int | None = None,
        retention_age_s: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.retention_bytes = retention_bytes
        self.retention_age_s = retention_age_s
        self._clock = clock
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._pending = _Marks()
        self._last_position = 0
        self._durable_position = 0
        self._pub_high: dict[int, int] = {}
        self._names: dict[str, tuple[int, bytes]] = {}
        self._durable_client_seq: dict[str, int] = {}
        self._appended_client_seq: dict[str, int] = {}
        self._retired = _Marks()
        self._fd: int | None = None
        self._lock_file: IO[bytes] | None = None
        self._opened = False

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> RecoveryReport:
        """Create or recover the log; repair a torn tail.

        Raises:
            TransactionLogError: the directory cannot be created, written or locked, or a
                segment cannot be read.
        """
        if self._opened:
            raise TransactionLogError(f"transaction log {self.directory} is already open")
        try:
            created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            if created:
                _fsync_dir(self.directory.parent)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise TransactionLogError(
                    f"transaction log directory {self.directory} is not writable"
                )
            self._lock_file = (self.directory / "LOCK").open("ab")
        except OSError as exc:
            raise TransactionLogError(
                f"cannot use transaction log directory {self.directory}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise TransactionLogError(
                f"transaction log {self.directory} is in use by another process"
            ) from exc
        try:
            report = self._recover()
        except OSError as exc:
            self.close()
            raise TransactionLogError(
                f"cannot recover transaction log {self.directory}: {exc}"
            ) from exc
        self._opened = True
        return report

    def _recover(self) -> RecoveryReport:
        self._load_retired()
        bases = sorted(
            int(m.group(1))
            for p in self.directory.iterdir()
            if (m := _SEGMENT_NAME.fullmatch(p.name)) is not None
        )
        truncated = 0
        removed: list[str] = []
        entries = 0
        previous = self._retired.last_position
        for base in bases:
            seg = _Segment(base=base, path=_segment_path(self.directory, base))
            with seg.path.open("rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                end = 0
                for offset, nxt, payload in _records(f, 0):
                    pos, pub, seq, ts, cseq, flags, _tl, _cl, nl = _FIXED.unpack_from(payload)
                    if pos <= previous:
                        break
                    seg.index(pos, offset)
                    name = ""
                    if flags & _HAS_CLIENT_SEQ:
                        i = _FIXED.size + _tl + _cl
                        name = str(payload[i : i + nl], "utf-8")
                    seg.marks.add(
                        pos, pub, seq, ts, name, cseq if flags & _HAS_CLIENT_SEQ else None
                    )
                    previous = pos
                    end = nxt
                    entries += 1
            if end < file_size:
                dropped = file_size - end
                truncated += dropped
                logger.warning(
                    "transaction log %s: dropped %d bytes of incomplete or corrupt records "
                    "at offset %d",
                    seg.path,
                    dropped,
                    end,
                )
                os.truncate(seg.path, end)
                with seg.path.open("rb+") as f:
                    os.fsync(f.fileno())
            if end == 0:
                seg.path.unlink()
                removed.append(seg.path.name)
                continue
            seg.size = end
            self._segments.append(seg)
        if removed:
            _fsync_dir(self.directory)
        self._pub_high = dict(self._retired.pub_high)
        self._durable_client_seq = dict(self._retired.client_seq)
        for seg in self._segments:
            for pub, seq in seg.marks.pub_high.items():
                self._pub_high[pub] = max(seq, self._pub_high.get(pub, 0))
            for name, cseq in seg.marks.client_seq.items():
                if cseq > self._durable_client_seq.get(name, 0):
                    self._durable_client_seq[name] = cseq
        self._appended_client_seq = dict(self._durable_client_seq)
        last = self._segments[-1].marks.last_position if self._segments else 0
        self._last_position = self._durable_position = max(last, self._retired.last_position)
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
        if truncated:
            logger.warning(
                "transaction log %s: repaired torn tail, %d bytes dropped, last position %d",
                self.directory,
                truncated,
                self._last_position,
            )
        return RecoveryReport(
            segments=len(self._segments),
            entries=entries,
            first_position=self._segments[0].base if self._segments else 0,
            last_position=self._last_position,
            truncated_bytes=truncated,
            removed_files=tuple(removed),
        )

    def close(self) -> None:
        """Commit what is buffered, then release the files. Safe to call twice."""
        if self._opened:
            with contextlib.suppress(TransactionLogError):
                self.commit()
        self._opened = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------ writing

    def append(
        self,
        *,
        topic: str,
        client_name: str,
        correlation_id: str | None,
        body: bytes,
        client_seq: int | None,
        timestamp_us: int,
    ) -> LogEntry:
        """Buffer one publish and return its entry (not durable until :meth:`commit`).

        The publisher sequence is ``client_seq`` when given and above the publisher's
        highest sequence so far, otherwise that highest sequence + 1, so sequences strictly
        increase per publisher even when a client mixes both kinds of publishes.
        """
        if not self._opened:
            raise TransactionLogError(f"transaction log {self.directory} is not open")
        known = self._names.get(client_name)
        if known is None:
            known = (publisher_id(client_name), client_name.encode("utf-8"))
            self._names[client_name] = known
        pub, name_b = known
        high = self._pub_high.get(pub, 0)
        seq = client_seq if client_seq is not None and client_seq > high else high + 1
        topic_b = topic.encode("utf-8")
        with self._lock:
            position = self._last_position + 1
            self._buffer.append(
                _encode(
                    position,
                    pub,
                    seq,
                    timestamp_us,
                    correlation_id,
                    client_seq,
                    topic_b,
                    name_b,
                    body,
                )
            )
            self._pending.add(position, pub, seq, timestamp_us, client_name, client_seq)
            self._last_position = position
        self._pub_high[pub] = seq
        if client_seq is not None and client_seq > self._appended_client_seq.get(client_name, 0):
            self._appended_client_seq[client_name] = client_seq
        return LogEntry(
            position=position,
            topic=topic,
            publisher_id=pub,
            sequence=seq,
            timestamp_us=timestamp_us,
            correlation_id=correlation_id,
            client_name=client_name,
            client_seq=client_seq,
            body=body,
        )

    def commit(self) -> int:
        """Write the buffered records and ``fdatasync``; return the last durable position.

        Raises:
            TransactionLogError: the write or sync failed. The batch is put back in front
                of the buffer (the file is truncated back) so a later commit retries it.
        """
        with self._commit_lock:
            with self._lock:
                if not self._buffer:
                    return self._durable_position
                batch, self._buffer = self._buffer, []
                marks, self._pending = self._pending, _Marks()
            try:
                self._write(batch, marks)
            except OSError as exc:
                with self._lock:
                    self._buffer[:0] = batch
                    marks.merge(self._pending)
                    self._pending = marks
                raise TransactionLogError(
                    f"cannot write transaction log {self.directory}: {exc}"
                ) from exc
            for name, cseq in marks.client_seq.items():
                if cseq > self._durable_client_seq.get(name, 0):
                    self._durable_client_seq[name] = cseq
            self._durable_position = marks.last_position
            return self._durable_position

    def _write(self, batch: list[bytes], marks: _Marks) -> None:
        current = self._segments[-1] if self._segments else None
        new_segment = current is None or current.size >= self.segment_bytes
        if new_segment:
            seg = _Segment(
                base=marks.first_position, path=_segment_path(self.directory, marks.first_position)
            )
            fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        else:
            assert current is not None
            assert self._fd is not None
            seg, fd = current, self._fd
        data = b"".join(batch)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)
            if new_segment:
                _fsync_dir(self.directory)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, seg.size)
            if new_segment:
                os.close(fd)
                with contextlib.suppress(OSError):
                    seg.path.unlink()
            raise
        seg.index_batch(marks.first_position, seg.size, batch)
        seg.size += len(data)
        seg.marks.merge(marks)
        if new_segment:
            old_fd = self._fd
            self._fd = fd
            with self._lock:
                self._segments.append(seg)
            if old_fd is not None:
                os.close(old_fd)

    # ------------------------------------------------------------------ state

    @property
    def durable_position(self) -> int:
        """Position of the last record known to be on disk (0 when the log is empty)."""
        return self._durable_position

    @property
    def last_position(self) -> int:
        """Position of the last appended record, durable or not."""
        return self._last_position

    @property
    def first_position(self) -> int:
        """Position of the oldest retained record (``durable_position + 1`` when none)."""
        with self._lock:
            if self._segments:
                return self._segments[0].marks.first_position
        return self._durable_position + 1

    def highest_client_seq(self, client_name: str) -> int:
        """Highest durable client ``s`` logged for ``client_name``; 0 when none."""
        return self._durable_client_seq.get(client_name, 0)

    def highest_appended_client_seq(self, client_name: str) -> int:
        """Highest client ``s`` appended for ``client_name``, durable or still buffered."""
        return self._appended_client_seq.get(client_name, 0)

    def disk_bytes(self) -> int:
        """Total size of the retained segment files."""
        with self._lock:
            return sum(s.size for s in self._segments)

    # ------------------------------------------------------------------ replay

    def replay_start(self, spec: ReplaySpec) -> ReplayCursor:
        """Return the cursor where a subscribe's replay begins (see :mod:`.bookmarks`)."""
        if spec.now:
            return ReplayCursor(position=self._last_position + 1)
        oldest = self.first_position
        if spec.since_timestamp_us is not None:
            return self._find_timestamp(spec.since_timestamp_us, oldest)
        if spec.from_epoch or not spec.after:
            return ReplayCursor(position=oldest)
        # A list starts after its earliest bookmark and skips nothing after that point:
        # client bookmark stores list their discard point and the last persisted ack side
        # by side and rely on exactly this (see docs/devbroker.md, "Bookmark lists"). Only
        # a bookmark that is not in the log (retention, another broker) has no position;
        # replay then starts at the oldest entry and skips that publisher up to it.
        start: int | None = None
        unknown: dict[int, int] = {}
        for pub, seq in spec.after.items():
            found = self._find_bookmark(pub, seq)
            if found is None:
                unknown[pub] = seq
                start = oldest
            else:
                start = found + 1 if start is None else min(start, found + 1)
        assert start is not None
        skip = MappingProxyType(unknown) if unknown else _EMPTY
        return ReplayCursor(position=max(start, oldest), after=skip)

    def _snapshot(self) -> list[_Segment]:
        with self._lock:
            return list(self._segments)

    def _find_bookmark(self, pub: int, seq: int) -> int | None:
        """Return the position of the durable record ``pub``/``seq``, or None."""
        durable = self._durable_position
        for seg in self._snapshot():
            marks = seg.marks
            low, high = marks.pub_low.get(pub), marks.pub_high.get(pub)
            if low is None or high is None or not low <= seq <= high:
                continue
            for position, record_pub, record_seq, _ts, _off in self._heads(seg, durable):
                if record_pub == pub and record_seq >= seq:
                    return position if record_seq == seq else None
        return None

    def _find_timestamp(self, since_us: int, oldest: int) -> ReplayCursor:
        durable = self._durable_position
        for seg in self._snapshot():
            if seg.marks.last_timestamp_us < since_us:
                continue
            for position, _pub, _seq, ts, off in self._heads(seg, durable):
                if ts >= since_us:
                    return ReplayCursor(position=position, segment=seg.base, offset=off)
        return ReplayCursor(position=max(oldest, durable + 1))

    def _heads(self, seg: _Segment, up_to: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Yield ``(position, publisher id, sequence, timestamp_us, offset)`` of a segment's
        records up to ``up_to``, without decoding them (bookmark and timestamp lookups)."""
        fixed = _FIXED.unpack_from
        with seg.path.open("rb") as f:
            for off, _nxt, payload in _records(f, 0):
                position, pub, seq, ts = fixed(payload)[:4]
                if position > up_to:
                    return
                yield position, pub, seq, ts, off

    def _scan(
        self, seg: _Segment, offset: int, up_to: int, start: int = 0
    ) -> Iterator[tuple[LogEntry, int, int]]:
        """Yield ``(entry, offset, next_offset)`` of a segment's records from ``offset`` with
        positions from ``start`` to ``up_to`` (records before ``start`` are not decoded)."""
        position_of = _POSITION.unpack_from
        with seg.path.open("rb") as f:
            for off, nxt, payload in _records(f, offset):
                (position,) = position_of(payload)
                if position > up_to:
                    return
                if position < start:
                    continue
                yield _decode(payload), off, nxt

    def read(
        self, cursor: ReplayCursor, *, up_to: int, limit: int, max_bytes: int | None = None
    ) -> tuple[list[LogEntry], ReplayCursor]:
        """Return up to ``limit`` durable entries from ``cursor`` with position <= ``up_to``
        (fewer once their bodies add up to ``max_bytes``, but always at least one).

        Entries covered by the cursor's skip rule are left out. The returned cursor's
        ``position`` is the next position to read: replay is complete when it exceeds
        ``up_to`` (it may be empty before that only when nothing is left). When the cursor
        points into segments deleted by retention, reading resumes at the oldest retained
        entry.
        """
        up_to = min(up_to, self._durable_position)
        out: list[LogEntry] = []
        size = 0
        budget = max_bytes if max_bytes is not None else 1 << 62
        position = cursor.position
        after = cursor.after
        if position > up_to or limit <= 0:
            return out, cursor
        segments = self._snapshot()
        if not segments:
            return out, ReplayCursor(position=max(position, up_to + 1), after=after)
        position = max(position, segments[0].base)
        bases = [s.base for s in segments]
        index = max(0, bisect.bisect_right(bases, position) - 1)
        if cursor.segment == segments[index].base:
            offset = cursor.offset
        else:
            offset = segments[index].offset_of(position)
        seg_base, next_offset = segments[index].base, offset
        while index < len(segments):
            seg = segments[index]
            seg_base, next_offset = seg.base, offset
            try:
                for entry, _off, nxt in self._scan(seg, offset, up_to, position):
                    next_offset = nxt
                    position = entry.position + 1
                    seen = after.get(entry.publisher_id) if after else None
                    if seen is None or entry.sequence > seen:
                        out.append(entry)
                        size += len(entry.body)
                        if len(out) >= limit or size >= budget:
                            return out, ReplayCursor(position, after, seg_base, next_offset)
            except FileNotFoundError:
                logger.warning(
                    "transaction log segment %s was deleted by retention during replay",
                    seg.path,
                )
            if position > up_to:
                break
            index += 1
            offset = 0
            if index < len(segments):
                seg_base, next_offset = segments[index].base, 0
        position = max(position, up_to + 1)
        return out, ReplayCursor(position, after, seg_base, next_offset)

    # ------------------------------------------------------------------ retention

    def enforce_retention(self) -> int:
        """Delete whole closed segments beyond the byte or age limit; return bytes freed."""
        cutoff_us = (
            int((self._clock() - self.retention_age_s) * 1_000_000)
            if self.retention_age_s is not None
            else None
        )
        doomed: list[_Segment] = []
        with self._lock:
            total = sum(s.size for s in self._segments)
            for seg in self._segments[:-1]:
                too_big = self.retention_bytes is not None and total > self.retention_bytes
                too_old = cutoff_us is not None and seg.marks.last_timestamp_us < cutoff_us
                if not (too_big or too_old):
                    break
                doomed.append(seg)
                total -= seg.size
        if not doomed:
            return 0
        retired = _Marks()
        retired.merge(self._retired)
        for seg in doomed:
            retired.merge(seg.marks)
        try:
            self._save_retired(retired)
        except OSError as exc:
            raise TransactionLogError(f"cannot write {self.directory / _RETIRED}: {exc}") from exc
        self._retired = retired
        with self._lock:
            del self._segments[: len(doomed)]
        freed = 0
        for seg in doomed:
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot delete transaction log segment %s: %s", seg.path, exc)
                continue
            freed += seg.size
        _fsync_dir(self.directory)
        logger.info(
            "transaction log retention deleted %d segments (%d bytes), oldest position now %d",
            len(doomed),
            freed,
            self.first_position,
        )
        return freed

    def _save_retired(self, marks: _Marks) -> None:
        data = json.dumps(
            {
                "last_position": marks.last_position,
                "pub_high": {str(k): v for k, v in marks.pub_high.items()},
                "client_seq": marks.client_seq,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        tmp = self.directory / (_RETIRED + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.directory / _RETIRED)
        _fsync_dir(self.directory)

    def _load_retired(self) -> None:
        path = self.directory / _RETIRED
        if not path.exists():
            return
        try:
            raw = json.loads(path.read_bytes())
            marks = _Marks(
                first_position=1,
                last_position=int(raw["last_position"]),
                pub_high={int(k): int(v) for k, v in raw["pub_high"].items()},
                client_seq={str(k): int(v) for k, v in raw["client_seq"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransactionLogError(f"{path} is corrupt: {exc}") from exc
        self._retired = marks
