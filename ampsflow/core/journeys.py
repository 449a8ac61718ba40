"""Journeys: what became of each traced message, from the spans the marker relays.

A journey is one trace. Its hops are the pipeline's spans by name:
``publish-message`` (the page or another publisher), ``process-message``
(the processor), ``persist-message`` (the persister). From them
:func:`summarise` derives where the message is (``published``,
``processed``, ``persisted``, ``dead-lettered`` or ``failed``), each hop's
duration, the end-to-end latency and the first error.

:class:`JourneyIndex` keeps the most recent journeys in memory, bounded by
span count and by an estimate of their size in bytes; when either bound is
passed the oldest journeys (by first span seen) are evicted whole and
counted. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

AttributeValue = str | int | float | bool

HOPS: Mapping[str, str] = {
    "publish-message": "published",
    "process-message": "processed",
    "persist-message": "persisted",
}
"""Span name -> the state a message reaches when that span ends well."""

SEND_SPAN = "send-message"

DEAD_LETTER_ATTRIBUTE = "ampsflow.dead_letter.topic"
"""Set by the processor on the span of a message it sent to the dead-letter topic."""

MAX_ATTRIBUTES = 40
"""Attributes kept per span (the first ones in the span's order)."""

MAX_VALUE_CHARS = 512
"""Longer attribute values and messages are cut to this many characters."""

_SPAN_OVERHEAD_BYTES = 1200
"""Estimated fixed memory of one indexed span: the record, its attribute dict and
strings, and its slots in the trace maps (tracemalloc measured ~1,300 bytes for a span
with four attributes, of which ~150 are its text)."""

Status = Literal["UNSET", "OK", "ERROR"]


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One span as the index keeps it.

    ``error_message`` is the message of the span's first exception event, if any.
    """

    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status: Status
    status_message: str
    error_type: str | None
    error_message: str | None
    attributes: Mapping[str, AttributeValue]
    events: tuple[str, ...] = ()

    @property
    def duration_ms(self) -> float:
        """End minus start, milliseconds (0 when the clocks disagree)."""
        return max(0, self.end_ns - self.start_ns) / 1e6

    def size(self) -> int:
        """Estimated bytes this span holds in memory."""
        text = sum(len(k) + len(str(v)) for k, v in self.attributes.items())
        return (
            _SPAN_OVERHEAD_BYTES
            + text
            + len(self.service)
            + len(self.name)
            + len(self.status_message)
            + len(self.error_message or "")
            + sum(len(e) for e in self.events)
        )

    def to_dict(self) -> dict[str, Any]:
        """The span as JSON-ready data."""
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "service": self.service,
            "name": self.name,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ms, 3),
            "status": self.status,
            "status_message": self.status_message,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attributes": dict(self.attributes),
            "events": list(self.events),
        }


def message_id_of(spans: Iterable[SpanRecord]) -> str | None:
    """The message's own id.

    ``messaging.message.id`` of the publish, else any span's ``ampsflow.message.id``.
    """
    fallback = None
    for span in spans:
        if span.name == "publish-message":
            value = span.attributes.get("messaging.message.id")
            if isinstance(value, str):
                return value
        value = span.attributes.get("ampsflow.message.id")
        if isinstance(value, str) and fallback is None:
            fallback = value
    return fallback


def _error_text(span: SpanRecord) -> str:
    detail = span.status_message or span.error_message or span.error_type or "error"
    return f"{span.name}: {detail}"


def summarise(spans: Iterable[SpanRecord], *, dead_letter_topic: str | None) -> dict[str, Any]:
    """Where a journey is, hop by hop, as JSON-ready data (its spans included).

    Keys: ``trace_id``, ``message_id``, ``state`` (``published``, ``processed``,
    ``persisted``, ``dead-lettered``, ``failed`` or ``unknown``), ``failed``,
    ``error`` (the first failed hop's text), ``hops`` (``publish``, ``process``,
    ``persist`` as present, with service, duration, status, error, fsync'd),
    ``total_ms`` (first hop's start to the persist's end; None until persisted),
    ``start_ns`` and ``spans``.
    """
    ordered = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    trace_id = ordered[0].trace_id if ordered else ""
    hops: list[dict[str, Any]] = []
    # The processor names the dead-letter topic on its span; a separate
    # send-message span to that topic means the same.
    dlq: str | None = None
    for s in ordered:
        topic = s.attributes.get(DEAD_LETTER_ATTRIBUTE)
        if isinstance(topic, str):
            dlq = topic
        elif (
            s.name == SEND_SPAN
            and dead_letter_topic is not None
            and s.attributes.get("messaging.destination.name") == dead_letter_topic
        ):
            dlq = dead_letter_topic
    dead_lettered = dlq is not None
    state = "unknown"
    error: str | None = None
    for span in ordered:
        if span.name not in HOPS:
            continue
        failed = span.status == "ERROR"
        text = _error_text(span) if failed else None
        if failed and span.name == "process-message" and dead_lettered:
            text = f"{text}, dead-lettered to {dlq}"
        if text is not None and error is None:
            error = text
        hops.append(
            {
                "hop": HOPS[span.name],
                "name": span.name,
                "service": span.service,
                "span_id": span.span_id,
                "start_ns": span.start_ns,
                "end_ns": span.end_ns,
                "duration_ms": round(span.duration_ms, 3),
                "status": span.status,
                "error": text,
                "fsynced": not failed and "fsync" in span.events,
            }
        )
    rank = {"published": 1, "processed": 2, "persisted": 3}
    good = [h for h in hops if h["status"] != "ERROR"]
    if good:
        state = max((h["hop"] for h in good), key=lambda hop: rank[hop])
    failed_any = any(s.status == "ERROR" for s in ordered)
    if dead_lettered:
        state = "dead-lettered"
    elif failed_any:
        state = "failed"
        if error is None:
            error = next(_error_text(s) for s in ordered if s.status == "ERROR")
    # End to end: from the first hop's start to the end of the persist (the
    # publish span itself lasts until the broker's ack, which may come later).
    total_ms = None
    persisted = [h for h in hops if h["hop"] == "persisted" and h["status"] != "ERROR"]
    if hops and persisted:
        total_ms = round((persisted[-1]["end_ns"] - min(h["start_ns"] for h in hops)) / 1e6, 3)
    return {
        "trace_id": trace_id,
        "message_id": message_id_of(ordered),
        "state": state,
        "failed": failed_any,
        "error": error,
        "hops": hops,
        "total_ms": total_ms,
        "start_ns": ordered[0].start_ns if ordered else 0,
        "spans": [s.to_dict() for s in ordered],
    }


@dataclass(slots=True)
class IndexStats:
    """What the index holds and has evicted."""

    traces: int = 0
    spans: int = 0
    bytes: int = 0
    evicted_traces: int = 0
    evicted_spans: int = 0


@dataclass(slots=True)
class JourneyIndex:
    """The most recent journeys, bounded by ``max_spans`` and ``max_bytes``."""

    max_spans: int
    max_bytes: int
    stats: IndexStats = field(default_factory=IndexStats)
    _traces: OrderedDict[str, dict[str, SpanRecord]] = field(default_factory=OrderedDict)
    _sizes: dict[str, int] = field(default_factory=dict)
    _by_message: dict[str, set[str]] = field(default_factory=dict)

    def add(self, spans: Iterable[SpanRecord]) -> set[str]:
        """Index ``spans`` (a span seen again replaces its earlier copy).

        Returns:
            The trace ids touched and still held.
        """
        touched: set[str] = set()
        for span in spans:
            trace = self._traces.get(span.trace_id)
            if trace is None:
                trace = self._traces[span.trace_id] = {}
                self._sizes[span.trace_id] = 0
                self.stats.traces += 1
            old = trace.get(span.span_id)
            if old is not None:
                self._account(span.trace_id, -1, -old.size())
                self._forget_message(old, span.trace_id)
            trace[span.span_id] = span
            self._account(span.trace_id, 1, span.size())
            touched.add(span.trace_id)
            message_id = message_id_of((span,))
            if message_id is not None:
                self._by_message.setdefault(message_id, set()).add(span.trace_id)
        self._evict()
        return {t for t in touched if t in self._traces}

    def _account(self, trace_id: str, spans: int, size: int) -> None:
        self.stats.spans += spans
        self.stats.bytes += size
        self._sizes[trace_id] += size

    def _evict(self) -> None:
        while self._traces and (
            self.stats.spans > self.max_spans or self.stats.bytes > self.max_bytes
        ):
            trace_id, trace = self._traces.popitem(last=False)
            self.stats.traces -= 1
            self.stats.spans -= len(trace)
            self.stats.bytes -= self._sizes.pop(trace_id)
            self.stats.evicted_traces += 1
            self.stats.evicted_spans += len(trace)
            for span in trace.values():
                self._forget_message(span, trace_id)

    def _forget_message(self, span: SpanRecord, trace_id: str) -> None:
        message_id = message_id_of((span,))
        if message_id is None:
            return
        owners = self._by_message.get(message_id)
        if owners is not None:
            owners.discard(trace_id)
            if not owners:
                del self._by_message[message_id]

    def spans(self, trace_id: str) -> list[SpanRecord]:
        """The spans held for ``trace_id`` (empty if unknown or evicted)."""
        return list(self._traces.get(trace_id, {}).values())

    def traces_of_message(self, message_id: str) -> list[str]:
        """Trace ids whose spans name ``message_id``, oldest first."""
        owners = self._by_message.get(message_id, set())
        return [t for t in self._traces if t in owners]

    def recent(self, limit: int, *, failed_only: bool = False) -> list[str]:
        """Up to ``limit`` trace ids, newest first; only those with an ERROR span if asked."""
        out: list[str] = []
        for trace_id in reversed(self._traces):
            if len(out) >= limit:
                break
            if failed_only and not any(
                s.status == "ERROR" for s in self._traces[trace_id].values()
            ):
                continue
            out.append(trace_id)
        return out
