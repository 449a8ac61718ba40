"""The durable JSONL sink on real files: group commit, repair, dedupe, reopen, failures."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ampsflow.adapters.sink import FILE_MODE, JsonlSink, OsSyscalls, PendingLine
from ampsflow.core.records import Provenance, build_line, dedupe_key
from ampsflow.errors import SinkError

WHEN = datetime(2026, 11, 24, 16, 0, tzinfo=UTC)


def line(ident: str | None, seq: int, publisher: str = "7", pad: int = 0) -> PendingLine:
    """A pending line for message ``ident`` (no id when ``None``) at ``publisher|seq|``."""
    bookmark = f"{publisher}|{seq}|"
    message: dict[str, object] = {"processed": True, "pad": "x" * pad}
    if ident is not None:
        message["id"] = ident
    provenance = Provenance(
        trace_id="1" * 32, span_id="2" * 16, topic="external", bookmark=bookmark, persisted_at=WHEN
    )
    return PendingLine(build_line(message, provenance), dedupe_key(message, bookmark), bookmark)


def content(lines: list[PendingLine]) -> bytes:
    """The bytes a file holding exactly ``lines`` contains."""
    return b"".join(p.data for p in lines)


class CountingSyscalls(OsSyscalls):
    """Real system calls that count themselves."""

    def __init__(self) -> None:
        self.writes = 0
        self.syncs = 0

    def write(self, fd: int, data: memoryview) -> int:
        self.writes += 1
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        self.syncs += 1
        super().fdatasync(fd)


class FaultySyscalls(OsSyscalls):
    """Real system calls, except that the next write or sync can be made to fail.

    ``fail_sync`` lets the write reach the page cache and then fails the
    fdatasync, as EIO from a failing disk does. ``short_write_then`` writes
    half of the data and then raises, as a disk filling up mid-write does.
    """

    def __init__(self) -> None:
        self.fail_sync: int | None = None
        self.short_write_then: int | None = None
        self.max_write: int | None = None

    def write(self, fd: int, data: memoryview) -> int:
        if self.short_write_then is not None:
            code, self.short_write_then = self.short_write_then, None
            os.write(fd, data[: len(data) // 2])
            raise OSError(code, os.strerror(code))
        if self.max_write is not None:
            data = data[: self.max_write]
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self.fail_sync is not None:
            code, self.fail_sync = self.fail_sync, None
            raise OSError(code, os.strerror(code))
        super().fdatasync(fd)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "messages.jsonl"


@pytest.fixture
def sink(path: Path) -> Iterator[JsonlSink]:
    with JsonlSink(path) as opened:
        yield opened


class TestCommit:
    def test_lines_are_appended_in_order(self, sink: JsonlSink, path: Path) -> None:
        """Two batches land in the file in commit order."""
        first, second = [line("a", 1), line("b", 2)], [line("c", 3)]
        sink.commit(first)
        sink.commit(second)
        assert content(first + second) == path.read_bytes()

    def test_batch_is_one_write_and_one_sync(self, path: Path) -> None:
        """Group commit: a batch of many lines costs one write and one fdatasync."""
        calls = CountingSyscalls()
        with JsonlSink(path, syscalls=calls) as sink:
            sink.commit([line(str(i), i) for i in range(100)])
        expected = (1, 1)
        assert expected == (calls.writes, calls.syncs)

    def test_short_writes_are_continued(self, path: Path) -> None:
        """A write that takes only part of the batch is continued until all is written."""
        calls = FaultySyscalls()
        calls.max_write = 7
        batch = [line("a", 1), line("b", 2)]
        with JsonlSink(path, syscalls=calls) as sink:
            sink.commit(batch)
        assert content(batch) == path.read_bytes()

    def test_result_reports_lines_bytes_and_ordered_times(self, sink: JsonlSink) -> None:
        """The commit result counts the batch and orders write <= fsync start <= end."""
        batch = [line("a", 1), line("b", 2)]
        result = sink.commit(batch)
        expected = (2, len(content(batch)), True)
        actual = (
            result.lines,
            result.bytes,
            result.write_start_ns <= result.fsync_start_ns <= result.fsync_end_ns,
        )
        assert expected == actual

    def test_committed_keys_are_known(self, sink: JsonlSink) -> None:
        """After a commit, the batch's messages are recognised as persisted."""
        sink.commit([line("a", 1)])
        assert sink.contains("id:a", "9|1|")


class TestCreate:
    def test_new_file_gets_restricted_mode(self, sink: JsonlSink, path: Path) -> None:
        """A created file is owner-writable and group-readable only."""
        expected = FILE_MODE
        assert expected == path.stat().st_mode & 0o777

    def test_existing_file_is_appended_to(self, path: Path) -> None:
        """Opening an existing file keeps its lines and appends after them."""
        first, second = [line("a", 1)], [line("b", 2)]
        with JsonlSink(path) as sink:
            sink.commit(first)
        with JsonlSink(path) as sink:
            sink.commit(second)
        assert content(first + second) == path.read_bytes()

    def test_second_writer_is_refused(self, sink: JsonlSink, path: Path) -> None:
        """A second sink on the same file fails instead of interleaving lines."""
        with pytest.raises(SinkError, match="in use by another process"):
            JsonlSink(path).open()


class TestTornLine:
    def test_torn_tail_is_cut_to_last_newline(self, path: Path) -> None:
        """A partial last line is removed at open; whole lines stay."""
        whole = [line("a", 1), line("b", 2)]
        path.write_bytes(content(whole) + line("c", 3).data[:-9])
        with JsonlSink(path):
            pass
        assert content(whole) == path.read_bytes()

    def test_repair_is_counted_and_logged(
        self, path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The bytes dropped are counted and reported in a WARNING."""
        torn = line("c", 3).data[:-9]
        path.write_bytes(line("a", 1).data + torn)
        with caplog.at_level(logging.WARNING), JsonlSink(path) as sink:
            dropped = sink.stats.torn_bytes_dropped
        expected = (len(torn), True)
        assert expected == (dropped, f"dropped {len(torn)} bytes" in caplog.text)

    def test_file_without_any_newline_is_emptied(self, path: Path) -> None:
        """A file holding only a torn first line becomes empty."""
        path.write_bytes(line("a", 1).data[:-1])
        with JsonlSink(path):
            pass
        expected = b""
        assert expected == path.read_bytes()

    def test_torn_message_is_not_known(self, path: Path) -> None:
        """The message of a torn line is not treated as persisted, so its replay is written."""
        path.write_bytes(line("a", 1).data + line("b", 2).data[:-3])
        with JsonlSink(path) as sink:
            assert not sink.contains("id:b", "7|2|")

    def test_foreign_lines_are_counted_and_kept(self, path: Path) -> None:
        """Whole lines that are not records are counted, not removed."""
        original = line("a", 1).data + b"not json\n" + line("b", 2).data
        path.write_bytes(original)
        with JsonlSink(path) as sink:
            invalid = sink.stats.invalid_lines_seen
        assert (1, original) == (invalid, path.read_bytes())


class TestRepairProperty:
    @given(
        ids=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12, unique=True),
        data=st.data(),
    )
    @settings(max_examples=60, deadline=None)
    def test_any_torn_tail_leaves_exactly_the_whole_lines(
        self, ids: list[str], data: st.DataObject
    ) -> None:
        """Whatever prefix of the last line survived a crash, open keeps the whole lines only."""
        lines = [line(ident, i) for i, ident in enumerate(ids, start=1)]
        whole, torn = lines[:-1], lines[-1].data
        cut = data.draw(st.integers(min_value=0, max_value=len(torn) - 1))
        with tempfile.TemporaryDirectory(prefix="sink-prop-") as tmp:
            target = Path(tmp) / "m.jsonl"
            target.write_bytes(content(whole) + torn[:cut])
            with JsonlSink(target) as sink:
                known = [sink.contains(p.key, None) for p in lines]
            expected = (content(whole), [True] * len(whole) + [False])
            assert expected == (target.read_bytes(), known)


class TestDedupeAcrossRestart:
    def test_keys_survive_restart(self, path: Path) -> None:
        """A new sink on the same file recognises what an earlier one wrote."""
        with JsonlSink(path) as sink:
            sink.commit([line("a", 1), line("b", 2)])
        with JsonlSink(path) as sink:
            actual = [sink.contains(f"id:{k}", None) for k in "abc"]
        expected = [True, True, False]
        assert expected == actual

    def test_window_keeps_only_last_lines_keys(self, path: Path) -> None:
        """Only the last dedupe_window_lines keys are loaded at open."""
        with JsonlSink(path) as sink:
            sink.commit([line(str(i), i) for i in range(1, 11)])
        with JsonlSink(path, dedupe_window_lines=3) as sink:
            known = [i for i in range(1, 11) if sink.contains(f"id:{i}", None)]
        expected = [8, 9, 10]
        assert expected == known

    def test_high_water_covers_lines_beyond_window(self, path: Path) -> None:
        """A replay without id older than the window is still recognised by its bookmark."""
        with JsonlSink(path) as sink:
            sink.commit([line(None, i, pad=300_000) for i in range(1, 11)])
        with JsonlSink(path, dedupe_window_lines=3) as sink:
            actual = (sink.contains("bm:7|1|", "7|1|"), sink.contains("bm:7|11|", "7|11|"))
        expected = (True, False)
        assert expected == actual

    def test_scan_is_bounded_by_bytes(self, path: Path) -> None:
        """Only whole lines within the last dedupe_scan_bytes are loaded."""
        batch = [line(str(i), i) for i in range(1, 11)]
        with JsonlSink(path) as sink:
            sink.commit(batch)
        scan = len(batch[-1].data) * 2 + len(batch[-1].data) // 2
        with JsonlSink(path, dedupe_scan_bytes=scan) as sink:
            known = [i for i in range(1, 11) if sink.contains(f"id:{i}", None)]
        expected = [9, 10]
        assert expected == known

    def test_window_spans_chunks(self, path: Path) -> None:
        """Lines larger than the read chunk are loaded whole."""
        with JsonlSink(path) as sink:
            sink.commit([line(str(i), i, pad=700_000) for i in range(1, 6)])
        with JsonlSink(path, dedupe_window_lines=5) as sink:
            size = len(sink.index)
        expected = 5
        assert expected == size


class TestReopen:
    def test_new_lines_go_to_new_file_after_rename(self, sink: JsonlSink, path: Path) -> None:
        """After the file is moved and reopen() called, new lines go to a new file."""
        old, new = [line("a", 1)], [line("b", 2)]
        sink.commit(old)
        rotated = path.with_suffix(".jsonl.1")
        path.rename(rotated)
        sink.reopen()
        sink.commit(new)
        assert (content(old), content(new)) == (rotated.read_bytes(), path.read_bytes())

    def test_keys_of_rotated_file_are_still_known(self, sink: JsonlSink, path: Path) -> None:
        """A replay of a message in the rotated file is still recognised."""
        sink.commit([line("a", 1)])
        path.rename(path.with_suffix(".jsonl.1"))
        sink.reopen()
        assert sink.contains("id:a", None)

    def test_reopen_without_rename_appends(self, sink: JsonlSink, path: Path) -> None:
        """Reopening the same file keeps appending to it."""
        batch = [line("a", 1), line("b", 2)]
        sink.commit(batch[:1])
        sink.reopen()
        sink.commit(batch[1:])
        assert content(batch) == path.read_bytes()


class TestFailures:
    def test_failed_sync_raises_sink_error_from_oserror(self, path: Path) -> None:
        """A failing fdatasync raises SinkError chained from the OSError."""
        calls = FaultySyscalls()
        with JsonlSink(path, syscalls=calls) as sink:
            calls.fail_sync = errno.EIO
            with pytest.raises(SinkError, match="cannot fsync") as info:
                sink.commit([line("a", 1)])
        assert isinstance(info.value.__cause__, OSError)
        expected = errno.EIO
        assert expected == info.value.__cause__.errno

    def test_failed_batch_is_not_known(self, path: Path) -> None:
        """Nothing of a failed batch counts as persisted."""
        calls = FaultySyscalls()
        with JsonlSink(path, syscalls=calls) as sink:
            calls.fail_sync = errno.EIO
            with pytest.raises(SinkError):
                sink.commit([line("a", 1)])
            actual = (sink.contains("id:a", None), sink.stats.lines_committed)
        expected = (False, 0)
        assert expected == actual

    def test_retry_after_failed_sync_writes_batch_once(self, path: Path) -> None:
        """After a failed fsync the unsynced bytes are truncated, so the retry is not doubled."""
        calls = FaultySyscalls()
        durable, batch = [line("a", 1)], [line("b", 2), line("c", 3)]
        with JsonlSink(path, syscalls=calls) as sink:
            sink.commit(durable)
            calls.fail_sync = errno.EIO
            with pytest.raises(SinkError):
                sink.commit(batch)
            sink.commit(batch)
        assert content(durable + batch) == path.read_bytes()

    def test_retry_after_partial_write_writes_batch_once(self, path: Path) -> None:
        """A write that stopped halfway is truncated away before the retry."""
        calls = FaultySyscalls()
        batch = [line("a", 1), line("b", 2)]
        with JsonlSink(path, syscalls=calls) as sink:
            calls.short_write_then = errno.ENOSPC
            with pytest.raises(SinkError, match="cannot write"):
                sink.commit(batch)
            sink.commit(batch)
        assert content(batch) == path.read_bytes()

    def test_retry_after_failure_and_rename_goes_to_new_file(self, path: Path) -> None:
        """A failed batch retried after a rotation lands whole in the new file only."""
        calls = FaultySyscalls()
        durable, batch = [line("a", 1)], [line("b", 2)]
        with JsonlSink(path, syscalls=calls) as sink:
            sink.commit(durable)
            calls.fail_sync = errno.EIO
            with pytest.raises(SinkError):
                sink.commit(batch)
            rotated = path.with_suffix(".jsonl.1")
            path.rename(rotated)
            sink.reopen()
            sink.commit(batch)
        assert (content(durable), content(batch)) == (rotated.read_bytes(), path.read_bytes())

    def test_missing_directory_is_one_clear_error(self, tmp_path: Path) -> None:
        """A path in a directory that does not exist fails at open, naming the path."""
        target = tmp_path / "absent" / "messages.jsonl"
        with pytest.raises(SinkError, match=f"cannot open {target}: No such file or directory"):
            JsonlSink(target).open()

    def test_directory_as_path_is_one_clear_error(self, tmp_path: Path) -> None:
        """A path that is a directory fails at open."""
        with pytest.raises(SinkError, match="Is a directory"):
            JsonlSink(tmp_path).open()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, skipped when mounting is not permitted."""
    mount_point = tmp_path / f"tiny-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not available")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class TestDiskFull:
    def test_full_disk_raises_enospc(self, tiny_fs: Path) -> None:
        """A batch that does not fit raises SinkError from ENOSPC."""
        with JsonlSink(tiny_fs / "m.jsonl") as sink, pytest.raises(SinkError) as info:
            sink.commit([line(str(i), i, pad=10_000) for i in range(10)])
        assert isinstance(info.value.__cause__, OSError)
        expected = errno.ENOSPC
        assert expected == info.value.__cause__.errno

    def test_writing_resumes_without_loss_when_space_returns(self, tiny_fs: Path) -> None:
        """After space is freed, the retried batch is in the file exactly once."""
        filler = tiny_fs / "filler"
        filler.write_bytes(b"\0" * 40_000)
        target = tiny_fs / "m.jsonl"
        batch = [line(str(i), i, pad=5_000) for i in range(6)]
        with JsonlSink(target) as sink:
            with pytest.raises(SinkError):
                sink.commit(batch)
            filler.unlink()
            sink.commit(batch)
        assert content(batch) == target.read_bytes()
