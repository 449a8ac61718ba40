"""The processor's transformation: parse a message body, mark it processed, serialise.

Pure: bytes in, bytes out, no I/O. Bad input raises
:class:`~ampsflow.errors.BadMessageError` whose ``error_type`` is one of
:data:`ERROR_TYPES`, recorded as ``error.type`` on the span and as the
dead-letter ``reason``.

The rules are those of I-JSON (RFC 7493), so that every output parses the same
way in any JSON reader downstream, the persister's and ``ampsflow audit``'s
included (the persister parses with :func:`parse_body` too):

- the body is UTF-8 and at most ``max_bytes`` long;
- it is one JSON object, nested at most :data:`MAX_DEPTH` levels
  (``too_deep``); ``NaN``, ``Infinity`` and numbers that do not fit a
  double (``1e999``) or an integer of ``sys.get_int_max_str_digits()`` digits
  are rejected (Python would turn them into values no JSON can carry);
- no string (key or value) holds a lone surrogate: the escape ``"\\ud800"``
  is valid JSON syntax but names no character, has no UTF-8 form, and strict
  readers reject it, so it is rejected as ``invalid_unicode`` rather than
  passed on escaped;
- no object repeats a key: ``{"a":1,"a":2}`` means different things to
  different readers (first wins, last wins, error), so it is rejected as
  ``duplicate_key`` rather than silently keeping the last value.

:func:`render_output` builds the processed output under a size bound and
decides where its CorrelationId travels; :func:`dead_letter_body` builds the
dead-letter envelope, cutting the original body down (and saying so) so that the
envelope too fits the bound.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

from ampsflow.errors import BadMessageError

CORRELATION_ID_FIELD = "CorrelationId"
"""Payload field that carries the CorrelationId (next to, or instead of, the header)."""

PROCESSED_FIELD = "processed"
"""Field the processor sets to ``true``."""

ERROR_TYPES = (
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "too_deep",
    "invalid_unicode",
    "duplicate_key",
    "number_out_of_range",
    "output_too_large",
    "internal_error",
)
"""Every ``error_type`` a message can be rejected with: :func:`parse_body` raises
the first eight, :func:`render_output` ``output_too_large``; ``internal_error`` is
what a service records for any other exception raised while handling one
message."""

PUBLISH_HEADER_RESERVE_BYTES = 1024
"""Bytes of an AMPS frame kept for the publish header (command, topic, sequence,
CorrelationId, ...) besides the topic name, when a body is sized to fit
``max_message_bytes``."""

MAX_DEPTH = 512
"""Deepest nesting of arrays and objects accepted. Fixed, well below Python's
recursion limit, so a body is accepted or refused the same way whatever the
call depth of the parser (and every reader after it can serialise it)."""

MAX_DETAIL_CHARS = 500
"""Longest ``detail`` kept in a dead-letter envelope."""

Carrier = Literal["header", "payload", "both"]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_MAX_QUOTED = 80


def publish_budget(max_message_bytes: int, topic: str) -> int:
    """The largest body that fits a frame of ``max_message_bytes`` published to ``topic``."""
    return max_message_bytes - PUBLISH_HEADER_RESERVE_BYTES - len(topic.encode("utf-8"))


def _reject_constant(name: str) -> Any:
    raise BadMessageError("invalid_json", f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BadMessageError("number_out_of_range", f"{_quote(text)} does not fit a double")
    return value


def _parse_int(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(text.lstrip("-")) > limit:
        raise BadMessageError(
            "number_out_of_range", f"an integer of {len(text.lstrip('-'))} digits (limit {limit})"
        )
    return int(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadMessageError("duplicate_key", f"key {_quote(key)} appears more than once")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_float=_parse_float,
    parse_int=_parse_int,
    object_pairs_hook=_object,
)
"""One decoder for every body (``json.loads`` with hooks would build one per call)."""

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every output (``json.dumps`` with options builds one per call)."""


def _quote(text: str) -> str:
    """``repr`` of ``text``, cut to a readable length (details and logs stay small)."""
    if len(text) > _MAX_QUOTED:
        return repr(text[:_MAX_QUOTED]) + f"... ({len(text)} characters)"
    return repr(text)


def parse_body(body: bytes | str, *, max_bytes: int) -> dict[str, Any]:
    """Parse a message body into a JSON object, by the rules in the module docstring.

    Args:
        body: The raw body (UTF-8 bytes, or text already decoded).
        max_bytes: Largest accepted body, in UTF-8 bytes.

    Raises:
        BadMessageError: ``too_large`` when over ``max_bytes``, ``invalid_utf8``,
            ``invalid_json`` (also for ``NaN``/``Infinity``), ``too_deep`` (over
            :data:`MAX_DEPTH` levels), ``number_out_of_range``, ``duplicate_key``,
            ``invalid_unicode`` (a lone surrogate), ``not_an_object`` for valid
            JSON that is not an object.
    """
    size = len(body.encode("utf-8", "surrogatepass")) if isinstance(body, str) else len(body)
    if size > max_bytes:
        raise BadMessageError("too_large", f"{size} bytes exceeds the limit of {max_bytes}")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadMessageError("invalid_utf8", f"byte {exc.start}: {exc.reason}") from None
    else:
        text = body
    try:
        value = _DECODER.decode(text)
    except BadMessageError:
        raise
    except json.JSONDecodeError as exc:
        raise BadMessageError(
            "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise BadMessageError("invalid_json", str(exc)) from None
    except RecursionError:
        raise BadMessageError("too_deep", f"nested deeper than {MAX_DEPTH} levels") from None
    # Only a text with that many brackets can be nested that deep: the walk is
    # skipped for ordinary bodies.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth_exceeds(value, MAX_DEPTH):
        raise BadMessageError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(value, dict):
        raise BadMessageError("not_an_object", f"got a JSON {_json_type(value)}")
    if (isinstance(body, str) or _SURROGATE_ESCAPE.search(text)) and _has_lone_surrogate(value):
        raise BadMessageError("invalid_unicode", "a string holds a lone surrogate (no UTF-8 form)")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects in ``value`` nest more than ``limit`` levels (iteratively)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any key or string in a parsed JSON value has no UTF-8 form (iteratively)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[str] = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def payload_correlation_id(message: dict[str, Any]) -> str | None:
    """The ``CorrelationId`` field of a parsed message, when it is a string."""
    value = message.get(CORRELATION_ID_FIELD)
    return value if isinstance(value, str) else None


def mark_processed(
    message: dict[str, Any], *, correlation_id: str, carrier: Carrier
) -> dict[str, Any]:
    """A copy of ``message`` with ``processed: true`` and, per ``carrier``, the new CorrelationId.

    With carrier ``header`` the payload keeps no ``CorrelationId`` field (a stale
    one from the input would point at the wrong parent), so it is removed.
    """
    out = dict(message)
    out[PROCESSED_FIELD] = True
    if carrier in ("payload", "both"):
        out[CORRELATION_ID_FIELD] = correlation_id
    else:
        out.pop(CORRELATION_ID_FIELD, None)
    return out


@dataclass(frozen=True, slots=True)
class Output:
    """A processed message ready to publish."""

    body: bytes
    """The serialised object (with ``processed`` and, per carrier, ``CorrelationId``)."""
    header_correlation_id: str | None
    """The CorrelationId for the AMPS header, or ``None`` when the carrier is ``payload``."""


def render_output(
    message: dict[str, Any], *, correlation_id: str, carrier: Carrier, max_bytes: int
) -> Output:
    """The output for ``message``: where its CorrelationId travels, and its bytes.

    The one place that applies the ``carrier`` setting: ``header`` puts the
    CorrelationId in the AMPS header only, ``payload`` in the JSON field only,
    ``both`` in both (see :func:`mark_processed` for the field).

    Raises:
        BadMessageError: ``output_too_large`` when the serialised output is
            over ``max_bytes`` (it would exceed the broker's frame cap and be
            refused on every re-send).
    """
    out = mark_processed(message, correlation_id=correlation_id, carrier=carrier)
    body = serialise(out)
    if len(body) > max_bytes:
        raise BadMessageError(
            "output_too_large",
            f"the processed output is {len(body)} bytes, over the limit of {max_bytes}",
        )
    header = correlation_id if carrier in ("header", "both") else None
    return Output(body, header)


def serialise(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept as is).

    Raises:
        UnicodeEncodeError: for a lone surrogate (which :func:`parse_body` rejects).
        ValueError: for NaN or Infinity (which :func:`parse_body` rejects).
    """
    return _ENCODER.encode(message).encode("utf-8")


def dead_letter_body(
    body: bytes,
    error: BadMessageError,
    *,
    topic: str,
    bookmark: str | None,
    correlation_id: str | None,
    max_bytes: int,
) -> bytes:
    """The JSON envelope sent to the dead-letter topic for a rejected message.

    ``{"reason", "detail", "topic", "bookmark", "CorrelationId", "body_bytes",
    "body_sha256", "body_truncated", "body"}``: ``body`` is the original body
    as text, or ``body_base64`` when it is not valid UTF-8; ``body_bytes`` and
    ``body_sha256`` are the length and SHA-256 (hex) of the whole original
    body. ``CorrelationId`` is that of the span that rejected it, so the dead
    letter links back to the trace.

    The envelope is at most ``max_bytes`` long: when the whole body does not
    fit, the longest prefix that does is kept (cut at a character boundary)
    and ``body_truncated`` is ``true``. Never raises, whatever the inputs.
    """
    envelope: dict[str, Any] = {
        "reason": error.error_type,
        "detail": _cut(error.detail, MAX_DETAIL_CHARS),
        "topic": _cut(topic, MAX_DETAIL_CHARS),
        "bookmark": _cut(bookmark, MAX_DETAIL_CHARS),
        CORRELATION_ID_FIELD: _cut(correlation_id, MAX_DETAIL_CHARS),
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_truncated": False,
    }
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    key = "body" if text is not None else "body_base64"
    whole = _dump_envelope({**envelope, key: text if text is not None else _b64(body)})
    if len(whole) <= max_bytes:
        return whole
    envelope["body_truncated"] = True
    room = max_bytes - len(_dump_envelope({**envelope, key: ""}))
    if text is None:
        keep = max(0, room // 4 * 3)
        return _dump_envelope({**envelope, key: _b64(body[:keep])})
    # The escaped size of a prefix is not known in advance (a control
    # character takes six bytes, an ASCII letter one): shrink in proportion
    # until it fits; two or three rounds at most.
    size = len(whole) - len(_dump_envelope({**envelope, key: ""}))
    keep = len(body)
    while True:
        keep = max(0, min(keep - 1, int(keep * room / max(size, 1))))
        prefix = body[:keep].decode("utf-8", "ignore")
        candidate = _dump_envelope({**envelope, key: prefix})
        if len(candidate) <= max_bytes or keep == 0:
            return candidate
        size = len(candidate) - len(_dump_envelope({**envelope, key: ""}))


def _dump_envelope(envelope: dict[str, Any]) -> bytes:
    try:
        return serialise(envelope)
    except UnicodeEncodeError:
        # A lone surrogate in a detail or topic: escaped ASCII keeps it exactly.
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _cut(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "..."


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
