"""The processor's transformation: parse, mark processed, serialise, dead-letter envelope."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.core.transform import (
    dead_letter_body,
    mark_processed,
    parse_body,
    payload_correlation_id,
    serialise,
)
from ampsflow.errors import BadMessageError

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

    def test_deep_nesting_is_invalid_json(self) -> None:
        """Nesting too deep to parse is rejected as invalid_json, not a crash."""
        assert error_type_of(b"[" * 100_000 + b"]" * 100_000, max_bytes=10**6) == "invalid_json"

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


class TestDeadLetterBody:
    def test_text_body(self) -> None:
        """A UTF-8 body is carried as text with the reason, detail and origin."""
        envelope = json.loads(
            dead_letter_body(
                b"{oops",
                BadMessageError("invalid_json", "Expecting property name"),
                topic="internal",
                bookmark="1|2|",
                correlation_id=CID,
            )
        )
        expected = {
            "reason": "invalid_json",
            "detail": "Expecting property name",
            "topic": "internal",
            "bookmark": "1|2|",
            "CorrelationId": CID,
            "body": "{oops",
        }
        assert expected == envelope

    def test_binary_body(self) -> None:
        """A body that is not UTF-8 is carried base64-encoded."""
        envelope = json.loads(
            dead_letter_body(
                b"\xff\x00",
                BadMessageError("invalid_utf8", "byte 0"),
                topic="internal",
                bookmark=None,
                correlation_id=None,
            )
        )
        assert base64.b64encode(b"\xff\x00").decode() == envelope["body_base64"]
