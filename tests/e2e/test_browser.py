"""The marker page in Debian's headless Chromium against the real pipeline.

``ampsflow demo`` runs devbroker, processor, persister and marker; a real
trace backend (Arize Phoenix, through the tap of ``tests/support/phoenix.py``
that notes each span's ``service.name``) receives every service's spans. A click on Mark
must land in the JSONL with ``processed: true`` and the CorrelationId of the
trace the page shows, and the backend must hold publish-message ->
process-message -> persist-message as one trace. A second test stops and
restarts the broker under an open page.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ampsflow.core.codec import decode_correlation_id
from tests.support.phoenix import Phoenix, StoredSpan, start_phoenix
from tests.support.processes import Daemon, Devbroker, free_port, write_config, written_lines

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs Debian's chromium and chromium-driver packages",
    ),
]

T = TypeVar("T")


def _poll(what: str, probe: Callable[[], T | None], timeout_s: float = 60.0) -> T:
    """Call ``probe`` until it returns something other than None, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


# --- the trace backend -------------------------------------------------------


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    with start_phoenix(tmp_path_factory.mktemp("phoenix")) as backend:
        yield backend


# --- the browser -------------------------------------------------------------


@contextmanager
def _chromium(profile: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, always quit on exit."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1300,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with _chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def _connection_state(driver: WebDriver) -> str:
    elements = driver.find_elements(By.ID, "connection")
    return elements[0].get_attribute("data-state") or "" if elements else ""


def _wait_connection(driver: WebDriver, state: str, timeout_s: float = 60.0) -> None:
    _poll(
        f"the page to show AMPS {state}",
        lambda: True if _connection_state(driver) == state else None,
        timeout_s,
    )


@dataclass(frozen=True)
class ShownMark:
    """A mark as the page lists it."""

    message_id: str
    trace_id: str
    status: str
    reason: str


def _mark(driver: WebDriver, text: str) -> ShownMark:
    """Type ``text``, press Mark, and wait until the page settles the mark."""
    before = {
        e.get_attribute("data-mark-id") for e in driver.find_elements(By.CSS_SELECTOR, "tr.mark")
    }
    field_ = driver.find_element(By.ID, "mark-text")
    field_.clear()
    field_.send_keys(text)
    driver.find_element(By.ID, "mark-button").click()

    def settled() -> ShownMark | None:
        for row in driver.find_elements(By.CSS_SELECTOR, "tr.mark"):
            if row.get_attribute("data-mark-id") in before:
                continue
            status = row.find_element(By.CSS_SELECTOR, "td.status")
            value = status.get_attribute("data-status") or ""
            if value == "sending":
                return None
            reasons = status.find_elements(By.CSS_SELECTOR, ".status-reason")
            return ShownMark(
                message_id=row.get_attribute("data-mark-id") or "",
                trace_id=row.get_attribute("data-trace-id") or "",
                status=value,
                reason=reasons[0].text if reasons else "",
            )
        return None

    return _poll(f"the mark {text!r} to settle", settled, timeout_s=30)


# --- the pipeline ------------------------------------------------------------


@dataclass
class DemoRun:
    """A running ``ampsflow demo``."""

    process: subprocess.Popen[str]
    page_url: str
    jsonl: Path
    output: list[str]


@contextmanager
def _run_demo(directory: Path, otlp_endpoint: str | None) -> Iterator[DemoRun]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "ampsflow",
        "demo",
        "--dir",
        str(directory),
        "--port",
        str(port),
    ]
    if otlp_endpoint is not None:
        command += ["--otlp-endpoint", otlp_endpoint]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(
        target=lambda: output.extend(iter(process.stdout.readline, "")) if process.stdout else None,
        daemon=True,
    )
    reader.start()
    try:

        def running() -> bool | None:
            assert process.poll() is None, "ampsflow demo exited:\n" + "".join(output)
            return True if any("Press Ctrl-C to stop." in line for line in output) else None

        _poll("ampsflow demo to report ready", running, timeout_s=120)
        yield DemoRun(process, f"http://127.0.0.1:{port}/", directory / "messages.jsonl", output)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, phoenix: Phoenix) -> Iterator[DemoRun]:
    with _run_demo(tmp_path_factory.mktemp("demo") / "demo", phoenix.endpoint) as run:
        yield run


def _jsonl_record(path: Path, message_id: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("id") == message_id:
            return record
    return None


def _ancestors(span: StoredSpan, by_id: dict[str, StoredSpan]) -> list[str]:
    """Names of the span's ancestors within its trace, nearest first."""
    names = []
    parent = span.parent_id
    while parent is not None and parent in by_id:
        names.append(by_id[parent].name)
        parent = by_id[parent].parent_id
    return names


def _trace(phoenix: Phoenix, trace_id: str) -> list[StoredSpan]:
    return [span for span in phoenix.spans() if span.trace_id == trace_id]


Marked = tuple[ShownMark, dict[str, Any], dict[str, StoredSpan]]


@pytest.fixture(scope="module")
def marked(demo: DemoRun, phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory) -> Marked:
    """One click on Mark, followed to the JSONL and into the trace backend."""
    # The page stays open until the trace is complete: its span leaves in the
    # next export batch, and closing the browser first would drop it.
    with _chromium(tmp_path_factory.mktemp("chromium")) as browser:
        browser.get(demo.page_url)
        _wait_connection(browser, "connected")
        shown = _mark(browser, "hello from the browser test")
        record = _poll("the mark in the JSONL", lambda: _jsonl_record(demo.jsonl, shown.message_id))

        def whole_trace() -> dict[str, StoredSpan] | None:
            spans = {span.name: span for span in _trace(phoenix, shown.trace_id)}
            wanted = {"publish-message", "process-message", "persist-message"}
            return spans if wanted <= spans.keys() else None

        spans = _poll("the whole trace in Phoenix", whole_trace, timeout_s=90)
    return shown, record, spans


class TestClickToJsonl:
    def test_page_shows_published(self, marked: Marked) -> None:
        """The page lists the mark as published."""
        shown, _, _ = marked
        assert (shown.status, shown.reason) == ("published", "")

    def test_jsonl_record_is_processed(self, marked: Marked) -> None:
        """The persisted record carries processed: true and the text typed."""
        _, record, _ = marked
        assert (record["processed"], record["text"]) == (True, "hello from the browser test")

    def test_jsonl_correlation_id_is_the_shown_trace(self, marked: Marked) -> None:
        """The record's CorrelationId holds the trace id the page shows."""
        shown, record, _ = marked
        decoded = decode_correlation_id(record["CorrelationId"])
        assert format(decoded.trace_id, "032x") == shown.trace_id

    def test_trace_parentage(self, marked: Marked, phoenix: Phoenix) -> None:
        """publish-message (root) -> process-message -> persist-message (possibly via a child)."""
        shown, _, spans = marked
        by_id = {span.span_id: span for span in _trace(phoenix, shown.trace_id)}
        chains = {
            name: _ancestors(spans[name], by_id)
            for name in ("publish-message", "process-message", "persist-message")
        }
        assert (
            chains["publish-message"],
            chains["process-message"],
            "process-message" in chains["persist-message"],
            spans["publish-message"].parent_id,
        ) == ([], ["publish-message"], True, None)

    def test_services(self, marked: Marked) -> None:
        """Each span comes from its service: react-web-app, processor, persister."""
        _, _, spans = marked
        services = {
            name: spans[name].service
            for name in ("publish-message", "process-message", "persist-message")
        }
        assert services == {
            "publish-message": "react-web-app",
            "process-message": "processor",
            "persist-message": "persister",
        }

    def test_page_span_attributes(self, marked: Marked) -> None:
        """The page's span carries the messaging attributes of the publish."""
        shown, _, spans = marked
        attributes = spans["publish-message"].attributes
        assert {
            k: attributes.get(k)
            for k in (
                "messaging.system",
                "messaging.destination.name",
                "messaging.operation.type",
                "messaging.message.id",
            )
        } == {
            "messaging.system": "amps",
            "messaging.destination.name": "internal",
            "messaging.operation.type": "send",
            "messaging.message.id": shown.message_id,
        }

    def test_every_relayed_span_reaches_phoenix_unchanged(
        self, marked: Marked, demo: DemoRun, phoenix: Phoenix
    ) -> None:
        """Through the marker relay, each span the marker indexed is in Phoenix with the
        same name, parent, status and attributes."""
        shown, _, _ = marked
        with urllib.request.urlopen(
            f"{demo.page_url}api/journeys/{shown.trace_id}", timeout=10
        ) as response:
            relayed = json.loads(response.read())["spans"]

        def stored() -> dict[str, StoredSpan] | None:
            by_id = {s.span_id: s for s in _trace(phoenix, shown.trace_id)}
            return by_id if all(r["span_id"] in by_id for r in relayed) else None

        by_id = _poll("every relayed span in Phoenix", stored)
        differences = [
            r["name"]
            for r in relayed
            if (by_id[r["span_id"]].name, by_id[r["span_id"]].parent_id, by_id[r["span_id"]].status)
            != (r["name"], r["parent_id"], r["status"])
            or any(by_id[r["span_id"]].attributes.get(k) != v for k, v in r["attributes"].items())
        ]
        assert (len(relayed) >= 3, differences) == (True, [])


# --- the journey on the page, with no collector at all --------------------------------


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """``ampsflow demo`` with no --otlp-endpoint: the marker is the only span sink."""
    with _run_demo(tmp_path_factory.mktemp("alone") / "demo", None) as run:
        yield run


@pytest.fixture(scope="module")
def alone_page(alone: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with _chromium(tmp_path_factory.mktemp("alone-profile")) as driver:
        driver.set_window_size(1400, 1000)
        driver.get(alone.page_url)
        _wait_connection(driver, "connected")
        yield driver


def _row(driver: WebDriver, message_id: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'tr.mark[data-mark-id="{message_id}"]')


def _journey_cell(driver: WebDriver, message_id: str) -> Any:
    return _row(driver, message_id).find_element(By.CSS_SELECTOR, "td.journey")


def _persister_pid(demo_dir: Path) -> int:
    config = str(demo_dir / "ampsflow.yaml").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"persister" in argv and config in argv:
            return int(entry.name)
    raise AssertionError("the demo's persister is not running")


class TestJourneyOnThePage:
    def test_mark_reaches_persisted_with_three_hops(
        self, alone_page: WebDriver, tmp_path: Path
    ) -> None:
        """No collector: a mark's row reaches "persisted" with published, processed and
        persisted hops, each with a latency, and a total."""
        shown = _mark(alone_page, "journey")
        _poll(
            "the row to reach persisted with three hops",
            lambda: (
                True
                if _journey_cell(alone_page, shown.message_id).get_attribute("data-journey-state")
                == "persisted"
                and len(
                    _journey_cell(alone_page, shown.message_id).find_elements(
                        By.CSS_SELECTOR, "li.hop"
                    )
                )
                == 3
                else None
            ),
        )
        cell = _journey_cell(alone_page, shown.message_id)
        hops = [
            (h.get_attribute("data-hop"), h.get_attribute("data-failed"), h.text.endswith("ms"))
            for h in cell.find_elements(By.CSS_SELECTOR, "li.hop")
        ]
        total = cell.find_element(By.CSS_SELECTOR, ".journey-total").text
        _row(alone_page, shown.message_id).click()
        waterfall = _poll(
            "the waterfall",
            lambda: alone_page.find_elements(By.CSS_SELECTOR, ".waterfall .wf-row") or None,
        )
        if os.environ.get("AMPSFLOW_SCREENSHOTS"):
            alone_page.save_screenshot(
                str(Path(os.environ["AMPSFLOW_SCREENSHOTS"]) / "marker-journey.png")
            )
        _row(alone_page, shown.message_id).click()
        assert (hops, total.startswith("total "), len(waterfall) >= 3) == (
            [
                ("published", "false", True),
                ("processed", "false", True),
                ("persisted", "false", True),
            ],
            True,
            True,
        )

    def test_unwritable_jsonl_shows_the_persist_error(
        self, alone_page: WebDriver, alone: DemoRun
    ) -> None:
        """The JSONL path becomes a directory (EISDIR even for root): the row first says no
        span came from the persister, then, once the file is back and the write succeeds,
        shows the persist-message hop failed in red with its error."""
        demo_dir = alone.jsonl.parent
        aside = demo_dir / "messages.jsonl.aside"
        pid = _persister_pid(demo_dir)
        alone.jsonl.rename(aside)
        alone.jsonl.mkdir()
        os.kill(pid, signal.SIGHUP)
        try:
            shown = _mark(alone_page, "unwritable")
            waiting = _poll(
                "the row to say the persister is silent",
                lambda: (
                    _journey_cell(alone_page, shown.message_id).find_elements(
                        By.CSS_SELECTOR, ".journey-waiting"
                    )
                    or [None]
                )[0],
                timeout_s=60,
            ).text
        finally:
            alone.jsonl.rmdir()
            aside.rename(alone.jsonl)
        error = _poll(
            "the persist-message error on the row (persister log: "
            + " | ".join((demo_dir / "logs" / "persister.log").read_text().splitlines()[-4:])
            + ")",
            lambda: (
                _journey_cell(alone_page, shown.message_id).find_elements(
                    By.CSS_SELECTOR, ".journey-error"
                )
                or [None]
            )[0],
            timeout_s=90,
        ).text
        failed_hops = [
            h.get_attribute("data-hop")
            for h in _journey_cell(alone_page, shown.message_id).find_elements(
                By.CSS_SELECTOR, "li.hop-failed"
            )
        ]
        assert (
            waiting.startswith("no span from persister for "),
            error.startswith("persist-message: "),
            "Is a directory" in error or "EISDIR" in error,
            failed_hops,
        ) == (True, True, True, ["persisted"])

    def test_bad_body_from_the_python_client_is_dead_lettered(
        self, alone_page: WebDriver, alone: DemoRun
    ) -> None:
        """A body that is not JSON, published with the official Python client, shows in
        recent journeys as dead-lettered, also under "failed only"."""
        from AMPS import Client  # noqa: PLC0415 (the client is needed by this test only)

        config = alone.jsonl.parent / "ampsflow.yaml"
        uri = next(
            line.split("uri:", 1)[1].strip()
            for line in config.read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("uri:")
        )
        client = Client(f"bad-body-{os.getpid()}")
        client.connect(uri)
        client.logon()
        try:
            client.publish("internal", "this is { not json")
            client.publish_flush()
        finally:
            client.close()
        box = alone_page.find_element(By.ID, "failed-only")
        if not box.is_selected():
            box.click()
        row = _poll(
            "a dead-lettered journey",
            lambda: (
                alone_page.find_elements(
                    By.CSS_SELECTOR, '#journeys tr.journey-row[data-state="dead-lettered"]'
                )
                or [None]
            )[0],
            timeout_s=60,
        )
        text = row.text
        if os.environ.get("AMPSFLOW_SCREENSHOTS"):
            alone_page.set_window_size(1400, 1300)
            alone_page.save_screenshot(
                str(Path(os.environ["AMPSFLOW_SCREENSHOTS"]) / "marker-failures.png")
            )
        box.click()
        assert ("dead-lettered" in text, "internal.dlq" in text) == (True, True)


class TestBurst:
    def test_burst_lands_once_each(
        self, demo: DemoRun, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        """A burst of 20 marks lands in the JSONL exactly once per mark."""
        with _chromium(tmp_path_factory.mktemp("chromium")) as browser:
            browser.get(demo.page_url)
            _wait_connection(browser, "connected")
            browser.find_element(By.ID, "mark-text").send_keys("burst")
            count = browser.find_element(By.ID, "burst-count")
            count.clear()
            count.send_keys("20")
            browser.find_element(By.ID, "burst-button").click()

            def ids_when_settled() -> set[str] | None:
                rows = browser.find_elements(By.CSS_SELECTOR, "tr.mark")
                burst = [r for r in rows if "/20)" in r.find_element(By.CSS_SELECTOR, ".text").text]
                statuses = [
                    r.find_element(By.CSS_SELECTOR, "td.status").get_attribute("data-status")
                    for r in burst
                ]
                if len(burst) < 20 or "sending" in statuses:
                    return None
                assert set(statuses) == {"published"}
                return {r.get_attribute("data-mark-id") or "" for r in burst}

            ids = _poll("the burst to settle", ids_when_settled)

        def lines_when_all_landed() -> list[str] | None:
            if not demo.jsonl.exists():
                return None
            found = [
                record["id"]
                for record in map(json.loads, written_lines(demo.jsonl))
                if record.get("id") in ids
            ]
            return found if set(found) == ids else None

        found = _poll("the burst in the JSONL", lines_when_all_landed)
        assert sorted(found) == sorted(ids)


# --- broker outage -----------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Devbroker]:
    instance = Devbroker(tmp_path / "broker", tmp_path / "devbroker.log")
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture
def marker_url(tmp_path: Path, broker: Devbroker) -> Iterator[str]:
    port = free_port()
    config = {
        "marker": {
            "listen": f"127.0.0.1:{port}",
            "amps_websocket_upstream": f"ws://127.0.0.1:{broker.ws_port}/amps/json",
            "otlp_traces_upstream": None,
        }
    }
    path = write_config(tmp_path / "marker.yaml", config)
    marker = Daemon("marker", ["marker", "--config", str(path)], tmp_path / "marker.log")
    try:
        marker.start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        marker.close()


class TestBrokerOutage:
    def test_page_shows_disconnected(
        self, browser: WebDriver, broker: Devbroker, marker_url: str
    ) -> None:
        """With the broker stopped, the page shows the connection as disconnected."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.terminate()
        _wait_connection(browser, "disconnected")
        assert browser.find_element(By.ID, "connection-reason").text != ""

    def test_mark_fails_while_down(
        self, browser: WebDriver, broker: Devbroker, marker_url: str
    ) -> None:
        """A mark sent while the broker is down is listed as failed with a reason."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.terminate()
        _wait_connection(browser, "disconnected")
        shown = _mark(browser, "while down")
        assert (shown.status, shown.reason.startswith("not connected to AMPS")) == ("failed", True)

    def test_page_recovers(self, browser: WebDriver, broker: Devbroker, marker_url: str) -> None:
        """When the broker returns, the page reconnects by itself and publishes again."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.terminate()
        _wait_connection(browser, "disconnected")
        broker.restart()
        _wait_connection(browser, "connected")
        assert _mark(browser, "after the outage").status == "published"
