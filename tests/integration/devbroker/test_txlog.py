"""The devbroker transaction log on a real file system: durability, recovery, retention, replay."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ampsflow.devbroker.bookmarks import ReplaySpec, parse_bookmark, publisher_id
from ampsflow.devbroker.txlog import LogEntry, ReplayCursor, TransactionLog
from ampsflow.errors import TransactionLogError

T0_US = 1_795_530_538_000_000


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Callable[..., TransactionLog]]:
    """Open transaction logs in a fresh directory and always close them."""
    opened: list[TransactionLog] = []

    def open_log(**kwargs: object) -> TransactionLog:
        log = TransactionLog(tmp_path / "txlog", **kwargs)  # type: ignore[arg-type]
        log.open()
        opened.append(log)
        return log

    yield open_log
    for log in opened:
        log.close()


@pytest.fixture
def log(opener: Callable[..., TransactionLog]) -> TransactionLog:
    """An open, empty transaction log with default settings."""
    return opener()


def publish(
    log: TransactionLog,
    n: int,
    *,
    client: str = "pub-a",
    topic: str = "internal",
    client_seq: int | None = None,
    ts_us: int = T0_US,
) -> list[LogEntry]:
    """Append ``n`` publishes (bodies name their index) and return their entries."""
    out = []
    for i in range(n):
        out.append(
            log.append(
                topic=topic,
                client_name=client,
                correlation_id=f"cid-{i}" if i % 2 == 0 else None,
                body=f'{{"client":"{client}","i":{i}}}'.encode(),
                client_seq=None if client_seq is None else client_seq + i,
                timestamp_us=ts_us + i,
            )
        )
    return out


def read_all(log: TransactionLog, cursor: ReplayCursor, *, limit: int = 1000) -> list[LogEntry]:
    """Read from ``cursor`` to the durable position in chunks of ``limit``."""
    out: list[LogEntry] = []
    up_to = log.durable_position
    while cursor.position <= up_to:
        chunk, cursor = log.read(cursor, up_to=up_to, limit=limit)
        out.extend(chunk)
    return out


def replay(log: TransactionLog, bookmark: str) -> list[LogEntry]:
    """Everything a subscribe with ``bookmark`` is replayed."""
    return read_all(log, log.replay_start(parse_bookmark(bookmark)))


def segment_files(log: TransactionLog) -> list[str]:
    """Names of the segment files on disk, oldest first."""
    return sorted(p.name for p in log.directory.glob("*.log"))


class TestAppendCommitRead:
    def test_round_trip(self, log: TransactionLog) -> None:
        """Committed entries read back exactly as appended."""
        written = publish(log, 5)
        log.commit()
        assert written == replay(log, "0")

    def test_positions_start_at_one_and_increase(self, log: TransactionLog) -> None:
        """Positions are 1-based and consecutive."""
        assert [1, 2, 3] == [e.position for e in publish(log, 3)]

    def test_commit_returns_the_durable_position(self, log: TransactionLog) -> None:
        """commit() makes everything appended durable and says up to where."""
        publish(log, 4)
        assert (0, 4, 4) == (log.durable_position, log.commit(), log.durable_position)

    def test_uncommitted_entries_are_not_read(self, log: TransactionLog) -> None:
        """read() never returns entries beyond the durable position."""
        publish(log, 2)
        log.commit()
        publish(log, 3)
        entries, _ = log.read(ReplayCursor(position=1), up_to=log.last_position, limit=100)
        assert [1, 2] == [e.position for e in entries]

    def test_read_honours_limit(self, log: TransactionLog) -> None:
        """read() returns at most ``limit`` entries and a cursor to continue from."""
        publish(log, 10)
        log.commit()
        first, cursor = log.read(ReplayCursor(position=1), up_to=10, limit=4)
        second, _ = log.read(cursor, up_to=10, limit=4)
        assert ([1, 2, 3, 4], [5, 6, 7, 8]) == (
            [e.position for e in first],
            [e.position for e in second],
        )

    def test_sequences_count_per_publisher(self, log: TransactionLog) -> None:
        """Without a client ``s`` each publisher gets its own counter from 1."""
        a = publish(log, 2, client="a")
        b = publish(log, 1, client="b")
        assert [1, 2, 1] == [e.sequence for e in a + b]

    def test_client_seq_is_the_sequence(self, log: TransactionLog) -> None:
        """A publisher's ``s`` is used as its sequence."""
        entries = publish(log, 2, client_seq=1795530538228000001)
        assert [1795530538228000001, 1795530538228000002] == [e.sequence for e in entries]

    def test_sequence_never_goes_back_when_mixing(self, log: TransactionLog) -> None:
        """A client ``s`` below the publisher's highest sequence yields highest + 1."""
        publish(log, 1, client_seq=100)
        assert 101 == publish(log, 1, client_seq=50)[0].sequence

    def test_bookmark_names_publisher_and_sequence(self, log: TransactionLog) -> None:
        """An entry's bookmark is ``<publisher id>|<sequence>|``."""
        entry = publish(log, 1, client="a")[0]
        assert f"{publisher_id('a')}|1|" == entry.bookmark

    def test_commit_concurrent_with_appends_loses_nothing(self, log: TransactionLog) -> None:
        """A committer thread running while appends continue makes every entry durable once."""
        stop = threading.Event()

        def committer() -> None:
            while not stop.is_set():
                log.commit()

        worker = threading.Thread(target=committer)
        worker.start()
        try:
            publish(log, 3000)
        finally:
            stop.set()
            worker.join()
        log.commit()
        assert list(range(1, 3001)) == [e.position for e in replay(log, "0")]


class TestReopen:
    def test_positions_and_sequences_continue(
        self, opener: Callable[..., TransactionLog]
    ) -> None:
        """After close and reopen, positions and per-publisher sequences carry on."""
        first = opener()
        publish(first, 3)
        first.close()
        entry = publish(opener(), 1)[0]
        assert (4, 4) == (entry.position, entry.sequence)

    def test_close_commits_the_buffer(self, opener: Callable[..., TransactionLog]) -> None:
        """Entries appended before close() are on disk after reopen."""
        first = opener()
        written = publish(first, 3)
        first.close()
        assert written == replay(opener(), "0")

    def test_highest_client_seq_survives(self, opener: Callable[..., TransactionLog]) -> None:
        """The highest client ``s`` per client name is rebuilt from disk."""
        first = opener()
        publish(first, 3, client="a", client_seq=10)
        publish(first, 1, client="b")
        first.close()
        second = opener()
        assert (12, 0, 0) == (
            second.highest_client_seq("a"),
            second.highest_client_seq("b"),
            second.highest_client_seq("unknown"),
        )

    def test_second_opener_is_refused(self, opener: Callable[..., TransactionLog]) -> None:
        """Only one process or log object may hold a directory."""
        opener()
        with pytest.raises(TransactionLogError, match="in use"):
            opener()

    def test_unusable_directory_is_a_clear_error(self, tmp_path: Path) -> None:
        """A path that cannot be a directory raises TransactionLogError naming it."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        log = TransactionLog(blocker / "txlog")
        with pytest.raises(TransactionLogError, match=str(blocker)):
            log.open()


class TestHighestClientSeq:
    def test_counts_only_durable_publishes(self, log: TransactionLog) -> None:
        """Buffered publishes do not move the durable client ``s``; commit does."""
        publish(log, 1, client="a", client_seq=7)
        before = log.highest_client_seq("a")
        log.commit()
        assert (0, 7, 7) == (
            before,
            log.highest_client_seq("a"),
            log.highest_appended_client_seq("a"),
        )


class TestTornTail:
    def test_truncated_record_is_dropped(
        self, opener: Callable[..., TransactionLog], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A record cut in the middle is removed at open; earlier records stay readable."""
        first = opener()
        written = publish(first, 5)
        first.close()
        path = first.directory / segment_files(first)[0]
        size = path.stat().st_size
        os.truncate(path, size - 7)
        with caplog.at_level(logging.WARNING, logger="ampsflow.devbroker.txlog"):
            second = opener()
        assert (written[:4], True) == (
            replay(second, "0"),
            any("dropped" in r.getMessage() for r in caplog.records),
        )

    def test_garbage_after_the_last_record_is_dropped(
        self, opener: Callable[..., TransactionLog]
    ) -> None:
        """Bytes that are not a valid record are cut off; new records follow the valid ones."""
        first = opener()
        written = publish(first, 3)
        first.close()
        path = first.directory / segment_files(first)[0]
        with path.open("ab") as f:
            f.write(b"\x10\x00\x00\x00garbage-that-is-not-a-record" * 3)
        second = opener()
        more = publish(second, 1)
        second.commit()
        assert written + more == replay(second, "0")

    def test_corrupt_checksum_is_dropped(self, opener: Callable[..., TransactionLog]) -> None:
        """A record whose bytes changed fails its checksum and ends the log there."""
        first = opener()
        written = publish(first, 3)
        first.close()
        path = first.directory / segment_files(first)[0]
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
        assert written[:2] == replay(opener(), "0")

    def test_report_says_how_much_was_dropped(
        self, opener: Callable[..., TransactionLog], tmp_path: Path
    ) -> None:
        """The recovery report counts entries and dropped bytes."""
        first = opener()
        publish(first, 3)
        first.close()
        path = first.directory / segment_files(first)[0]
        with path.open("ab") as f:
            f.write(b"\xff" * 11)
        log = TransactionLog(tmp_path / "txlog")
        try:
            report = log.open()
        finally:
            log.close()
        assert (3, 3, 11) == (report.entries, report.last_position, report.truncated_bytes)
