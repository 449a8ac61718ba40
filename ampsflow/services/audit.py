"""``ampsflow audit``: reconcile a list of published message ids against the JSONL.

Exit status: 0 when the JSONL holds every published message exactly once, in
publish order per publisher (unless ``--any-order``: several processors sharing
a queue process messages in parallel), with no torn or invalid line; 1 when it does not;
2 when a file cannot be read. The report goes to stdout, as text or (``--json``)
as one JSON object. See :mod:`ampsflow.core.audit` for what each count means.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ampsflow.config import Config
from ampsflow.core.audit import format_report, reconcile

EXIT_CLEAN = 0
EXIT_PROBLEMS = 1
EXIT_UNREADABLE = 2


def _text_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as file:
        yield from file


def _binary_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield from file


def run(config: Config, args: argparse.Namespace) -> int:
    """Run the audit for ``args.published`` and ``args.jsonl``; return the exit status.

    ``config`` is unused: the audit reads only the two files it is given.
    """
    published: Path = args.published
    jsonl: Path = args.jsonl
    try:
        report = reconcile(_text_lines(published), _binary_lines(jsonl), ordered=not args.any_order)
    except OSError as exc:
        print(
            f"ampsflow audit: cannot read {exc.filename}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_UNREADABLE
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_report(report))
    return EXIT_CLEAN if report.is_clean else EXIT_PROBLEMS
