"""The devbroker's wire protocol helpers: framing, header parsing, ack building."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ampsflow.devbroker import protocol
from ampsflow.errors import OversizedHeaderError, ProtocolError

# The JavaScript client extracts s with this shape; a server header that has s must match it.
JS_S_RULE = re.compile(rb'"s":\d+,')


class TestSplitFrame:
    def test_header_and_body(self):
        """The header ends at its closing brace; the rest of the frame is the body."""
        assert protocol.split_frame(b'{"c":"p","t":"a"}{"id":1}') == (
            b'{"c":"p","t":"a"}',
            b'{"id":1}',
        )

    def test_brace_inside_string(self):
        """A brace inside a quoted header value does not end the header."""
        assert protocol.split_frame(b'{"c":"p","x":"a}b"}body') == (b'{"c":"p","x":"a}b"}', b"body")

    def test_escaped_quote_inside_string(self):
        """An escaped quote does not close a header string."""
        assert protocol.split_frame(b'{"x":"a\\"}"}') == (b'{"x":"a\\"}"}', b"")

    def test_no_header_object(self):
        """A frame that does not start with an object is a ProtocolError."""
        with pytest.raises(ProtocolError):
            protocol.split_frame(b"garbage")

    @given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5), st.binary())
    def test_any_flat_header_splits_exactly(self, header, body):
        """Any flat JSON header followed by any body splits back into the two parts."""
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert (raw, body) == protocol.split_frame(raw + body)

    @given(
        st.lists(st.sampled_from([b"{", b"}", b'"', b"\\", b"a", b":", b","]), max_size=30),
        st.one_of(st.none(), st.integers(0, 32)),
    )
    def test_fast_path_splits_where_the_grammar_does(self, parts, max_header):
        """Any bytes, any limit: the same split (or the same error) as the flat-object
        grammar alone, whether or not the fast path applies."""
        frame = b"".join(parts)

        def by_grammar() -> tuple[bytes, bytes] | type[Exception]:
            window = frame if max_header is None else frame[:max_header]
            match = re.compile(rb'\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\}', re.DOTALL).match(window)
            if match is None:
                return OversizedHeaderError if len(window) < len(frame) else ProtocolError
            return frame[: match.end()], frame[match.end() :]

        try:
            got: tuple[bytes, bytes] | type[Exception] = protocol.split_frame(frame, max_header)
        except ProtocolError as exc:
            got = type(exc)
        assert got == by_grammar()


class TestParseHeader:
    def test_aliases_become_short_names(self):
        """Long key names map to the short ones."""
        assert protocol.parse_header(
            b'{"cmd":"subscribe","bookmark":"0","batch_size":10,"cmd_id":"1"}'
        ) == {"c": "subscribe", "bm": "0", "bs": 10, "cid": "1"}

    def test_fast_path_keeps_values(self):
        """A publish header comes back as it was sent."""
        assert protocol.parse_header(b'{"c":"p","t":"orders","s":7}') == {
            "c": "p",
            "t": "orders",
            "s": 7,
        }

    def test_booleans_and_nulls(self):
        """Booleans become text and nulls are dropped."""
        assert protocol.parse_header(b'{"c":"x","flag":true,"gone":null}') == {
            "c": "x",
            "flag": "true",
        }

    @pytest.mark.parametrize(
        "raw", [b"{", b"[1]", b'{"c":{"nested":1}}', b'{"c":"p","t":[1]}', b"\xff"]
    )
    def test_rejects(self, raw):
        """Invalid JSON, non-objects, nested values and bad UTF-8 are ProtocolErrors."""
        with pytest.raises(ProtocolError):
            protocol.parse_header(raw)


class TestCommandsAndOptions:
    @pytest.mark.parametrize(
        ("c", "expected"),
        [("p", "publish"), ("delta_publish", "publish"), ("delta_subscribe", "subscribe")],
    )
    def test_command_aliases(self, c, expected):
        """Publish and subscribe spellings share a handler."""
        assert expected == protocol.command_name({"c": c})

    def test_empty_ack_list(self):
        """a:"" asks for no acks."""
        assert protocol.ack_types({"a": ""}) == []

    def test_ack_list_order(self):
        """Ack types keep the order the client gave."""
        assert protocol.ack_types({"a": "processed, persisted"}) == ["processed", "persisted"]

    @pytest.mark.parametrize(("value", "expected"), [(5, 5), ("17", 17), (None, None), ("", None)])
    def test_sequence_number_or_string(self, value, expected):
        """s arrives as a number (Python) or a string (JavaScript)."""
        assert expected == protocol.parse_sequence(value)

    @pytest.mark.parametrize("value", ["x1", "-3", -3])
    def test_bad_sequence(self, value):
        """A sequence that is not a non-negative integer is a ProtocolError."""
        with pytest.raises(ProtocolError):
            protocol.parse_sequence(value)


class TestServerHeaders:
    def test_ack_echoes_ids(self):
        """An ack echoes cid, sub_id and query_id."""
        ack = protocol.ack({"c": "subscribe", "cid": "c1", "sub_id": "s1"}, "processed")
        assert ack == b'{"c":"ack","a":"processed","cid":"c1","sub_id":"s1","status":"success"}'

    def test_failure_ack_carries_reason(self):
        """A failure ack has status failure and the reason."""
        ack = json.loads(protocol.ack({"cid": "c1"}, "processed", reason="bad filter"))
        assert (ack["status"], ack["reason"]) == ("failure", "bad filter")

    def test_logon_ack_fields(self):
        """The logon ack reports the last sequence in both s and bm, and the version."""
        raw = protocol.logon_ack({"cid": "auto0"}, client_name="pub", name_hash=99, last_seq=12)
        ack = json.loads(raw)
        assert (
            ack["version"],
            ack["s"],
            ack["bm"],
            ack["status"],
        ) == ("5.3.4.0", 12, "99|12|", "success")

    def test_logon_ack_obeys_js_s_rule(self):
        """The logon ack has an unquoted s that is not the last key."""
        raw = protocol.logon_ack({"cid": "a"}, client_name="p", name_hash=1, last_seq=0)
        assert JS_S_RULE.search(raw) is not None

    def test_persisted_ack_obeys_js_s_rule(self):
        """The publish persisted ack has s as an unquoted integer before another key."""
        assert JS_S_RULE.search(protocol.persisted_publish_ack(1795530538228000001)) is not None

    def test_encode_refuses_s_last(self):
        """encode_header refuses to put s last."""
        with pytest.raises(ValueError, match="last"):
            protocol.encode_header([("c", "ack"), ("s", 1)])

    def test_subscription_persisted_ack_has_no_s(self):
        """A bookmark subscription's persisted ack names sub_id and bm, and never s."""
        ack = json.loads(protocol.subscription_persisted_ack("c1", "s1", "1|2|"))
        assert ack == {
            "c": "ack",
            "a": "persisted",
            "cid": "c1",
            "sub_id": "s1",
            "bm": "1|2|",
            "status": "success",
        }

    def test_headers_are_compact_raw_utf8(self):
        """Server headers have no whitespace and no \\u escapes for non-ASCII text."""
        raw = protocol.ack({"cid": "é ü"}, "processed")
        assert (b"\\u" not in raw, b": " not in raw, b", " not in raw) == (True, True, True)
        assert json.loads(raw)["cid"] == "é ü"

    def test_delivery_header(self):
        """A p header carries sids, topic, bookmark and correlation id."""
        tail = protocol.delivery_tail("orders", "1|2|", "Y29y")
        header = protocol.delivery_header(b"a,b", tail)
        assert json.loads(header) == {
            "c": "p",
            "sids": "a,b",
            "t": "orders",
            "bm": "1|2|",
            "x": "Y29y",
        }

    def test_empty_body_delivery_has_l_zero(self):
        """An empty body is announced with l:0 so the JS client expects no body frame."""
        header = protocol.delivery_header(
            b"a", protocol.delivery_tail("t", "1|1|", None), empty_body=True
        )
        assert json.loads(header)["l"] == 0

    def test_sid_literal_escapes(self):
        """Sub ids with quotes are escaped inside sids."""
        header = protocol.delivery_header(protocol.sid_literal('a"b'), b'"t":"x"')
        assert json.loads(header)["sids"] == 'a"b'

    def test_frame_length_prefix(self):
        """A TCP frame starts with the big-endian length of header plus body."""
        assert protocol.frame(b"{}", b"abc") == b"\x00\x00\x00\x05{}abc"

    def test_timestamp_format(self):
        """Timestamps are YYYYMMDDTHHMMSS.ffffffZ in UTC."""
        assert protocol.format_timestamp(1704067200000001) == "20240101T000000.000001Z"


_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=2, max_size=8).filter(
    lambda key: key not in protocol.ALIASES
)
_VALUES = st.one_of(st.text(max_size=20), st.integers(min_value=0, max_value=2**64 - 1))


class TestHeaderRoundTrip:
    @given(st.dictionaries(_KEYS, _VALUES, max_size=6))
    def test_encoded_header_parses_back(self, fields):
        """Any flat header the broker writes is compact JSON and reads back unchanged."""
        raw = protocol.encode_header(fields.items())
        compact = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        assert (fields, compact) == (protocol.parse_header(raw), raw)

    @given(
        st.text(
            alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)),
            max_size=30,
        )
    )
    def test_printable_text_is_never_u_escaped(self, text):
        """Printable text (any script) is written as raw UTF-8, never as \\u escapes."""
        encoded = protocol.encode_header([("x", text)])
        # An escaped backslash followed by "u" (text "\\u") is not a \u escape.
        assert re.search(rb"(?<!\\)(?:\\\\)*\\u", encoded) is None

    def test_lone_surrogate_is_replaced(self):
        """A lone surrogate from a client's JSON is written as '?' instead of failing."""
        assert {"x": "a?b"} == json.loads(protocol.encode_header([("x", "a\ud800b")]))


@given(st.text())
def test_json_string_is_compact_json_with_raw_utf8(value):
    """The shared encoder writes what ``json.dumps(ensure_ascii=False)`` writes."""
    assert protocol.json_string(value) == json.dumps(value, ensure_ascii=False)
