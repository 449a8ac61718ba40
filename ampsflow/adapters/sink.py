"""The durable JSONL sink: group commit, torn-line repair, replay dedupe, reopen.

One :class:`JsonlSink` owns one output file. The contract the persister relies
on:

* :meth:`JsonlSink.commit` appends a batch of lines with one ``write``, then
  ``fdatasync``; only when both succeed does it return, and only then are the
  lines durable. On any ``OSError`` it raises :class:`~ampsflow.errors.SinkError`
  and nothing in the batch counts as durable.
* After a failed write or fsync the page cache is not trusted (a failed fsync
  may have dropped the dirty pages and marked them clean, so a later fsync
  would "succeed" without writing them): the next commit first truncates the
  file back to the last durable size, syncs, and reopens it, then writes the
  whole batch again.
* At open, a torn last line (a crash in the middle of a write) is cut back to
  the last ``"\\n"`` with a WARNING; those bytes were never fsync'd, so their
  messages were never discarded from the bookmark store and will be replayed.
* At open, the dedupe keys of the last ``dedupe_window_lines`` lines (read
  from at most the last ``dedupe_scan_bytes`` of the file, so a file of huge
  lines cannot make the start slow or memory-hungry) and the highest bookmark
  per publisher among them are loaded into a bounded
  :class:`~ampsflow.core.records.DedupeIndex`; see there why replays cannot
  reach further back than that.
* :meth:`JsonlSink.reopen` (SIGHUP) closes the file and opens the path again,
  so the file can be moved away (logrotate: rename, ``create``, HUP) and a new
  one starts. The directory is fsync'd at every open. The index is kept.
* An exclusive ``flock`` stops a second persister from appending to the same
  file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ampsflow.core.records import DedupeIndex, parse_line
from ampsflow.errors import RecordError, SinkError

logger = logging.getLogger(__name__)

FILE_MODE = 0o640
"""Permissions of a newly created JSONL file (owner writes, group reads)."""

DEFAULT_SCAN_BYTES = 64 << 20
"""Default bound on how much of the file's end is read at open for dedupe keys."""

_TAIL_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PendingLine:
    """One line waiting to be committed, with what identifies it for dedupe."""

    data: bytes
    key: str | None
    bookmark: str | None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What a successful commit did, for spans and metrics.

    ``*_ns`` are wall-clock nanoseconds (``time.time_ns``), usable as span
    start and end times.
    """

    lines: int
    bytes: int
    write_start_ns: int
    fsync_start_ns: int
    fsync_end_ns: int


class Syscalls(Protocol):
    """The system calls the sink writes through (a seam for fault injection)."""

    def write(self, fd: int, data: memoryview) -> int:
        """Write some of ``data`` to ``fd``; return how many bytes were written."""

    def fdatasync(self, fd: int) -> None:
        """Flush ``fd``'s data (and the metadata needed to read it) to disk."""


class OsSyscalls:
    """The real system calls."""

    def write(self, fd: int, data: memoryview) -> int:
        """``os.write``."""
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        """``os.fdatasync``."""
        os.fdatasync(fd)


@dataclass(slots=True)
class SinkStats:
    """Counters of what the sink did since it was created."""

    lines_committed: int = 0
    bytes_committed: int = 0
    torn_bytes_dropped: int = 0
    invalid_lines_seen: int = 0
    failed_commits: int = 0
    reopens: int = 0


class JsonlSink:
    """An append-only JSONL file, fsync'd per batch. See the module docstring.

    Args:
        path: The file. Its directory must exist.
        dedupe_window_lines: How many of the most recent lines' keys to remember.
        dedupe_scan_bytes: How much of the file's end is read at open for them.
        syscalls: Where writes and syncs go (tests inject failures here).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        dedupe_window_lines: int = 100_000,
        dedupe_scan_bytes: int = DEFAULT_SCAN_BYTES,
        syscalls: Syscalls | None = None,
    ) -> None:
        self.path = Path(path)
        self._scan_bytes = dedupe_scan_bytes
        self.index = DedupeIndex(dedupe_window_lines)
        self.stats = SinkStats()
        self._syscalls: Syscalls = syscalls or OsSyscalls()
        self._fd: int | None = None
        self._durable_size = 0
        self._needs_recovery = False

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the file, repair a torn tail and load the dedupe keys.

        Raises:
            SinkError: when the file cannot be opened, locked, repaired or read;
                the message names the path and the operating-system error.
        """
        if self._fd is not None:
            return
        self._open_path()

    def close(self) -> None:
        """Close the file. Committed lines are already durable."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> JsonlSink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reopen(self) -> None:
        """Close the file and open the path again (after logrotate or a manual move).

        Call it between commits. The dedupe index is kept, so a message written
        to the old file is still recognised when it is replayed.

        Raises:
            SinkError: when the path cannot be opened; the old file is closed
                and the next :meth:`commit` tries to open the path again.
        """
        if self._needs_recovery and self._fd is not None:
            self._truncate_to_durable()
        self.close()
        self.stats.reopens += 1
        self._open_path()

    @property
    def is_open(self) -> bool:
        """Whether a file is open."""
        return self._fd is not None

    @property
    def durable_size(self) -> int:
        """Bytes of the current file known to be on disk."""
        return self._durable_size

    # -- dedupe ------------------------------------------------------------

    def contains(self, key: str | None, bookmark: str | None) -> bool:
        """Whether a message with this key and bookmark is already persisted."""
        return self.index.contains(key, bookmark)

    # -- writing -----------------------------------------------------------

    def commit(self, lines: Sequence[PendingLine]) -> CommitResult:
        """Append ``lines`` with one write and fdatasync them.

        Returns:
            Timings of the write and the sync; the lines are durable.

        Raises:
            SinkError: chained from the ``OSError``; nothing is durable and the
                caller retries the same batch (after a backoff).
        """
        if self._needs_recovery or self._fd is None:
            self._recover()
        assert self._fd is not None  # _recover opens or raises
        data = b"".join(line.data for line in lines)
        write_start = time.time_ns()
        fsync_start = write_start
        try:
            self._write_all(self._fd, data)
            fsync_start = time.time_ns()
            self._syscalls.fdatasync(self._fd)
        except OSError as exc:
            self._needs_recovery = True
            self.stats.failed_commits += 1
            step = "write" if fsync_start == write_start else "fsync"
            raise SinkError(
                f"cannot {step} {len(lines)} lines to {self.path}: {_describe(exc)}"
            ) from exc
        fsync_end = time.time_ns()
        self._durable_size += len(data)
        for line in lines:
            self.index.add(line.key, line.bookmark)
        self.stats.lines_committed += len(lines)
        self.stats.bytes_committed += len(data)
        return CommitResult(len(lines), len(data), write_start, fsync_start, fsync_end)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._syscalls.write(fd, view)
            if written <= 0:  # pragma: no cover - write(2) reports errors by raising
                raise OSError(errno.EIO, "write returned no progress")
            view = view[written:]

    # -- internals ---------------------------------------------------------

    def _recover(self) -> None:
        """Make the file hold exactly its durable bytes again, then reopen it."""
        if self._fd is not None:
            # If the truncate fails the file stays open and still needs
            # recovery: reopening it would read unsynced bytes as persisted.
            self._truncate_to_durable()
            self.close()
        self._open_path()
        self._needs_recovery = False

    def _truncate_to_durable(self) -> None:
        assert self._fd is not None
        try:
            size = os.fstat(self._fd).st_size
            if size != self._durable_size:
                logger.warning(
                    "dropping %d bytes of %s that were not confirmed on disk",
                    size - self._durable_size,
                    self.path,
                )
                os.ftruncate(self._fd, self._durable_size)
            self._syscalls.fdatasync(self._fd)
        except OSError as exc:
            raise SinkError(
                f"cannot truncate {self.path} back to {self._durable_size} bytes: {_describe(exc)}"
            ) from exc
        self._needs_recovery = False

    def _open_path(self) -> None:
        path = self.path
        try:
            try:
                fd = os.open(
                    path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                )
                created = True
            except FileExistsError:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                created = False
        except OSError as exc:
            raise SinkError(f"cannot open {path}: {_describe(exc)}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SinkError(f"{path} is in use by another process (flock)") from None
            # Always, not only when created here: after a rotation (logrotate
            # renames, then `create`s the new file) this makes both the rename
            # and the new entry durable before lines go into the new file.
            _fsync_directory(path.parent)
            info = os.fstat(fd)
            size = self._repair_tail(fd, info.st_size)
            self._load_index(fd, size)
        except OSError as exc:
            os.close(fd)
            raise SinkError(f"cannot prepare {path}: {_describe(exc)}") from exc
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._durable_size = size
        logger.debug("opened %s (%d bytes, created=%s)", path, size, created)

    def _repair_tail(self, fd: int, size: int) -> int:
        """Cut a torn last line back to the last newline; return the new size."""
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _TAIL_CHUNK_BYTES)
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        dropped = size - keep
        os.ftruncate(fd, keep)
        self._syscalls.fdatasync(fd)
        self.stats.torn_bytes_dropped += dropped
        logger.warning(
            "repaired torn last line of %s: dropped %d bytes after offset %d "
            "(never fsync'd, so they will be replayed)",
            self.path,
            dropped,
            keep,
        )
        return keep

    def _load_index(self, fd: int, size: int) -> None:
        """Feed the keys of the last ``max_keys`` lines to the index, in file order."""
        wanted = self.index.max_keys
        chunks: list[list[bytes]] = []
        count = 0
        end = size
        floor = max(0, size - self._scan_bytes)
        carry = b""
        while end > floor and count < wanted:
            start = max(floor, end - _TAIL_CHUNK_BYTES)
            data = os.pread(fd, end - start, start) + carry
            parts = data.split(b"\n")
            # parts[0] may be the end of a line that starts in an earlier chunk.
            carry = parts[0] if start > 0 else b""
            # At the scan floor parts[0] is the cut-off end of an older line.
            complete = parts[1:] if start > 0 else parts
            complete = [p for p in complete if p]
            chunks.append(complete)
            count += len(complete)
            end = start
        lines = [line for chunk in reversed(chunks) for line in chunk][-wanted:]
        invalid = 0
        for line in lines:
            try:
                record = parse_line(line)
            except RecordError:
                invalid += 1
                continue
            self.index.add(record.dedupe_key(), record.bookmark)
        if invalid:
            self.stats.invalid_lines_seen += invalid
            logger.warning(
                "%s: %d of the last %d lines are not ampsflow records; they are left as they are",
                self.path,
                invalid,
                len(lines),
            )


def _fsync_directory(directory: Path) -> None:
    """fsync a directory so a file created (or renamed) in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text
