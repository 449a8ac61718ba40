"""``ampsflow audit`` on real files: exit status and output forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ampsflow.cli import main


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    published = tmp_path / "published.txt"
    published.write_text("a\nb\n", encoding="utf-8")
    jsonl = tmp_path / "messages.jsonl"
    jsonl.write_bytes(b'{"id":"a","_ampsflow":{}}\n{"id":"b","_ampsflow":{}}\n')
    return published, jsonl


class TestAuditCommand:
    def test_clean_file_exits_zero(
        self, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A clean JSONL exits 0 and says so."""
        published, jsonl = files
        status = main(["audit", "--published", str(published), "--jsonl", str(jsonl)])
        expected = (0, True)
        assert expected == (status, "result:             clean" in capsys.readouterr().out)

    def test_duplicate_exits_one(self, files: tuple[Path, Path]) -> None:
        """A duplicated line exits 1."""
        published, jsonl = files
        with jsonl.open("ab") as f:
            f.write(b'{"id":"a","_ampsflow":{}}\n')
        expected = 1
        assert expected == main(["audit", "--published", str(published), "--jsonl", str(jsonl)])

    def test_json_output_is_one_object(
        self, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json prints the report as one JSON object."""
        published, jsonl = files
        jsonl.write_bytes(b'{"id":"a","_ampsflow":{}}\n')
        main(["audit", "--published", str(published), "--jsonl", str(jsonl), "--json"])
        data = json.loads(capsys.readouterr().out)
        expected = (False, ["b"])
        assert expected == (data["clean"], data["lost"])

    def test_missing_file_exits_two_with_one_line(
        self, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unreadable input exits 2 with one line naming the file."""
        published, _ = files
        missing = published.parent / "absent.jsonl"
        status = main(["audit", "--published", str(published), "--jsonl", str(missing)])
        err = capsys.readouterr().err
        expected = (2, 1, True)
        assert expected == (status, len(err.splitlines()), str(missing) in err)
