"""Bookmark formatting and parsing of a subscribe's bookmark header."""

from __future__ import annotations

import pytest

from ampsflow.devbroker.bookmarks import (
    ReplaySpec,
    format_bookmark,
    parse_bookmark,
    publisher_id,
)
from ampsflow.errors import BookmarkError


class TestPublisherId:
    def test_is_stable_for_a_name(self) -> None:
        """The same client name always gives the same publisher id."""
        assert publisher_id("marker-1") == publisher_id("marker-1")

    def test_differs_between_names(self) -> None:
        """Two client names give two publisher ids."""
        assert publisher_id("marker-1") != publisher_id("marker-2")

    def test_is_a_nonzero_uint64(self) -> None:
        """Publisher ids fit in a uint64 and are never 0 (reserved for epoch/now)."""
        ids = [publisher_id(f"client-{i}") for i in range(200)]
        assert [i for i in ids if not 0 < i < 2**64] == []


class TestFormatBookmark:
    def test_has_the_amps_shape(self) -> None:
        """A bookmark is ``<publisher>|<sequence>|``."""
        assert format_bookmark(12, 34) == "12|34|"

    def test_round_trips_through_the_parser(self) -> None:
        """A formatted bookmark parses back to resume after that publisher's sequence."""
        pub = publisher_id("p")
        assert {pub: 1795530538228000001} == dict(
            parse_bookmark(format_bookmark(pub, 1795530538228000001)).after
        )


class TestParseBookmark:
    def test_zero_is_epoch(self) -> None:
        """``0`` asks for the whole log."""
        assert ReplaySpec(from_epoch=True) == parse_bookmark("0")

    def test_zero_one_is_now(self) -> None:
        """``0|1|`` asks for live messages only."""
        assert ReplaySpec(now=True) == parse_bookmark("0|1|")

    def test_single_bookmark_resumes_after_it(self) -> None:
        """``pub|seq|`` records that publisher's high-water mark."""
        spec = parse_bookmark("12290412031115262887|1484244707000000010|")
        assert (
            spec.from_epoch,
            spec.now,
            dict(spec.after),
            spec.since_timestamp_us,
        ) == (False, False, {12290412031115262887: 1484244707000000010}, None)

    def test_trailing_bar_is_optional(self) -> None:
        """``pub|seq`` without the customary trailing bar is accepted."""
        assert dict(parse_bookmark("5|7").after) == {5: 7}

    def test_list_keeps_every_publisher(self) -> None:
        """A comma list maps each listed publisher to its sequence."""
        assert dict(parse_bookmark("1|2|,3|4|").after) == {1: 2, 3: 4}

    def test_list_with_epoch_replays_from_the_start(self) -> None:
        """``0,pub|seq|`` (the JS client after a reconnect) starts at epoch with skips."""
        spec = parse_bookmark("0,9|3|")
        assert (spec.from_epoch, dict(spec.after)) == (True, {9: 3})

    def test_list_keeps_the_highest_sequence_of_a_repeated_publisher(self) -> None:
        """A publisher listed twice keeps its highest sequence."""
        assert dict(parse_bookmark("1|9|,1|4|").after) == {1: 9}

    def test_list_tolerates_spaces(self) -> None:
        """Whitespace around list items is ignored."""
        assert dict(parse_bookmark(" 1|2| , 3|4| ").after) == {1: 2, 3: 4}

    def test_timestamp_is_utc_microseconds(self) -> None:
        """``YYYYMMDDTHHMMSSZ`` is read as UTC."""
        assert parse_bookmark("20240101T000000Z").since_timestamp_us == 1_704_067_200_000_000

    def test_timestamp_fraction_is_microseconds(self) -> None:
        """A fractional part is padded to microseconds."""
        assert parse_bookmark("20240101T000001.25Z").since_timestamp_us == 1_704_067_201_250_000

    def test_skips_covers_sequences_up_to_the_mark(self) -> None:
        """The skip rule covers a listed publisher's sequences at or below its mark."""
        spec = parse_bookmark("1|5|")
        assert [
            spec.skips(1, 4),
            spec.skips(1, 5),
            spec.skips(1, 6),
            spec.skips(2, 1),
        ] == [True, True, False, False]

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "   ",
            "recent",
            "abc|1|",
            "1|x|",
            "1|2|3|",
            "1||",
            "-1|2|",
            "[0:1|2|]",
            "(1|2|:3|4|)",
            "1|2|,",
            "18446744073709551616|1|",
            "20241301T000000Z",
            "20240101T000000",
            "20240101T000000Z,1|2|",
        ],
    )
    def test_rejects_anything_else(self, value: str) -> None:
        """Values that are not epoch, now, bookmarks, lists or timestamps are invalid."""
        with pytest.raises(BookmarkError, match=r"^invalid bookmark: "):
            parse_bookmark(value)
