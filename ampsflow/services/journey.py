"""``ampsflow journey <message id | trace id>``: one message's journey at a terminal.

Reads the marker's journey index over HTTP (``GET /api/journeys/{trace id}``
or ``GET /api/journeys?message_id=ID`` on ``marker.listen``, or ``--marker
URL``), prints each hop with its service, duration and error, then the
message's line from the persister's JSONL (``persister.path``) if it is
there. Exit status 0 when a journey or a line was found, 1 when neither was,
2 when the marker cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ampsflow.config import Config, parse_host_port

HTTP_TIMEOUT_S = 10.0

_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


def marker_base_url(config: Config) -> str:
    """``http://host:port`` of the marker from ``marker.listen`` (a wildcard means loopback)."""
    host, port = parse_host_port(config.marker.listen)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _get(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = None
        return exc.code, body


def fetch_journeys(base: str, ident: str) -> list[dict[str, Any]]:
    """The journeys of ``ident`` (a trace id, else a message id), newest first.

    Raises:
        OSError: when the marker cannot be reached or answers unexpectedly.
    """
    if _TRACE_ID.match(ident):
        status, body = _get(f"{base}/api/journeys/{ident.lower()}")
        if status == 200:
            return [body]
        if status != 404:
            raise OSError(f"{base} answered HTTP {status}: {_detail(body)}")
    query = urllib.parse.urlencode({"message_id": ident})
    status, body = _get(f"{base}/api/journeys?{query}")
    if status != 200:
        raise OSError(f"{base} answered HTTP {status}: {_detail(body)}")
    return list(body.get("journeys", []))


def _detail(body: object) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return "(no details)"


def jsonl_lines(path: Path, *, message_ids: set[str], trace_ids: set[str]) -> Iterator[str]:
    """Lines of the JSONL whose ``id`` or ``_ampsflow.trace_id`` is one of those given."""
    needles = [s for s in (*message_ids, *trace_ids) if s]
    if not needles:
        return
    with path.open("r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not any(n in line for n in needles):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            provenance = record.get("_ampsflow")
            trace = provenance.get("trace_id") if isinstance(provenance, dict) else None
            if record.get("id") in message_ids or trace in trace_ids:
                yield line.rstrip("\n")


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def print_journey(journey: dict[str, Any], out: IO[str]) -> None:
    """One journey as an operator reads it."""
    total = journey.get("total_ms")
    head = (
        f"trace {journey['trace_id']}  message {journey.get('message_id') or '?'}  "
        f"state {journey['state']}"
    )
    if total is not None:
        head += f"  total {_ms(total)}"
    print(head, file=out)
    for hop in journey.get("hops", []):
        mark = "FAILED" if hop["status"] == "ERROR" else "ok"
        extra = "  fsync'd" if hop.get("fsynced") else ""
        print(
            f"  {hop['hop']:<10} {hop['service']:<16} {hop['name']:<16} "
            f"{_ms(hop['duration_ms']):>10}  {mark}{extra}",
            file=out,
        )
        if hop.get("error"):
            print(f"      error: {hop['error']}", file=out)
    others = [s for s in journey.get("spans", []) if s["status"] == "ERROR"]
    for span in others:
        if span["name"] not in ("publish-message", "process-message", "persist-message"):
            message = span["status_message"] or span.get("error_message") or ""
            print(f"  {span['name']} ({span['service']}) failed: {message}", file=out)
    if journey.get("error") and not journey.get("hops"):
        print(f"  error: {journey['error']}", file=out)


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow journey``: print a message's journey and its JSONL line."""
    out = sys.stdout
    ident: str = args.id.strip()
    base = (args.marker or marker_base_url(config)).rstrip("/")
    try:
        journeys = fetch_journeys(base, ident)
    except (OSError, ValueError) as exc:
        print(f"ampsflow journey: cannot ask the marker at {base}: {exc}", file=sys.stderr)
        return 2
    if not journeys:
        print(f"no journey of {ident} in the marker's index ({base})", file=out)
    for journey in journeys:
        print_journey(journey, out)
    message_ids = {j["message_id"] for j in journeys if j.get("message_id")}
    trace_ids = {j["trace_id"] for j in journeys}
    if not _TRACE_ID.match(ident):
        message_ids.add(ident)
    else:
        trace_ids.add(ident.lower())
    path = Path(config.persister.path)
    found = False
    try:
        for line in jsonl_lines(path, message_ids=message_ids, trace_ids=trace_ids):
            print(f"JSONL {path}: {line}", file=out)
            found = True
    except OSError as exc:
        print(f"JSONL {path}: cannot read ({exc.strerror or exc})", file=out)
    else:
        if not found:
            print(f"JSONL {path}: no line for it", file=out)
    return 0 if journeys or found else 1
