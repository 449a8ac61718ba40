"""Logging setup shared by every ampsflow command.

Records go to stderr (journald under systemd) unless ``logging.file`` is set,
in which case a :class:`logging.handlers.WatchedFileHandler` reopens the file
after logrotate moves it. Every record carries ``trace_id`` and ``span_id`` of
the span that was current when it was logged (empty outside a span).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence

from opentelemetry import trace

from ampsflow.config import LoggingConfig

_FORMAT = "%(levelname)s %(name)s: %(message)s%(trace_suffix)s"


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id``/``span_id`` (and a printable suffix) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            trace_id = format(context.trace_id, "032x")
            span_id = format(context.span_id, "016x")
            suffix = f" trace_id={trace_id} span_id={span_id}"
        else:
            trace_id = span_id = suffix = ""
        record.__dict__.update(trace_id=trace_id, span_id=span_id, trace_suffix=suffix)
        return True


def configure_logging(
    config: LoggingConfig, *, service: str, filters: Sequence[logging.Filter] = ()
) -> None:
    """Install the root handler for ``service`` according to ``config``.

    Under journald (``JOURNAL_STREAM`` set) lines carry no timestamp, since the
    journal adds its own; elsewhere they start with one. ``filters`` are added to
    the handler (the lifecycle adds the telemetry export filter,
    :class:`ampsflow.adapters.export_health.ExportLogFilter`).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if config.file is not None:
        handler = logging.handlers.WatchedFileHandler(config.file, encoding="utf-8")
        fmt = f"%(asctime)s {service}[%(process)d] {_FORMAT}"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = _FORMAT if os.environ.get("JOURNAL_STREAM") else f"%(asctime)s {service} {_FORMAT}"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(TraceContextFilter())
    for extra in filters:
        handler.addFilter(extra)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    # Third-party libraries log per request at INFO; keep them at WARNING so
    # INFO stays reserved for ampsflow's lifecycle transitions.
    for noisy in ("aiohttp.access", "urllib3", "opentelemetry"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
