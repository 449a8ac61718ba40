"""The AMPS wire protocol as the devbroker speaks it (pure code: bytes in, values out).

Frames, both directions over TCP: a 4-byte big-endian length, then a compact JSON header
object, then the body, with no separator (the header ends at its closing ``}``).

Over WebSocket (the JavaScript client, ``/amps/json``) the client sends a 4-byte
little-endian frame count, a text frame with the header and the body frame(s); the server
sends a text frame with the header and, for ``p``/``publish``/``oof`` only and never with
``"l":0``, one body frame. That framing lives in the server; this module builds and parses
the header bytes both transports share.

Rules for server headers, from what the official clients accept:

- compact JSON, flat string and number values, raw UTF-8 (no ``\\uXXXX``: the Python
  client drops such escapes) and no whitespace (the Python client's parser rejects it);
- ``s`` is an unquoted integer and never the last key: the JavaScript client extracts it
  with a regular expression that needs ``"s":<digits>,``;
- acks echo ``cid``, ``sub_id`` and ``query_id`` when the command carried them.

Client headers arrive with alias keys (``bookmark`` for ``bm``, ``cmd`` for ``c`` ...);
:func:`parse_header` maps them to the short names.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import struct
from collections.abc import Iterable, Mapping

from ampsflow.errors import OversizedHeaderError, ProtocolError

__all__ = [
    "LENGTH",
    "SERVER_VERSION",
    "Header",
    "ack",
    "command_name",
    "delivery_header",
    "encode_header",
    "excerpt",
    "frame",
    "json_string",
    "logon_ack",
    "parse_header",
    "persisted_publish_ack",
    "split_frame",
]

LENGTH = struct.Struct(">I")
"""The TCP length prefix: big-endian uint32 counting header plus body."""

WS_COUNT = struct.Struct("<I")
"""The JavaScript client's per-command frame count (little-endian uint32)."""

SERVER_VERSION = "5.3.4.0"
"""Reported in the logon ack. The JavaScript client needs four numeric parts and enables
``flush('persisted')`` only from 5.3.3.0 on."""

Header = dict[str, str | int]
"""A parsed client header: short key names, string or integer values."""

ALIASES: Mapping[str, str] = {
    "cmd": "c",
    "cmd_id": "cid",
    "ack": "a",
    "ack_type": "a",
    "topic": "t",
    "sub_ids": "sids",
    "bookmark": "bm",
    "batch_size": "bs",
    "opts": "o",
    "options": "o",
    "seq": "s",
    "expiration": "e",
    "auth_key": "pw",
    "group_seq_num": "gseq",
    "correlation_id": "x",
}
"""Long or alternative header keys the clients send, mapped to the short names."""

COMMANDS: Mapping[str, str] = {
    "p": "publish",
    "publish": "publish",
    "delta_publish": "publish",
    "subscribe": "subscribe",
    "delta_subscribe": "subscribe",
}
"""Command spellings that share a handler (anything else keeps its own name)."""

_decode = json.JSONDecoder().decode
# One encoder for every header string: json.dumps(ensure_ascii=False) builds a new
# encoder per call, which costs more than encoding a correlation id.
_encode_string = json.JSONEncoder(ensure_ascii=False).encode
# A lone surrogate (JSON "\\ud800" from a client) has no UTF-8 form: it becomes "?".
_UNENCODABLE = "replace"
_SHORT_KEYS = frozenset(
    (
        *("c", "cid", "a", "t", "x", "s", "sub_id", "query_id", "filter", "o", "bm", "e", "k"),
        *("client_name", "user_id", "pw", "mt", "version", "bs", "top_n", "orderby", "sow_keys"),
    )
)

# A flat JSON object: strings (with escapes) and anything without quotes or braces.
_HEADER_END = re.compile(rb'\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\}', re.DOTALL)


LOG_EXCERPT = 120
"""Characters of a client's frame, header or value that a log line shows at most."""


def excerpt(value: object, limit: int = LOG_EXCERPT) -> str:
    """Return ``repr(value)`` cut to about ``limit`` characters, saying how long it was.

    For log lines about client input: a hostile header can be megabytes long, and only
    the start of ``bytes``/``str`` is ever converted.
    """
    if isinstance(value, bytes | bytearray | str):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def split_frame(frame: bytes, max_header: int | None = None) -> tuple[bytes, bytes]:
    """Split a TCP frame (without its length prefix) into header and body bytes.

    Only the first ``max_header`` bytes are searched for the header's end, so a frame whose
    header is longer costs no more than one of that size.

    Raises:
        OversizedHeaderError: no header end within ``max_header`` bytes of a longer frame.
        ProtocolError: the frame does not start with a complete flat JSON object.
    """
    limit = len(frame) if max_header is None else min(len(frame), max_header)
    if frame[:1] == b"{":
        # Fast path (what the clients send): no backslash before the first "}" and an even
        # number of quotes before it, so it is outside every string and ends the object,
        # exactly where the regular expression below would end it.
        end = frame.find(b"}", 1, limit)
        if end > 0 and frame.find(b"\\", 1, end) < 0 and not frame.count(b'"', 1, end) & 1:
            return frame[: end + 1], frame[end + 1 :]
    window = frame if limit == len(frame) else frame[:limit]
    match = _HEADER_END.match(window)
    if match is None:
        if len(window) < len(frame):
            raise OversizedHeaderError(f"header longer than {max_header} bytes")
        raise ProtocolError("frame does not start with a JSON header object")
    end = match.end()
    return frame[:end], frame[end:]


def parse_header(raw: bytes | str) -> Header:
    """Decode a client header and map alias keys to the short names.

    Values are kept as they come (strings or integers); booleans become ``"true"`` /
    ``"false"``, floats their decimal text, and ``null`` values are dropped.

    Raises:
        ProtocolError: not UTF-8, not JSON, not an object, or a nested value.
    """
    try:
        value = _decode(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if type(value) is not dict:
        raise ProtocolError("header is not a JSON object")
    if _SHORT_KEYS.issuperset(value):
        # Fast path (every publish): short keys and plain values need no rewriting.
        for item in value.values():
            kind = type(item)
            if kind is not str and kind is not int:
                break
        else:
            return value
    header: Header = {}
    for key, item in value.items():
        name = ALIASES.get(key, key)
        if isinstance(item, bool):
            header[name] = "true" if item else "false"
        elif isinstance(item, str | int):
            header[name] = item
        elif isinstance(item, float):
            header[name] = repr(item)
        elif item is None:
            continue
        else:
            raise ProtocolError(f"header key {key!r} has a nested value")
    return header


def command_name(header: Header) -> str:
    """Return the handler name of a header's command (``""`` when it has none)."""
    c = str(header.get("c", ""))
    return COMMANDS.get(c, c)


def ack_types(header: Header) -> list[str]:
    """Return the ack types a command asks for, in order (``a:""`` asks for none)."""
    a = header.get("a")
    if not a:
        return []
    return [t for t in (part.strip() for part in str(a).split(",")) if t]


def options(header: Header) -> set[str]:
    """Return the command's comma-separated options (``o``) as a set of lower-case words."""
    o = header.get("o")
    if not o:
        return set()
    return {part.strip().lower() for part in str(o).split(",") if part.strip()}


def parse_sequence(value: str | int | None) -> int | None:
    """Return a client's ``s`` as an integer (Python sends a number, JavaScript a string).

    Raises:
        ProtocolError: present but not a non-negative integer.
    """
    if value is None or value == "":
        return None
    if isinstance(value, int):
        seq = value
    else:
        text = value.strip()
        if not text.isdigit():
            raise ProtocolError(f"sequence {value!r} is not an integer")
        seq = int(text)
    if seq < 0:
        raise ProtocolError(f"sequence {value!r} is negative")
    return seq


def json_string(value: str) -> str:
    """Return ``value`` as a compact JSON string literal with raw UTF-8.

    Only ``"``, ``\\`` and control characters are escaped; the Python client decodes
    ``\\"``, ``\\\\``, ``\\n`` and ``\\t`` but drops ``\\uXXXX``.
    """
    return _encode_string(value)


def encode_header(fields: Iterable[tuple[str, str | int]]) -> bytes:
    """Serialise header fields in the given order as compact UTF-8 JSON.

    Integers are written unquoted. ``s`` may not be the last key (the JavaScript client's
    rule): the caller orders fields; this function checks it.

    Raises:
        ValueError: ``s`` is the last key.
    """
    parts: list[str] = []
    last = ""
    for key, value in fields:
        literal = str(value) if isinstance(value, int) else json_string(value)
        parts.append(f'"{key}":{literal}')
        last = key
    if last == "s":
        raise ValueError("'s' must not be the last header key")
    return ("{" + ",".join(parts) + "}").encode("utf-8", _UNENCODABLE)


def frame(header: bytes, body: bytes = b"") -> bytes:
    """Return a TCP frame: length prefix, header, body."""
    return LENGTH.pack(len(header) + len(body)) + header + body


def _echo(command: Header) -> list[tuple[str, str | int]]:
    fields: list[tuple[str, str | int]] = []
    for key in ("cid", "sub_id", "query_id"):
        value = command.get(key)
        if value is not None and value != "":
            fields.append((key, str(value)))
    return fields


def ack(
    command: Header,
    ack_type: str,
    *,
    reason: str | None = None,
    extra: Iterable[tuple[str, str | int]] = (),
) -> bytes:
    """Build the ``ack_type`` ack of ``command``: success, or failure with ``reason``.

    Echoes ``cid``, ``sub_id`` and ``query_id`` (the JavaScript client routes acks by
    ``query_id``, else ``sub_id``, else ``cid``; the Python client by ``cid``).
    """
    fields: list[tuple[str, str | int]] = [("c", "ack"), ("a", ack_type)]
    fields += _echo(command)
    fields += list(extra)
    fields.append(("status", "failure" if reason is not None else "success"))
    if reason is not None:
        fields.append(("reason", reason))
    return encode_header(fields)


def logon_ack(command: Header, *, client_name: str, name_hash: int, last_seq: int) -> bytes:
    """Build the successful logon ack.

    The last persisted sequence for the client name goes in both ``s`` (read by the
    JavaScript client) and the second part of ``bm`` (read by the Python client).
    """
    fields: list[tuple[str, str | int]] = [("c", "ack"), ("a", "processed")]
    fields += _echo(command)
    fields += [
        ("status", "success"),
        ("client_name", client_name),
        ("version", SERVER_VERSION),
        ("s", last_seq),
        ("bm", f"{name_hash}|{last_seq}|"),
    ]
    return encode_header(fields)


def persisted_publish_ack(seq: int) -> bytes:
    """Build the cumulative persisted ack for a publish store: everything up to ``seq``."""
    return b'{"c":"ack","a":"persisted","s":%d,"status":"success"}' % seq


def subscription_persisted_ack(cid: str, sub_id: str, bookmark: str) -> bytes:
    """Build a bookmark subscription's persisted ack (``sub_id`` and ``bm``, never ``s``)."""
    return encode_header(
        [
            ("c", "ack"),
            ("a", "persisted"),
            ("cid", cid),
            ("sub_id", sub_id),
            ("bm", bookmark),
            ("status", "success"),
        ]
    )


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

HEARTBEAT = b'{"c":"heartbeat"}'
"""The server's heartbeat frame."""


def delivery_tail(
    topic: str, bookmark: str, correlation_id: str | None, timestamp: str | None = None
) -> bytes:
    """Return the part of a ``p`` header that is the same for every subscriber.

    :func:`delivery_header` puts the per-connection ``sids`` in front of it.
    """
    tail = f'"t":{_topic_literal(topic)},"bm":"{bookmark}"'
    if correlation_id:
        tail += f',"x":{json_string(correlation_id)}'
    if timestamp:
        tail += f',"ts":"{timestamp}"'
    return tail.encode("utf-8", _UNENCODABLE)


@functools.lru_cache(maxsize=4096)
def _topic_literal(topic: str) -> str:
    return json_string(topic)


def sid_literal(sub_id: str) -> bytes:
    """Return ``sub_id`` escaped for use inside the ``sids`` string (no quotes)."""
    return json_string(sub_id)[1:-1].encode("utf-8", _UNENCODABLE)


def delivery_header(sids: bytes, tail: bytes, *, empty_body: bool = False) -> bytes:
    """Return a ``p`` header for the subscriptions ``sids`` of one connection.

    ``sids`` is a comma-separated list of :func:`sid_literal` values. ``empty_body`` adds
    ``"l":0`` so the JavaScript client expects no body frame.
    """
    return b'{"c":"p","sids":"%s",%s%s' % (sids, tail, b',"l":0}' if empty_body else b"}")


def format_timestamp(timestamp_us: int) -> str:
    """Return ``YYYYMMDDTHHMMSS.ffffffZ`` (UTC) for microseconds since the Unix epoch."""
    moment = _EPOCH + datetime.timedelta(microseconds=timestamp_us)
    return moment.strftime("%Y%m%dT%H%M%S.%fZ")
