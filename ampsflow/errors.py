"""Every exception ampsflow raises on purpose, with when it is raised."""

from __future__ import annotations

from dataclasses import dataclass

EX_CONFIG = 78
"""Exit status for a bad configuration (sysexits.h EX_CONFIG); units set
``RestartPreventExitStatus=78`` so systemd does not restart-loop on it."""


class AmpsflowError(Exception):
    """Base class of every ampsflow error."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file: where it is and what is wrong."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class ConfigError(AmpsflowError):
    """Raised when a config file cannot be read or fails validation.

    Carries every problem found, not only the first, so an operator fixes the
    file in one pass.
    """

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class CorrelationIdError(AmpsflowError):
    """Raised by the correlation codec when a CorrelationId cannot be decoded.

    ``reason`` is a short, stable code (``empty``, ``wrong_length``,
    ``bad_separator``, ``not_hex``, ``version_ff``, ``zero_trace_id``,
    ``zero_span_id``, ``not_a_string``, ``out_of_range``) shared with the golden
    vectors and recorded on spans; ``detail`` says more, for log lines.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class BadMessageError(AmpsflowError):
    """Raised when a message body cannot be processed (not JSON, not an object).

    ``error_type`` is the short, stable name recorded as ``error.type`` on the
    span and as the dead-letter reason.
    """

    def __init__(self, error_type: str, detail: str) -> None:
        self.error_type = error_type
        self.detail = detail
        super().__init__(f"{error_type}: {detail}")


class SinkError(AmpsflowError):
    """Raised when the JSONL sink cannot write or fsync a batch.

    Chained from the ``OSError`` (``ENOSPC``, ``EIO``, ``EACCES``...). Nothing in
    the batch counts as durable; the caller retries the whole batch.
    """


class RecordError(AmpsflowError, ValueError):
    """Raised when a persisted JSONL line cannot be built or parsed.

    The message says why (``not JSON: ...``, ``no _ampsflow object``).
    """


class AmpsError(AmpsflowError):
    """Raised when an AMPS operation (subscribe, publish) fails in a way the caller must handle.

    Chained from the official client's exception; the message says what was attempted.
    """


class StartupError(AmpsflowError):
    """Raised when a service cannot start; the message is one line for stderr."""


class FilterError(AmpsflowError, ValueError):
    """Raised when a devbroker content filter cannot be compiled.

    The message says what is wrong and where (``unexpected token ')' at column
    12``); the broker nacks the subscribe with reason ``bad filter`` and logs it.
    """


class TopicError(AmpsflowError, ValueError):
    """Raised when a subscription topic cannot be used.

    ``str(exc)`` and ``exc.reason`` are the AMPS failure reason to nack with:
    ``bad regex topic`` for a regular expression that does not compile,
    ``invalid topic`` for an empty or otherwise unusable name. ``exc.detail``
    says what exactly is wrong, for the log line.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(reason)


class BookmarkError(AmpsflowError, ValueError):
    """Raised when a subscribe's bookmark cannot be parsed.

    The message starts with ``invalid bookmark:`` and says what is wrong; the devbroker
    nacks the subscribe with reason ``invalid bookmark`` and logs the message.
    """


class TransactionLogError(AmpsflowError):
    """Raised when the devbroker transaction log cannot be opened, written or fsync'd.

    The message names the directory or file and the operating-system error, in one line.
    """


class ProtocolError(AmpsflowError, ValueError):
    """Raised by the devbroker when a client frame or header cannot be understood.

    The message says what is wrong (``header is not valid JSON: ...``); the broker answers
    with a failure ack when it can tell which command it was, otherwise it closes the
    connection, logs the message and counts it.
    """


class OversizedHeaderError(ProtocolError):
    """Raised by the devbroker when a client header is longer than ``max_header_bytes``.

    The broker answers with a failure ack when it finds the ``cid`` in the header's first
    bytes, logs only a prefix, counts it and closes the connection.
    """


class AuthError(AmpsflowError):
    """Raised when the devbroker users file cannot be read or has a malformed line.

    The message names the file and line; the broker refuses to start.
    """


class SetupError(AmpsflowError):
    """Raised by ``ampsflow setup-system`` when a step cannot be planned or applied.

    The message says what is missing (e.g. ``systemd-sysusers``) and what to do.
    """


class OtlpBodyError(AmpsflowError):
    """Raised by the marker's span relay when an OTLP upload cannot be read.

    ``reason`` is ``too_large`` (decompresses past the cap), ``bad_gzip`` or
    ``malformed`` (not a valid ``ExportTraceServiceRequest``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
