"""The CorrelationId codec: golden vectors shared with the page, and round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.core.codec import (
    TraceParent,
    decode_correlation_id,
    encode_correlation_id,
    encode_span_ids,
)
from ampsflow.errors import CorrelationIdError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "data" / "correlation_vectors.json").read_text("utf-8")
)

trace_parents = st.builds(
    TraceParent,
    version=st.integers(0, 0xFE),
    trace_id=st.integers(1, (1 << 128) - 1),
    span_id=st.integers(1, (1 << 64) - 1),
    flags=st.integers(0, 0xFF),
)


def parent_of(vector: dict[str, str]) -> TraceParent:
    return TraceParent(
        version=int(vector["version"], 16),
        trace_id=int(vector["trace_id"], 16),
        span_id=int(vector["span_id"], 16),
        flags=int(vector["flags"], 16),
    )


class TestGoldenVectors:
    @pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["description"])
    def test_valid_input_decodes(self, vector: dict[str, str]) -> None:
        """Each valid input decodes to the vector's version, ids and flags."""
        assert parent_of(vector) == decode_correlation_id(vector["input"])

    @pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["description"])
    def test_valid_context_encodes(self, vector: dict[str, str]) -> None:
        """Each valid context encodes to the vector's lower-case CorrelationId."""
        assert vector["correlation_id"] == encode_correlation_id(parent_of(vector))

    @pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["description"])
    def test_traceparent_form(self, vector: dict[str, str]) -> None:
        """Each valid context renders as the vector's dashed traceparent."""
        assert vector["traceparent"] == parent_of(vector).traceparent()

    @pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["description"])
    def test_invalid_input_is_rejected_with_its_reason(self, vector: dict[str, str]) -> None:
        """Each invalid input raises CorrelationIdError with the vector's reason."""
        with pytest.raises(CorrelationIdError) as info:
            decode_correlation_id(vector["input"])
        assert vector["reason"] == info.value.reason

    def test_vectors_cover_the_required_cases(self) -> None:
        """The file covers flags 00/01/03, upper case, dashes and every rejection reason."""
        flags = {v["flags"] for v in VECTORS["valid"]}
        inputs = [v["input"] for v in VECTORS["valid"]]
        reasons = {v["reason"] for v in VECTORS["invalid"]}
        assert {"00", "01", "03"} <= flags
        assert any(i != i.lower() for i in inputs)
        assert any("-" in i for i in inputs)
        expected = {"empty", "wrong_length", "bad_separator", "not_hex", "version_ff"}
        assert expected | {"zero_trace_id", "zero_span_id"} <= reasons


class TestRoundTrip:
    @given(trace_parents)
    def test_encode_then_decode(self, tp: TraceParent) -> None:
        """Decoding an encoded context gives the same context back."""
        assert tp == decode_correlation_id(encode_correlation_id(tp))

    @given(trace_parents)
    def test_encoding_is_52_lower_case_hex(self, tp: TraceParent) -> None:
        """An encoded CorrelationId is always 52 characters of 0-9a-f."""
        value = encode_correlation_id(tp)
        assert (len(value), set(value) <= set("0123456789abcdef")) == (52, True)

    @given(trace_parents)
    def test_a_live_span_s_ids_encode_as_the_checked_form(self, tp: TraceParent) -> None:
        """encode_span_ids is encode_correlation_id for version 00, without the checks."""
        version_00 = TraceParent(0, tp.trace_id, tp.span_id, tp.flags)
        assert encode_span_ids(tp.trace_id, tp.span_id, tp.flags) == encode_correlation_id(
            version_00
        )

    @given(trace_parents)
    def test_dashed_and_upper_case_decode_alike(self, tp: TraceParent) -> None:
        """The dashed traceparent and the upper-case form decode to the same context."""
        assert (tp, tp) == (
            decode_correlation_id(tp.traceparent()),
            decode_correlation_id(encode_correlation_id(tp).upper()),
        )

    @given(st.text(max_size=60))
    def test_arbitrary_text_never_raises_anything_else(self, text: str) -> None:
        """Any string either decodes or raises CorrelationIdError, never another error."""
        try:
            decoded = decode_correlation_id(text)
        except CorrelationIdError:
            return
        assert decoded == decode_correlation_id(encode_correlation_id(decoded))

    def test_non_string_is_rejected(self) -> None:
        """A non-string value is rejected with reason not_a_string."""
        with pytest.raises(CorrelationIdError) as info:
            decode_correlation_id(b"00" * 26)  # type: ignore[arg-type]
        assert info.value.reason == "not_a_string"

    def test_out_of_range_context_cannot_be_built(self) -> None:
        """A TraceParent with a zero span id cannot be constructed."""
        with pytest.raises(CorrelationIdError) as info:
            TraceParent(version=0, trace_id=1, span_id=0, flags=1)
        assert info.value.reason == "out_of_range"
