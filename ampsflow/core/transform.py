"""The processor's transformation: parse a message body, mark it processed, serialise.

Pure: bytes in, bytes out, no I/O. Bad input raises
:class:`~ampsflow.errors.BadMessageError` whose ``error_type`` is one of
:data:`ERROR_TYPES`, recorded as ``error.type`` on the span and as the
dead-letter ``reason``.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Literal

from ampsflow.errors import BadMessageError

CORRELATION_ID_FIELD = "CorrelationId"
"""Payload field that carries the CorrelationId (next to, or instead of, the header)."""

PROCESSED_FIELD = "processed"
"""Field the processor sets to ``true``."""

ERROR_TYPES = ("too_large", "invalid_utf8", "invalid_json", "not_an_object")
"""Every ``error_type`` :func:`parse_body` can raise."""

Carrier = Literal["header", "payload", "both"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(body: bytes | str, *, max_bytes: int) -> dict[str, Any]:
    """Parse a message body into a JSON object.

    Args:
        body: The raw body (UTF-8 bytes, or text already decoded).
        max_bytes: Largest accepted body, in UTF-8 bytes.

    Raises:
        BadMessageError: ``too_large`` when over ``max_bytes``, ``invalid_utf8``,
            ``invalid_json`` (also for ``NaN``/``Infinity`` and nesting too deep to
            parse), ``not_an_object`` for valid JSON that is not an object.
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
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadMessageError(
            "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise BadMessageError("invalid_json", str(exc)) from None
    except RecursionError:
        raise BadMessageError("invalid_json", "nested too deeply") from None
    if not isinstance(value, dict):
        raise BadMessageError("not_an_object", f"got a JSON {_json_type(value)}")
    return value


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


def serialise(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept as is)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dead_letter_body(
    body: bytes,
    error: BadMessageError,
    *,
    topic: str,
    bookmark: str | None,
    correlation_id: str | None,
) -> bytes:
    """The JSON envelope sent to the dead-letter topic for a rejected message.

    ``{"reason", "detail", "topic", "bookmark", "CorrelationId", "body"}`` where
    ``body`` is the original body as text, or ``body_base64`` when it is not
    valid UTF-8. ``CorrelationId`` is that of the span that rejected it, so
    the dead letter links back to the trace.
    """
    envelope: dict[str, Any] = {
        "reason": error.error_type,
        "detail": error.detail,
        "topic": topic,
        "bookmark": bookmark,
        CORRELATION_ID_FIELD: correlation_id,
    }
    try:
        envelope["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        envelope["body_base64"] = base64.b64encode(body).decode("ascii")
    return serialise(envelope)


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
