"""Reconciliation of published ids against persisted JSONL lines."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from ampsflow.core.audit import format_report, parse_published_line, reconcile


def jsonl(*ids: object) -> list[bytes]:
    """Persisted lines for messages with these ids, each ending in a newline."""
    return [json.dumps({"id": i, "processed": True, "_ampsflow": {}}).encode() + b"\n" for i in ids]


def published(*ids: str) -> list[str]:
    """A published list, one id per line."""
    return [f"{i}\n" for i in ids]


class TestClean:
    def test_exact_match_is_clean(self) -> None:
        """Every id once, in order: clean."""
        report = reconcile(published("a", "b", "c"), jsonl("a", "b", "c"))
        expected = (True, 3, 3)
        assert expected == (report.is_clean, report.published, report.persisted_lines)

    def test_empty_inputs_are_clean(self) -> None:
        """Nothing published and nothing persisted is clean."""
        assert reconcile([], []).is_clean

    def test_blank_published_lines_are_ignored(self) -> None:
        """Blank lines in the published list are not ids."""
        expected = 1
        assert expected == reconcile(["a\n", "\n", "  \n"], jsonl("a")).published

    @given(st.lists(st.text(min_size=1, alphabet="abcdef0123456789-"), unique=True))
    def test_any_id_list_persisted_in_order_is_clean(self, ids: list[str]) -> None:
        """A JSONL holding exactly the published ids in order is always clean."""
        assert reconcile(published(*ids), jsonl(*ids)).is_clean


class TestLost:
    def test_missing_ids_are_lost(self) -> None:
        """Ids never persisted are reported as lost, in publish order."""
        report = reconcile(published("a", "b", "c", "d"), jsonl("a", "c"))
        expected = (["b", "d"], False)
        assert expected == (report.lost, report.is_clean)


class TestDuplicated:
    def test_repeated_ids_are_duplicated_with_count(self) -> None:
        """An id persisted three times is reported with its count."""
        report = reconcile(published("a", "b"), jsonl("a", "b", "b", "b"))
        expected = ({"b": 3}, False)
        assert expected == (report.duplicated, report.is_clean)

    def test_numeric_id_matches_its_text(self) -> None:
        """A numeric id in the JSONL matches the same digits in the published list."""
        assert reconcile(published("7"), jsonl(7)).is_clean


class TestOrder:
    def test_swapped_pair_is_out_of_order(self) -> None:
        """A message persisted before one published earlier is out of order."""
        report = reconcile(published("a", "b", "c"), jsonl("a", "c", "b"))
        expected = (["b"], False)
        assert expected == (report.out_of_order, report.is_clean)

    def test_any_order_checks_only_loss_and_duplicates(self) -> None:
        """ordered=False (several processors on a queue): a reordering is clean, a
        duplicate or a loss still is not."""
        assert reconcile(published("a", "b", "c"), jsonl("c", "a", "b"), ordered=False).is_clean
        report = reconcile(published("a", "b", "c"), jsonl("c", "a", "a"), ordered=False)
        expected = (["b"], {"a": 2}, [])
        assert expected == (report.lost, report.duplicated, report.out_of_order)

    def test_only_the_displaced_message_counts(self) -> None:
        """One message persisted late counts once, not every message it passed."""
        report = reconcile(published("a", "b", "c", "d"), jsonl("b", "c", "d", "a"))
        expected = ["a"]
        assert expected == report.out_of_order

    @given(st.permutations(list(range(12))))
    def test_kept_messages_are_in_order(self, persisted_order: list[int]) -> None:
        """Setting aside the out-of-order ids leaves the rest in publish order."""
        ids = [str(i) for i in range(12)]
        report = reconcile(published(*ids), jsonl(*(str(i) for i in persisted_order)))
        kept = [i for i in persisted_order if str(i) not in report.out_of_order]
        assert sorted(kept) == kept

    def test_order_is_per_publisher(self) -> None:
        """Two publishers' messages may interleave in any way."""
        listed = ["p1\ta1\n", "p2\tb1\n", "p1\ta2\n", "p2\tb2\n"]
        assert reconcile(listed, jsonl("b1", "b2", "a1", "a2")).is_clean

    def test_order_within_a_publisher_is_checked(self) -> None:
        """Within one named publisher the order is enforced (one of the swapped pair counts)."""
        listed = ["p1\ta1\n", "p2\tb1\n", "p1\ta2\n"]
        expected = 1
        assert expected == len(reconcile(listed, jsonl("a2", "b1", "a1")).out_of_order)

    def test_duplicate_does_not_move_first_position(self) -> None:
        """A late duplicate is a duplicate, not an ordering problem."""
        report = reconcile(published("a", "b"), jsonl("a", "b", "a"))
        expected: tuple[list[str], dict[str, int]] = ([], {"a": 2})
        assert expected == (report.out_of_order, report.duplicated)


class TestLines:
    def test_torn_last_line_is_reported(self) -> None:
        """A last line without a newline is torn and fails the audit."""
        lines = jsonl("a", "b")
        lines[-1] = lines[-1][:-5]
        report = reconcile(published("a"), lines)
        expected: tuple[bool, list[int], bool] = (True, [], False)
        assert expected == (report.torn_last_line, report.invalid_lines, report.is_clean)

    def test_torn_line_content_does_not_count(self) -> None:
        """A torn line that happens to parse is not counted as persisted."""
        lines = jsonl("a", "b")
        lines[-1] = lines[-1].rstrip(b"\n")
        expected = ["b"]
        assert expected == reconcile(published("a", "b"), lines).lost

    def test_invalid_lines_are_reported_by_number(self) -> None:
        """Lines that are not JSON objects are listed by line number."""
        lines = [*jsonl("a"), b"not json\n", b"[1]\n", b"\xff\n", *jsonl("b")]
        report = reconcile(published("a", "b"), lines)
        expected = ([2, 3, 4], False)
        assert expected == (report.invalid_lines, report.is_clean)

    def test_lines_without_id_are_informational(self) -> None:
        """A line without an id (a raw body) is reported but does not fail the audit."""
        lines = [*jsonl("a"), b'{"_ampsflow":{"raw":"x"}}\n']
        report = reconcile(published("a"), lines)
        expected = ([2], True)
        assert expected == (report.unidentified_lines, report.is_clean)

    def test_unexpected_ids_are_informational(self) -> None:
        """Ids nobody listed are reported but do not fail the audit."""
        report = reconcile(published("a"), jsonl("a", "zz"))
        expected = (["zz"], True)
        assert expected == (report.unexpected, report.is_clean)

    def test_republished_ids_are_reported(self) -> None:
        """An id listed twice in the published file is reported once more as republished."""
        report = reconcile(published("a", "a"), jsonl("a"))
        expected = (["a"], True)
        assert expected == (report.republished, report.is_clean)


class TestPublishedLine:
    def test_plain_line_is_unnamed_publisher(self) -> None:
        """A line without a tab is an id of the unnamed publisher."""
        expected = ("", "m-1")
        assert expected == parse_published_line("m-1\r\n")

    def test_tab_separates_publisher(self) -> None:
        """PUBLISHER<TAB>ID names the publisher."""
        expected = ("pub", "m-1")
        assert expected == parse_published_line("pub\tm-1\n")


class TestFormat:
    def test_text_report_names_each_problem(self) -> None:
        """The text report has a count line per category and the verdict."""
        text = format_report(reconcile(published("a", "b"), jsonl("a", "a")))
        expected = ["lost:               1 (b)", "duplicated:         1 (a x2)"]
        assert expected == [ln for ln in text.splitlines() if ln.startswith(("lost", "dup"))]

    def test_examples_are_limited(self) -> None:
        """At most `limit` examples are shown per category."""
        text = format_report(reconcile(published("a", "b", "c"), []), limit=2)
        expected = "lost:               3 (a, b, ...)"
        assert expected == text.splitlines()[2]

    def test_json_report_has_verdict(self) -> None:
        """The JSON form carries the verdict and the lists."""
        data = reconcile(published("a"), []).to_json()
        expected = (False, ["a"])
        assert expected == (data["clean"], data["lost"])
