"""Reconcile published message ids against the persister's JSONL output.

Pure: the caller feeds the lines of both files; :func:`reconcile` returns an
:class:`AuditReport`. The published list holds one id per line in publish
order; a line ``PUBLISHER<TAB>ID`` names the publisher, so that several
publishers' ids can share one list (order is only defined per publisher: two
publishers' messages may be persisted in any interleaving). A line without a
tab belongs to the single unnamed publisher. Blank lines are ignored.

What counts:

* **lost**: published, never persisted;
* **duplicated**: persisted more than once;
* **out of order**: the fewest messages that, set aside, leave each
  publisher's messages in publish order (compared by the line of each id's
  first persisted copy), so one late message counts once;
* **torn**: the JSONL's last line has no terminating newline;
* **invalid**: a line that is not a JSON object.

Reported but not failures: ids persisted that were never published
(**unexpected**, e.g. other traffic on the topic), lines without an ``id``
(**unidentified**, e.g. a body kept raw because it was not JSON), and ids listed
twice in the published file (**republished**).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class AuditReport:
    """The outcome of a reconciliation. Lists keep file order; line numbers start at 1."""

    published: int = 0
    persisted_lines: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    torn_last_line: bool = False
    invalid_lines: list[int] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    unidentified_lines: list[int] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)

    @property
    def is_clean(self) -> bool:
        """True when nothing was lost, duplicated, reordered, torn or invalid."""
        return not (
            self.lost
            or self.duplicated
            or self.out_of_order
            or self.torn_last_line
            or self.invalid_lines
        )

    def to_json(self) -> dict[str, Any]:
        """The report as plain data (counts plus the full lists)."""
        return {
            "clean": self.is_clean,
            "published": self.published,
            "persisted_lines": self.persisted_lines,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "torn_last_line": self.torn_last_line,
            "invalid_lines": self.invalid_lines,
            "unexpected": self.unexpected,
            "unidentified_lines": self.unidentified_lines,
            "republished": self.republished,
        }


def normalise_id(value: object) -> str:
    """The text an ``id`` value is compared by: a string as is, else its JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def parse_published_line(line: str) -> tuple[str, str] | None:
    """Split a published-list line into (publisher, id); ``None`` for a blank line."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    publisher, tab, ident = text.partition("\t")
    return (publisher, ident) if tab else ("", text)


def reconcile(
    published: Iterable[str], persisted: Iterable[bytes], *, ordered: bool = True
) -> AuditReport:
    """Compare the published list with the persisted JSONL lines.

    Args:
        published: Lines of the published list, in publish order.
        persisted: Lines of the JSONL file as read in binary mode (each with its
            ``\\n`` except, when torn, the last).
        ordered: Check publish order. Off for pipelines that do not keep it
            (several processors sharing a queue); nothing is then out of order.

    Returns:
        The report; see the module docstring for what each part means.
    """
    report = AuditReport()
    order: list[tuple[str, str]] = []
    publishers: dict[str, str] = {}
    for line in published:
        parsed = parse_published_line(line)
        if parsed is None:
            continue
        publisher, ident = parsed
        report.published += 1
        if ident in publishers:
            report.republished.append(ident)
            continue
        publishers[ident] = publisher
        order.append((publisher, ident))

    first_line: dict[str, int] = {}
    counts: dict[str, int] = {}
    for number, raw in enumerate(persisted, start=1):
        report.persisted_lines += 1
        if not raw.endswith(b"\n"):
            # Only the last line can lack its newline: a write cut short. Its
            # content never counts, even when it happens to parse.
            report.torn_last_line = True
            continue
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            report.invalid_lines.append(number)
            continue
        if value.get("id") is None:
            report.unidentified_lines.append(number)
            continue
        ident = normalise_id(value["id"])
        counts[ident] = counts.get(ident, 0) + 1
        first_line.setdefault(ident, number)

    report.duplicated = {ident: n for ident, n in counts.items() if n > 1}
    report.lost = [ident for _, ident in order if ident not in first_line]
    report.unexpected = [ident for ident in first_line if ident not in publishers]
    streams: dict[str, list[tuple[str, int]]] = {}
    for publisher, ident in order:
        at = first_line.get(ident)
        if at is not None:
            streams.setdefault(publisher, []).append((ident, at))
    displaced: set[str] = set()
    for stream in streams.values() if ordered else ():
        displaced.update(_displaced(stream))
    report.out_of_order = [ident for _, ident in order if ident in displaced]
    return report


def _displaced(stream: list[tuple[str, int]]) -> set[str]:
    """The fewest ids whose removal leaves ``stream`` in increasing line order.

    ``stream`` is (id, persisted line) in publish order. The ids kept form a
    longest increasing subsequence of the lines (patience sorting, O(n log n)),
    so one message persisted late counts once, not every message it passed.
    """
    tails: list[int] = []  # tails[k]: index in stream ending the best run of length k+1
    previous: list[int] = [-1] * len(stream)
    for i, (_, at) in enumerate(stream):
        low, high = 0, len(tails)
        while low < high:
            mid = (low + high) // 2
            if stream[tails[mid]][1] < at:
                low = mid + 1
            else:
                high = mid
        previous[i] = tails[low - 1] if low > 0 else -1
        if low == len(tails):
            tails.append(i)
        else:
            tails[low] = i
    kept: set[int] = set()
    i = tails[-1] if tails else -1
    while i >= 0:
        kept.add(i)
        i = previous[i]
    return {ident for i, (ident, _) in enumerate(stream) if i not in kept}


def format_report(report: AuditReport, *, limit: int = 20) -> str:
    """A human-readable report: one count per line, then up to ``limit`` examples each."""

    def sample(items: Iterable[object]) -> str:
        shown = list(items)
        text = ", ".join(str(i) for i in shown[:limit])
        return f" ({text}{', ...' if len(shown) > limit else ''})" if shown else ""

    dup = [f"{ident} x{n}" for ident, n in report.duplicated.items()]
    lines = [
        f"published ids:      {report.published}",
        f"persisted lines:    {report.persisted_lines}",
        f"lost:               {len(report.lost)}{sample(report.lost)}",
        f"duplicated:         {len(report.duplicated)}{sample(dup)}",
        f"out of order:       {len(report.out_of_order)}{sample(report.out_of_order)}",
        f"torn last line:     {'yes' if report.torn_last_line else 'no'}",
        f"invalid lines:      {len(report.invalid_lines)}{sample(report.invalid_lines)}",
        f"unexpected ids:     {len(report.unexpected)}{sample(report.unexpected)}",
        f"lines without id:   {len(report.unidentified_lines)}{sample(report.unidentified_lines)}",
        f"republished ids:    {len(report.republished)}{sample(report.republished)}",
        f"result:             {'clean' if report.is_clean else 'PROBLEMS FOUND'}",
    ]
    return "\n".join(lines) + "\n"
