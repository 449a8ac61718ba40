"""The persisted JSONL record: build, parse, dedupe keys and the dedupe index."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.core import transform
from ampsflow.core.records import (
    DedupeIndex,
    Provenance,
    build_line,
    build_raw_line,
    dedupe_key,
    format_timestamp,
    parse_bookmark,
    parse_line,
)
from ampsflow.errors import BadMessageError, RecordError

WHEN = datetime(2026, 11, 24, 16, 15, 24, 123456, tzinfo=UTC)
PROV = Provenance(
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
    topic="external",
    bookmark="123|45|",
    persisted_at=WHEN,
)

json_scalars = st.none() | st.booleans() | st.integers() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k != "_ampsflow"), json_values, max_size=6
)


class TestBuildLine:
    def test_line_is_message_plus_provenance(self) -> None:
        """The line is the message's members followed by the _ampsflow object."""
        line = build_line({"id": "m-1", "processed": True}, PROV)
        expected = {
            "id": "m-1",
            "processed": True,
            "_ampsflow": {
                "trace_id": "0af7651916cd43dd8448eb211c80319c",
                "span_id": "b7ad6b7169203331",
                "topic": "external",
                "bookmark": "123|45|",
                "persisted_at": "2026-11-24T16:15:24.123456Z",
            },
        }
        assert expected == json.loads(line)

    def test_line_is_one_compact_line_ending_in_newline(self) -> None:
        """Exactly one newline, at the end, and no spaces between tokens."""
        line = build_line({"id": "m-1", "text": "a\nb"}, PROV)
        expected = (1, True, False)
        assert expected == (line.count(b"\n"), line.endswith(b"\n"), b", " in line)

    def test_non_ascii_is_kept_as_utf8(self) -> None:
        """Non-ASCII text is written as UTF-8, not as \\u escapes."""
        assert "é".encode() in build_line({"name": "é"}, PROV)

    def test_lone_surrogate_still_round_trips(self) -> None:
        """A string with a lone surrogate (legal in JSON) is written and parses back."""
        expected = {"s": "\ud800"}
        assert expected == parse_line(build_line({"s": "\ud800"}, PROV)).message

    def test_existing_provenance_is_kept_as_upstream(self) -> None:
        """An incoming _ampsflow member is kept under _ampsflow.upstream."""
        line = build_line({"_ampsflow": {"topic": "elsewhere"}}, PROV)
        expected = {"topic": "elsewhere"}
        assert expected == json.loads(line)["_ampsflow"]["upstream"]

    def test_nan_is_rejected(self) -> None:
        """A value standard JSON cannot express raises RecordError."""
        with pytest.raises(RecordError):
            build_line({"x": float("nan")}, PROV)

    def test_naive_time_is_rejected(self) -> None:
        """persisted_at without a time zone is refused rather than guessed."""
        with pytest.raises(ValueError, match="timezone"):
            format_timestamp(datetime(2026, 1, 1))

    def test_time_is_written_in_utc(self) -> None:
        """A time in another zone is converted to UTC."""
        moment = datetime(2026, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
        expected = "2026-01-01T00:00:00.000000Z"
        assert expected == format_timestamp(moment)

    @given(
        st.datetimes(
            min_value=datetime(1000, 1, 2),
            max_value=datetime(9999, 12, 30),
            timezones=st.sampled_from(
                [
                    UTC,
                    timezone(timedelta(0)),
                    timezone(timedelta(hours=-11, minutes=-30)),
                    timezone.max,
                ]
            ),
        )
    )
    def test_time_is_rfc3339_utc_with_microseconds_for_any_aware_moment(
        self, moment: datetime
    ) -> None:
        """Any zone, any microsecond: the same text as strftime of the moment in UTC."""
        expected = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert expected == format_timestamp(moment)

    @given(messages)
    def test_round_trip(self, message: dict[str, object]) -> None:
        """Parsing a built line gives back the message and the provenance."""
        record = parse_line(build_line(message, PROV))
        assert (message, PROV.to_json()) == (record.message, record.provenance)


_SPACE = st.sampled_from(["", " ", "  ", "\t", " \t "])


@st.composite
def object_texts(draw: st.DrawFn) -> tuple[dict[str, object], bytes]:
    """A message and a JSON text of it as a publisher might write it: any spacing around
    the tokens (no line breaks), escaped or raw non-ASCII."""
    message = draw(messages)
    ascii_only = draw(st.booleans())
    space = draw(_SPACE)
    text = json.dumps(
        message, ensure_ascii=ascii_only, separators=(space + "," + space, space + ":" + space)
    )
    return message, (draw(_SPACE) + text + draw(_SPACE)).encode("utf-8", "surrogatepass")


class TestBuildLineFromText:
    """The line built from the body's own text against the one the encoder builds."""

    @given(object_texts())
    def test_the_same_json_as_encoding_the_message_again(
        self, case: tuple[dict[str, object], bytes]
    ) -> None:
        message, text = case
        try:
            transform.parse_body(text, max_bytes=1 << 20)
        except BadMessageError:
            return  # a body the persister keeps raw never gets here
        line = build_line(message, PROV, text=text)
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert parse_line(line) == parse_line(build_line(message, PROV))
        assert line.startswith(text.rstrip(b" \t")[:-1].rstrip(b" \t"))

    def test_the_members_are_kept_byte_for_byte(self) -> None:
        text = b'{ "id" : "m-1", "name":"\\u00e9", "n": 1.50 }'
        line = build_line(transform.parse_body(text, max_bytes=1024), PROV, text=text)
        assert line.startswith(b'{ "id" : "m-1", "name":"\\u00e9", "n": 1.50,"_ampsflow":{')

    def test_an_empty_object_gets_only_the_provenance(self) -> None:
        line = build_line({}, PROV, text=b"{ }")
        assert line.startswith(b'{"_ampsflow":{"trace_id":')
        assert parse_line(line).message == {}

    @pytest.mark.parametrize(
        "text",
        [b'{\n  "id": "m-1"\n}', b'{"id": "m-1"}\r', b'{"_ampsflow": {"topic": "x"}, "id": "m-1"}'],
    )
    def test_line_breaks_and_an_existing_provenance_are_encoded_again(self, text: bytes) -> None:
        message = transform.parse_body(text, max_bytes=1024)
        assert build_line(message, PROV, text=text) == build_line(message, PROV)


class TestBuildRawLine:
    def test_text_is_kept_verbatim(self) -> None:
        """A body that is not JSON is kept as text with the reason."""
        record = parse_line(build_raw_line("{not json", "invalid_json", PROV))
        expected: tuple[dict[str, object], str, str] = ({}, "{not json", "invalid_json")
        assert expected == (record.message, record.provenance["raw"], record.provenance["error"])

    def test_non_utf8_bytes_are_kept_as_base64(self) -> None:
        """Bytes that are not UTF-8 are kept as base64."""
        record = parse_line(build_raw_line(b"\xff\xfe", "invalid_json", PROV))
        expected = "//4="
        assert expected == record.provenance["raw_base64"]

    def test_raw_line_is_keyed_by_bookmark(self) -> None:
        """A raw line has no message id, so its bookmark identifies it."""
        expected = "bm:123|45|"
        assert expected == parse_line(build_raw_line("x", "invalid_json", PROV)).dedupe_key()


class TestParseLine:
    @pytest.mark.parametrize(
        "line",
        [b"{", b"[1]", b'{"id": 1}', b'{"_ampsflow": 3}', b"\xff\n", b""],
        ids=["torn", "array", "no-provenance", "provenance-not-object", "not-utf8", "empty"],
    )
    def test_bad_lines_raise(self, line: bytes) -> None:
        """Anything but an object with an _ampsflow object raises RecordError."""
        with pytest.raises(RecordError):
            parse_line(line)

    def test_bookmark_is_read_from_provenance(self) -> None:
        """The record's bookmark is the one in _ampsflow."""
        expected = "123|45|"
        assert expected == parse_line(build_line({}, PROV)).bookmark


class TestDedupeKey:
    def test_string_id_wins_over_bookmark(self) -> None:
        """A message id is the key when present."""
        expected = "id:m-1"
        assert expected == dedupe_key({"id": "m-1"}, "1|2|")

    def test_numeric_id_is_distinct_from_string(self) -> None:
        """The id 7 and the id "7" are different keys."""
        assert dedupe_key({"id": 7}, None) != dedupe_key({"id": "7"}, None)

    def test_nan_id_still_has_a_key(self) -> None:
        """An id JSON parsing allows but strict JSON does not (NaN) still gives a key."""
        expected = "idv:NaN"
        assert expected == dedupe_key({"id": float("nan")}, None)

    def test_bookmark_when_no_id(self) -> None:
        """Without an id the bookmark is the key."""
        expected = "bm:1|2|"
        assert expected == dedupe_key({"x": 1}, "1|2|")

    def test_none_when_neither(self) -> None:
        """No id and no bookmark: no key."""
        assert dedupe_key({"id": None}, "") is None


class TestParseBookmark:
    @pytest.mark.parametrize(
        ("bookmark", "expected"),
        [
            ("123|45|", ("123", 45)),
            ("123|45", ("123", 45)),
            ("0", None),
            ("a|1|", None),
            ("1|2|,3|4|", None),
            ("20240101T000000Z", None),
            (None, None),
        ],
    )
    def test_parse(self, bookmark: str | None, expected: tuple[str, int] | None) -> None:
        """Only a single PUBLISHER|SEQUENCE| bookmark has parts."""
        assert expected == parse_bookmark(bookmark)


class TestDedupeIndex:
    def test_recent_key_is_known(self) -> None:
        """A key added is contained."""
        index = DedupeIndex(10)
        index.add("id:a", "1|5|")
        assert index.contains("id:a", "2|1|")

    def test_oldest_key_is_evicted_beyond_bound(self) -> None:
        """The window keeps only max_keys keys."""
        index = DedupeIndex(2)
        for key in ("id:a", "id:b", "id:c"):
            index.add(key, None)
        expected = (False, 2)
        assert expected == (index.contains("id:a", None), len(index))

    def test_bookmark_at_or_below_high_water_is_known(self) -> None:
        """A message without id at or below its publisher's high-water mark is persisted."""
        index = DedupeIndex(1)
        index.add("bm:1|5|", "1|5|")
        index.add("bm:2|9|", "2|9|")
        expected = (True, True, False)
        actual = (
            index.contains("bm:1|3|", "1|3|"),
            index.contains("bm:1|5|", "1|5|"),
            index.contains("bm:1|6|", "1|6|"),
        )
        assert expected == actual

    def test_message_with_id_is_judged_by_id_only(self) -> None:
        """An unknown id is new even below the high-water mark (a reset broker sequence)."""
        index = DedupeIndex(10)
        index.add("id:a", "1|5|")
        assert not index.contains("id:b", "1|3|")

    def test_other_publisher_is_not_affected(self) -> None:
        """A high-water mark is per publisher."""
        index = DedupeIndex(10)
        index.add("id:a", "1|5|")
        assert not index.contains("bm:2|1|", "2|1|")

    def test_beyond_window_is_reported(self) -> None:
        """A message known only by the high-water mark is flagged as beyond the window."""
        index = DedupeIndex(1)
        index.add("bm:1|5|", "1|5|")
        index.add("bm:1|6|", "1|6|")
        expected = (True, False)
        actual = (
            index.is_beyond_window("bm:1|5|", "1|5|"),
            index.is_beyond_window("bm:1|6|", "1|6|"),
        )
        assert expected == actual

    def test_high_water_never_goes_down(self) -> None:
        """Adding a lower sequence keeps the higher mark."""
        index = DedupeIndex(10)
        index.add(None, "1|9|")
        index.add(None, "1|3|")
        expected = {"1": 9}
        assert expected == index.high_water()

    def test_zero_bound_is_rejected(self) -> None:
        """A window of no keys is refused."""
        with pytest.raises(ValueError, match="max_keys"):
            DedupeIndex(0)
