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
from typing import Any

import pytest

from ampsflow.devbroker import txlog
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
        assert [e.position for e in publish(log, 3)] == [1, 2, 3]

    def test_commit_returns_the_durable_position(self, log: TransactionLog) -> None:
        """commit() makes everything appended durable and says up to where."""
        publish(log, 4)
        assert (log.durable_position, log.commit(), log.durable_position) == (0, 4, 4)

    def test_uncommitted_entries_are_not_read(self, log: TransactionLog) -> None:
        """read() never returns entries beyond the durable position."""
        publish(log, 2)
        log.commit()
        publish(log, 3)
        entries, _ = log.read(ReplayCursor(position=1), up_to=log.last_position, limit=100)
        assert [e.position for e in entries] == [1, 2]

    def test_read_honours_limit(self, log: TransactionLog) -> None:
        """read() returns at most ``limit`` entries and a cursor to continue from."""
        publish(log, 10)
        log.commit()
        first, cursor = log.read(ReplayCursor(position=1), up_to=10, limit=4)
        second, _ = log.read(cursor, up_to=10, limit=4)
        assert (
            [e.position for e in first],
            [e.position for e in second],
        ) == ([1, 2, 3, 4], [5, 6, 7, 8])

    def test_read_honours_max_bytes(self, log: TransactionLog) -> None:
        """read() stops once the bodies add up to ``max_bytes``, but returns at least one."""
        written = publish(log, 6)
        log.commit()
        size = len(written[0].body)
        first, cursor = log.read(ReplayCursor(position=1), up_to=6, limit=100, max_bytes=2 * size)
        tiny, _ = log.read(cursor, up_to=6, limit=100, max_bytes=1)
        assert ([e.position for e in first], [e.position for e in tiny]) == ([1, 2], [3])

    def test_sequences_count_per_publisher(self, log: TransactionLog) -> None:
        """Without a client ``s`` each publisher gets its own counter from 1."""
        a = publish(log, 2, client="a")
        b = publish(log, 1, client="b")
        assert [e.sequence for e in a + b] == [1, 2, 1]

    def test_client_seq_is_the_sequence(self, log: TransactionLog) -> None:
        """A publisher's ``s`` is used as its sequence."""
        entries = publish(log, 2, client_seq=1795530538228000001)
        assert [e.sequence for e in entries] == [1795530538228000001, 1795530538228000002]

    def test_sequence_never_goes_back_when_mixing(self, log: TransactionLog) -> None:
        """A client ``s`` below the publisher's highest sequence yields highest + 1."""
        publish(log, 1, client_seq=100)
        assert publish(log, 1, client_seq=50)[0].sequence == 101

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
    def test_positions_and_sequences_continue(self, opener: Callable[..., TransactionLog]) -> None:
        """After close and reopen, positions and per-publisher sequences carry on."""
        first = opener()
        publish(first, 3)
        first.close()
        entry = publish(opener(), 1)[0]
        assert (entry.position, entry.sequence) == (4, 4)

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
        assert (
            second.highest_client_seq("a"),
            second.highest_client_seq("b"),
            second.highest_client_seq("unknown"),
        ) == (12, 0, 0)

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
        assert (
            before,
            log.highest_client_seq("a"),
            log.highest_appended_client_seq("a"),
        ) == (0, 7, 7)


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
        assert (report.entries, report.last_position, report.truncated_bytes) == (3, 3, 11)


CRASHING_PUBLISHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ampsflow.devbroker.txlog import TransactionLog

    log = TransactionLog(Path(sys.argv[1]), segment_bytes=8192)
    log.open()
    i = 0

    def publish_and_commit(n):
        global i
        for _ in range(n):
            log.append(topic="internal", client_name="crasher", correlation_id=None,
                       body=b'{"i":%d}' % i, client_seq=None, timestamp_us=i)
            i += 1
        return log.commit()

    print(publish_and_commit(int(sys.argv[2])), flush=True)
    while True:
        publish_and_commit(50)
    """
)


class TestCrash:
    @pytest.mark.slow
    def test_every_committed_record_survives_sigkill(self, tmp_path: Path) -> None:
        """A publisher killed mid-write loses nothing it had committed."""
        directory = tmp_path / "txlog"
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_PUBLISHER, str(directory), "500"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            durable = int(proc.stdout.readline())
            deadline = time.monotonic() + 30
            while len(list(directory.glob("*.log"))) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log = TransactionLog(directory)
        try:
            log.open()
            bodies = [e.body for e in replay(log, "0")][:durable]
        finally:
            log.close()
        assert [b'{"i":%d}' % i for i in range(durable)] == bodies


class TestSegments:
    def test_rollover_starts_a_file_named_by_its_first_position(self, log: TransactionLog) -> None:
        """Once a segment reaches segment_bytes, the next commit starts a new file."""
        log.segment_bytes = 1
        for _ in range(3):
            publish(log, 2)
            log.commit()
        assert [f"{p:020d}.log" for p in (1, 3, 5)] == segment_files(log)

    def test_reads_span_segments(self, log: TransactionLog) -> None:
        """Replay crosses segment boundaries in order."""
        log.segment_bytes = 1
        written = []
        for _ in range(4):
            written += publish(log, 3)
            log.commit()
        assert written == read_all(log, ReplayCursor(position=1), limit=2)

    def test_reopen_continues_in_the_last_segment(
        self, opener: Callable[..., TransactionLog]
    ) -> None:
        """After reopen, appends go to the last segment and everything reads back."""
        first = opener(segment_bytes=1)
        written = publish(first, 1)
        first.commit()
        written += publish(first, 1)
        first.close()
        second = opener()
        written += publish(second, 1)
        second.commit()
        assert (written, 2) == (replay(second, "0"), len(segment_files(second)))


class TestRetention:
    def fill(self, log: TransactionLog, segments: int, per_segment: int = 3) -> list[LogEntry]:
        """Write ``segments`` one-batch segments, a second apart in time."""
        log.segment_bytes = 1
        written = []
        for s in range(segments):
            written += publish(log, per_segment, ts_us=T0_US + s * 1_000_000)
            log.commit()
        return written

    def test_by_bytes_deletes_oldest_closed_segments(self, log: TransactionLog) -> None:
        """Segments beyond retention_bytes are deleted oldest first, whole."""
        written = self.fill(log, 4)
        per_segment = log.disk_bytes() // 4
        log.retention_bytes = per_segment * 2
        freed = log.enforce_retention()
        assert (per_segment * 2, written[6:]) == (freed, replay(log, "0"))

    def test_never_deletes_the_active_segment(self, log: TransactionLog) -> None:
        """Even a zero byte limit keeps the segment being written."""
        written = self.fill(log, 3)
        log.retention_bytes = 0
        log.enforce_retention()
        assert written[6:] == replay(log, "0")

    def test_by_age_uses_the_clock(self, opener: Callable[..., TransactionLog]) -> None:
        """Segments whose newest entry is older than retention_age_s are deleted."""
        clock = FakeClock(T0_US / 1_000_000)
        log = opener(retention_age_s=10, clock=clock)
        written = self.fill(log, 4)
        before = log.enforce_retention()
        clock.now += 11.5
        log.enforce_retention()
        assert (0, written[6:]) == (before, replay(log, "0"))

    def test_sequences_continue_after_retention_and_reopen(
        self, opener: Callable[..., TransactionLog]
    ) -> None:
        """Deleting segments does not reset positions, sequences or client ``s`` marks."""
        first = opener()
        publish(first, 3, client="gone", client_seq=40)
        self.fill(first, 2)
        first.retention_bytes = 0
        first.enforce_retention()
        first.close()
        second = opener()
        entry = publish(second, 1, client="gone")[0]
        assert (entry.position, entry.sequence, second.highest_client_seq("gone")) == (10, 43, 42)

    def test_bookmark_in_a_deleted_segment_starts_at_the_oldest(self, log: TransactionLog) -> None:
        """Replay after a bookmark that retention deleted starts at the oldest retained entry."""
        written = self.fill(log, 3)
        log.retention_bytes = 0
        log.enforce_retention()
        assert written[6:] == replay(log, written[1].bookmark)

    def test_replay_overtaken_by_retention_continues_at_the_oldest(
        self, log: TransactionLog
    ) -> None:
        """A replay whose next segment was deleted meanwhile resumes at the oldest entry."""
        written = self.fill(log, 3)
        first, cursor = log.read(ReplayCursor(position=1), up_to=9, limit=1)
        log.retention_bytes = 0
        log.enforce_retention()
        assert [*first, *written[6:]] == [*first, *read_all(log, cursor)]


class TestClosed:
    def test_append_after_close_is_refused(self, log: TransactionLog) -> None:
        """A closed log raises instead of buffering records that would never be written."""
        log.close()
        with pytest.raises(TransactionLogError, match="not open"):
            publish(log, 1)


class TestReplay:
    @pytest.fixture
    def two_publishers(self, log: TransactionLog) -> list[LogEntry]:
        """a1 b1 a2 b2 a3 b3, committed, one second apart."""
        out = []
        for i in range(3):
            out += publish(log, 1, client="a", client_seq=10 + i, ts_us=T0_US + 2 * i * 10**6)
            out += publish(log, 1, client="b", ts_us=T0_US + (2 * i + 1) * 10**6)
        log.commit()
        return out

    def test_epoch_replays_everything(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """``0`` replays the whole log."""
        assert two_publishers == replay(log, "0")

    def test_now_replays_nothing(self, log: TransactionLog, two_publishers: list[LogEntry]) -> None:
        """``0|1|`` starts after the last appended entry."""
        cursor = log.replay_start(ReplaySpec(now=True))
        assert (cursor.position, read_all(log, cursor)) == (7, [])

    def test_bookmark_resumes_after_that_message(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """``pub|seq|`` replays what came after that message, from every publisher."""
        assert two_publishers[3:] == replay(log, two_publishers[2].bookmark)

    def test_unknown_bookmark_skips_that_publisher_up_to_it(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """A bookmark not in the log replays from the start minus that publisher's messages."""
        b = [e for e in two_publishers if e.publisher_id == publisher_id("b")]
        assert b == replay(log, f"{publisher_id('a')}|15|")

    def test_list_replays_everything_after_its_earliest_bookmark(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """A list replays every entry after its earliest bookmark, from every publisher,
        even those a later-listed bookmark names (AMPS: "starts the subscription at the
        earliest bookmark in the list")."""
        a1, b1, a2, b2, a3, b3 = two_publishers
        assert [b1, a2, b2, a3, b3] == replay(log, f"{b2.bookmark},{a1.bookmark}")

    def test_list_with_epoch_starts_at_the_beginning(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """``0,pub|seq|`` replays the whole log: epoch is the earliest point."""
        assert two_publishers == replay(log, f"0,{two_publishers[3].bookmark}")

    def test_list_with_an_unknown_bookmark_skips_only_that_publisher(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """A listed bookmark not in the log starts replay at the oldest entry, skipping that
        publisher up to it; the known one skips nothing."""
        _a1, b1, _a2, b2, _a3, b3 = two_publishers
        listed = f"{publisher_id('a')}|15|,{b1.bookmark}"
        assert [b1, b2, b3] == replay(log, listed)

    def test_timestamp_replays_from_that_instant(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """A timestamp replays entries published at or after it."""
        instant = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(T0_US // 10**6 + 2))
        assert two_publishers[2:] == replay(log, instant)

    def test_timestamp_after_everything_replays_nothing(
        self, log: TransactionLog, two_publishers: list[LogEntry]
    ) -> None:
        """A timestamp later than the newest entry replays nothing."""
        assert replay(log, "29991231T235959Z") == []


class TestReadFromAPosition:
    """Reading from a bare position (a subscription that falls behind, a bookmark's
    replay start) seeks through the segment's sparse index instead of decoding the
    segment from its start."""

    def fill(self, log: TransactionLog, n: int, per_commit: int = 97) -> list[LogEntry]:
        out: list[LogEntry] = []
        while len(out) < n:
            out += publish(log, min(per_commit, n - len(out)))
            log.commit()
        return out

    def test_every_position_reads_the_same_entries(
        self, opener: Callable[..., TransactionLog]
    ) -> None:
        """From any position, after commits and after a reopen (index rebuilt by recovery),
        and across segments, a read returns exactly the entries from that position on."""
        log = opener(segment_bytes=256 * 1024)
        entries = self.fill(log, 9000)
        positions = [*range(1, 60), *range(1, 9001, 137), 8999, 9000]
        for p in positions:
            assert read_all(log, ReplayCursor(position=p), limit=50) == entries[p - 1 :], p
        log.close()
        reopened = opener(segment_bytes=256 * 1024)
        for p in positions:
            got, _ = reopened.read(ReplayCursor(position=p), up_to=9000, limit=3)
            assert got == entries[p - 1 : p + 2], p

    def test_reads_at_most_one_stride_before_the_position(
        self, log: TransactionLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        entries = self.fill(log, 20_000)
        per_stride = txlog.INDEX_STRIDE // (log.disk_bytes() // len(entries)) + 1
        scanned = [0]
        decoded = [0]
        records, decode = txlog._records, txlog._decode

        def counting_records(f: Any, offset: int) -> Iterator[tuple[int, int, memoryview]]:
            for record in records(f, offset):
                scanned[0] += 1
                yield record

        def counting_decode(payload: memoryview) -> LogEntry:
            decoded[0] += 1
            return decode(payload)

        monkeypatch.setattr(txlog, "_records", counting_records)
        monkeypatch.setattr(txlog, "_decode", counting_decode)
        got, _ = log.read(ReplayCursor(position=19_990), up_to=20_000, limit=5)
        assert got == entries[19_989:19_994]
        assert scanned[0] <= per_stride + 5 < 20_000 // 10
        # Records before the position are skipped without being decoded.
        assert decoded[0] == 5
