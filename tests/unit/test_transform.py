"""The processor's transformation: parse, mark processed, serialise, dead-letter envelope."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ampsflow.core.transform import (
    ERROR_TYPES,
    MAX_DEPTH,
    dead_letter_body,
    mark_processed,
    parse_body,
    payload_correlation_id,
    publish_budget,
    render_output,
    serialise,
)
from ampsflow.errors import BadMessageError
from tests.strategies import Body, examples, hostile_bodies

CID = "004bf92f3577b34da6a3ce929d0e0e473600f067aa0ba902b701"
LIMIT = 1024


def error_type_of(body: bytes | str, max_bytes: int = LIMIT) -> str:
    with pytest.raises(BadMessageError) as info:
        parse_body(body, max_bytes=max_bytes)
    return info.value.error_type


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


class TestParseBody:
    def test_object_bytes_parse(self) -> None:
        """A UTF-8 JSON object parses into a dict."""
        assert parse_body('{"a":1,"b":"é"}'.encode(), max_bytes=LIMIT) == {"a": 1, "b": "é"}

    def test_object_text_parses(self) -> None:
        """Already-decoded text parses the same way."""
        assert parse_body('{"a": [1, 2]}', max_bytes=LIMIT) == {"a": [1, 2]}

    def test_invalid_utf8(self) -> None:
        """Bytes that are not UTF-8 are rejected as invalid_utf8."""
        assert error_type_of(b'{"a":"\xff"}') == "invalid_utf8"

    def test_invalid_json(self) -> None:
        """Text that is not JSON is rejected as invalid_json."""
        assert error_type_of(b"{not json") == "invalid_json"

    def test_empty_body_is_invalid_json(self) -> None:
        """An empty body is rejected as invalid_json."""
        assert error_type_of(b"") == "invalid_json"

    def test_nan_is_invalid_json(self) -> None:
        """NaN, which Python accepts but JSON does not, is rejected as invalid_json."""
        assert error_type_of(b'{"a":NaN}') == "invalid_json"

    def test_deep_nesting_is_too_deep(self) -> None:
        """Nesting too deep for the parser is rejected as too_deep, not a crash."""
        assert error_type_of(b"[" * 100_000 + b"]" * 100_000, max_bytes=10**6) == "too_deep"

    def test_nesting_limit_is_exact(self) -> None:
        """MAX_DEPTH levels (the object counts as one) parse; one more is too_deep."""
        inner = MAX_DEPTH - 1
        at_limit = b'{"a":' + b"[" * inner + b"]" * inner + b"}"
        over = b'{"a":' + b"[" * (inner + 1) + b"]" * (inner + 1) + b"}"
        assert (
            len(str(parse_body(at_limit, max_bytes=LIMIT * 4))) > 0,
            error_type_of(over, LIMIT * 4),
        ) == (
            True,
            "too_deep",
        )

    def test_many_brackets_side_by_side_are_not_deep(self) -> None:
        """Thousands of sibling arrays are fine: only depth counts."""
        body = b'{"a":[' + b",".join([b"[]"] * 5000) + b"]}"
        assert len(parse_body(body, max_bytes=10**5)["a"]) == 5000

    @pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"42", b"null", b"true"])
    def test_non_object(self, body: bytes) -> None:
        """Valid JSON that is not an object is rejected as not_an_object."""
        assert error_type_of(body) == "not_an_object"

    def test_too_large(self) -> None:
        """A body over the limit is rejected as too_large before parsing."""
        assert error_type_of(b'{"a":"' + b"x" * LIMIT + b'"}') == "too_large"

    def test_error_detail_says_where(self) -> None:
        """The invalid_json detail names the line and column."""
        with pytest.raises(BadMessageError) as info:
            parse_body(b'{"a":}', max_bytes=LIMIT)
        assert "line 1 column 6" in info.value.detail

    @pytest.mark.parametrize(
        "body",
        [
            b'{"id":"p","s":"\\ud800"}',
            b'{"id":"p","s":"\\udfff"}',
            b'{"\\udc00":1}',
            b'{"a":["x",{"b":"\\ud83d"}]}',
        ],
    )
    def test_lone_surrogate_is_invalid_unicode(self, body: bytes) -> None:
        """An escaped lone surrogate (valid JSON syntax, no UTF-8 form) is invalid_unicode."""
        assert error_type_of(body) == "invalid_unicode"

    def test_lone_surrogate_in_text_is_invalid_unicode(self) -> None:
        """Already-decoded text holding a lone surrogate is rejected the same way."""
        assert error_type_of('{"s":"\ud800"}') == "invalid_unicode"

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            (b'{"s":"\\ud83d\\ude00"}', {"s": "\U0001f600"}),
            (b'{"s":"\\\\ud800"}', {"s": "\\ud800"}),
        ],
    )
    def test_surrogate_pair_and_escaped_backslash_are_fine(
        self, body: bytes, expected: dict[str, str]
    ) -> None:
        """A valid surrogate pair, or a backslash followed by text that looks like one, parses."""
        assert parse_body(body, max_bytes=LIMIT) == expected

    @pytest.mark.parametrize(
        "body", [b'{"a":1,"a":2}', b'{"a":1,"\\u0061":2}', b'{"x":[{"k":1,"k":1}]}']
    )
    def test_duplicate_key(self, body: bytes) -> None:
        """An object that repeats a key (also spelt differently, also nested) is duplicate_key."""
        assert error_type_of(body) == "duplicate_key"

    def test_duplicate_key_detail_names_the_key(self) -> None:
        """The detail says which key repeats."""
        with pytest.raises(BadMessageError) as info:
            parse_body(b'{"id":1,"mark":2,"mark":3}', max_bytes=LIMIT)
        assert info.value.detail == "key 'mark' appears more than once"

    @pytest.mark.parametrize(
        "body", [b'{"a":1e999}', b'{"a":-1E400}', b'{"a":' + b"9" * 5000 + b"}"]
    )
    def test_number_out_of_range(self, body: bytes) -> None:
        """A number no double holds, or an integer too long to convert, is number_out_of_range."""
        assert error_type_of(body, max_bytes=10**5) == "number_out_of_range"

    @pytest.mark.parametrize("body", [b'{"a":Infinity}', b'{"a":-Infinity}'])
    def test_infinity_is_invalid_json(self, body: bytes) -> None:
        """Infinity, which Python accepts but JSON does not, is rejected as invalid_json."""
        assert error_type_of(body) == "invalid_json"

    def test_escaped_controls_are_fine_raw_ones_are_not(self) -> None:
        """An escaped control character parses; a raw one inside a string is invalid_json."""
        assert (
            parse_body(b'{"c":"\\u0001"}', max_bytes=LIMIT),
            error_type_of(b'{"c":"\x01"}'),
        ) == (
            {"c": "\x01"},
            "invalid_json",
        )

    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_parse_or_raise_bad_message(self, body: bytes) -> None:
        """Any bytes either parse to a dict or raise BadMessageError, never another error."""
        try:
            parsed = parse_body(body, max_bytes=LIMIT)
        except BadMessageError:
            return
        assert isinstance(parsed, dict)


class TestMarkProcessed:
    def test_both_sets_processed_and_correlation_id(self) -> None:
        """Carrier both adds processed and the new CorrelationId field."""
        out = mark_processed({"m": 1, "CorrelationId": "old"}, correlation_id=CID, carrier="both")
        assert out == {"m": 1, "CorrelationId": CID, "processed": True}

    def test_payload_carrier_sets_field(self) -> None:
        """Carrier payload adds the CorrelationId field."""
        out = mark_processed({"m": 1}, correlation_id=CID, carrier="payload")
        assert out == {"m": 1, "CorrelationId": CID, "processed": True}

    def test_header_carrier_removes_stale_field(self) -> None:
        """Carrier header leaves no stale CorrelationId field in the payload."""
        out = mark_processed({"m": 1, "CorrelationId": "old"}, correlation_id=CID, carrier="header")
        assert out == {"m": 1, "processed": True}

    def test_input_is_not_modified(self) -> None:
        """The input dict is left unchanged."""
        message = {"m": 1}
        mark_processed(message, correlation_id=CID, carrier="both")
        assert message == {"m": 1}

    @given(st.dictionaries(st.text(), json_values, max_size=6))
    def test_round_trip_keeps_every_field(self, message: dict[str, object]) -> None:
        """Serialised output parses back to the input plus processed and CorrelationId."""
        out = parse_body(
            serialise(mark_processed(message, correlation_id=CID, carrier="both")),
            max_bytes=10**6,
        )
        assert {**message, "processed": True, "CorrelationId": CID} == out


class TestSerialise:
    def test_compact_utf8(self) -> None:
        """Output has no spaces and keeps non-ASCII characters as UTF-8."""
        assert '{"a":[1,2],"b":"é"}'.encode() == serialise({"a": [1, 2], "b": "é"})


class TestPayloadCorrelationId:
    def test_string_field(self) -> None:
        """A string CorrelationId field is returned."""
        assert payload_correlation_id({"CorrelationId": CID}) == CID

    def test_non_string_field(self) -> None:
        """A non-string CorrelationId field is ignored."""
        assert payload_correlation_id({"CorrelationId": 5}) is None


class TestRenderOutput:
    @pytest.mark.parametrize(
        ("carrier", "field", "header"),
        [("both", CID, CID), ("payload", CID, None), ("header", None, CID)],
    )
    def test_carrier_decides_field_and_header(
        self, carrier: str, field: str | None, header: str | None
    ) -> None:
        """One function decides where the CorrelationId goes: payload field, header, or both."""
        out = render_output(
            {"m": 1, "CorrelationId": "old"},
            correlation_id=CID,
            carrier=carrier,  # type: ignore[arg-type]
            max_bytes=LIMIT,
        )
        assert (json.loads(out.body).get("CorrelationId"), out.header_correlation_id) == (
            field,
            header,
        )

    def test_output_over_the_limit_is_output_too_large(self) -> None:
        """An output that grows over the limit (1e15 is written back 4x longer) is refused."""
        message = parse_body(b'{"n":[' + b",".join([b"1e15"] * 100) + b"]}", max_bytes=LIMIT)
        with pytest.raises(BadMessageError) as info:
            render_output(message, correlation_id=CID, carrier="both", max_bytes=LIMIT)
        assert info.value.error_type == "output_too_large"

    def test_output_at_the_limit_is_kept(self) -> None:
        """An output of exactly the limit is published."""
        out = render_output({}, correlation_id=CID, carrier="both", max_bytes=10**6)
        exact = render_output({}, correlation_id=CID, carrier="both", max_bytes=len(out.body))
        assert exact.body == out.body

    def test_publish_budget_leaves_room_for_the_header(self) -> None:
        """The body budget is the frame cap minus the header reserve and the topic."""
        assert publish_budget(16 * 1024 * 1024, "external") == 16 * 1024 * 1024 - 1024 - 8


def envelope_of(body: bytes, *, max_bytes: int = 10**6, detail: str = "x") -> dict[str, object]:
    data = dead_letter_body(
        body,
        BadMessageError("invalid_json", detail),
        topic="internal",
        bookmark="1|2|",
        correlation_id=CID,
        max_bytes=max_bytes,
    )
    assert len(data) <= max_bytes
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


class TestDeadLetterBody:
    def test_text_body(self) -> None:
        """A UTF-8 body is carried as text with the reason, detail, origin, length and hash."""
        expected = {
            "reason": "invalid_json",
            "detail": "x",
            "topic": "internal",
            "bookmark": "1|2|",
            "CorrelationId": CID,
            "body_bytes": 5,
            "body_sha256": hashlib.sha256(b"{oops").hexdigest(),
            "body_truncated": False,
            "body": "{oops",
        }
        assert expected == envelope_of(b"{oops")

    def test_binary_body(self) -> None:
        """A body that is not UTF-8 is carried base64-encoded."""
        envelope = envelope_of(b"\xff\x00")
        assert base64.b64encode(b"\xff\x00").decode() == envelope["body_base64"]

    @pytest.mark.parametrize(
        "body",
        [
            b'{"s":"' + b"\x01" * 300_000 + b'"}',  # each control character escapes to 6 bytes
            ("é" * 100_000).encode(),
            b"x" * 300_000,
            b"\xff" * 300_000,
        ],
        ids=["controls", "non-ascii", "ascii", "binary"],
    )
    def test_big_body_is_cut_to_fit_and_says_so(self, body: bytes) -> None:
        """A body too big for the bound is cut; length and hash describe the whole."""
        limit = 64 * 1024
        envelope = envelope_of(body, max_bytes=limit)
        kept = (
            base64.b64decode(str(envelope["body_base64"]))
            if "body_base64" in envelope
            else str(envelope["body"]).encode()
        )
        assert (
            envelope["body_truncated"],
            envelope["body_bytes"],
            envelope["body_sha256"],
            body.startswith(kept),
            len(kept) > 0,
        ) == (True, len(body), hashlib.sha256(body).hexdigest(), True, True)

    def test_long_detail_is_cut(self) -> None:
        """A long detail (an exception message quoting data) is cut to MAX_DETAIL_CHARS."""
        envelope = envelope_of(b"{", detail="d" * 10_000)
        assert len(str(envelope["detail"])) == 503

    def test_lone_surrogate_in_detail_does_not_raise(self) -> None:
        """Even a detail holding a lone surrogate gives a parseable envelope."""
        assert envelope_of(b"{", detail="\ud800")["detail"] == "\ud800"


class TestHostileBodies:
    """Generated bodies through the whole pure path: parse, render, or dead-letter."""

    @settings(max_examples=examples(500))
    @given(hostile_bodies("gen"))
    def test_parse_render_or_reject_never_raises_anything_else(self, body: Body) -> None:
        """Every body parses and renders to I-JSON output, or is rejected with a known reason."""
        limit = 256 * 1024
        try:
            message = parse_body(body.data, max_bytes=limit)
            out = render_output(
                message, correlation_id=CID, carrier="both", max_bytes=publish_budget(limit, "e")
            )
        except BadMessageError as exc:
            reason = exc.error_type
        else:
            reason = None
        assert reason is None or reason in ERROR_TYPES
        if reason is not None:
            return
        # The output is strict UTF-8 and passes the same rules again, to the same value.
        again = parse_body(out.body.decode("utf-8"), max_bytes=limit)
        assert {**message, "processed": True, "CorrelationId": CID} == again

    @settings(max_examples=examples(300))
    @given(hostile_bodies("gen"), st.integers(4096, 128 * 1024))
    def test_dead_letter_always_fits_and_describes_the_body(self, body: Body, limit: int) -> None:
        """Any body's envelope fits the bound and carries its length and hash."""
        envelope = envelope_of(body.data, max_bytes=limit)
        assert (envelope["body_bytes"], envelope["body_sha256"]) == (
            len(body.data),
            hashlib.sha256(body.data).hexdigest(),
        )
