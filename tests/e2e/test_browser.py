"""The marker page in Debian's headless Chromium against the real pipeline.

``ampsflow demo`` runs devbroker, processor, persister and marker; a real
trace backend (Arize Phoenix) receives every service's spans through a small
recording relay that also notes each span's ``service.name``. A click on Mark
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
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ampsflow.core.codec import decode_correlation_id

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def _http_ok(url: str) -> bool | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return True if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


@contextmanager
def _process(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is always stopped (SIGTERM, then SIGKILL) on exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the trace backend -------------------------------------------------------


@dataclass
class Phoenix:
    """A running Phoenix server."""

    url: str

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span Phoenix holds for ``trace_id``."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = "?limit=1000" + (f"&cursor={cursor}" if cursor else "")
            with urllib.request.urlopen(
                f"{self.url}/v1/projects/default/spans{query}", timeout=10
            ) as response:
                page = json.load(response)
            found += [s for s in page["data"] if s["context"]["trace_id"] == trace_id]
            cursor = page.get("next_cursor")
            if not cursor:
                return found


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    work = tmp_path_factory.mktemp("phoenix")
    port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": str(work),
    }
    phoenix_bin = shutil.which("phoenix") or str(Path(sys.executable).parent / "phoenix")
    with _process([phoenix_bin, "serve"], work / "phoenix.log", env=env) as process:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool | None:
            assert process.poll() is None, f"phoenix exited; see {work / 'phoenix.log'}"
            return _http_ok(f"{url}/healthz")

        _poll("Phoenix to start", healthy, timeout_s=180)
        yield Phoenix(url)


@dataclass
class Relay:
    """An OTLP/HTTP relay in front of Phoenix that records each span's service."""

    upstream: str
    services: dict[str, str] = field(default_factory=dict)  # span id -> service.name
    content_types: set[str] = field(default_factory=set)
    url: str = ""

    def record(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.services[span.span_id.hex()] = attributes.get("service.name", "")


@pytest.fixture(scope="module")
def relay(phoenix: Phoenix) -> Iterator[Relay]:
    state = Relay(upstream=f"{phoenix.url}/v1/traces")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            content_type = self.headers.get("Content-Type", "")
            state.content_types.add(content_type)
            if content_type == "application/x-protobuf":
                state.record(body)
            request = urllib.request.Request(
                state.upstream, data=body, headers={"Content-Type": content_type}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    status, reply = response.status, response.read()
            except urllib.error.HTTPError as exc:
                status, reply = exc.code, exc.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, relay: Relay) -> Iterator[DemoRun]:
    tmp_path = tmp_path_factory.mktemp("demo")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ampsflow",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--port",
            str(port),
            "--otlp-endpoint",
            relay.url,
        ],
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
        yield DemoRun(
            process, f"http://127.0.0.1:{port}/", tmp_path / "demo" / "messages.jsonl", output
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)


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


def _ancestors(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the span's ancestors within its trace, nearest first."""
    names = []
    parent = span["parent_id"]
    while parent in by_id:
        names.append(by_id[parent]["name"])
        parent = by_id[parent]["parent_id"]
    return names


Marked = tuple[ShownMark, dict[str, Any], dict[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def marked(demo: DemoRun, phoenix: Phoenix, tmp_path_factory: pytest.TempPathFactory) -> Marked:
    """One click on Mark, followed to the JSONL and into the trace backend."""
    with _chromium(tmp_path_factory.mktemp("chromium")) as browser:
        browser.get(demo.page_url)
        _wait_connection(browser, "connected")
        shown = _mark(browser, "hello from the browser test")
    record = _poll("the mark in the JSONL", lambda: _jsonl_record(demo.jsonl, shown.message_id))

    def whole_trace() -> dict[str, dict[str, Any]] | None:
        spans = {s["name"]: s for s in phoenix.spans(shown.trace_id)}
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
        """publish-message is the root; process-message and persist-message descend in order."""
        shown, _, spans = marked
        by_id = {s["context"]["span_id"]: s for s in phoenix.spans(shown.trace_id)}
        chains = {
            name: _ancestors(spans[name], by_id)
            for name in ("publish-message", "process-message", "persist-message")
        }
        assert (
            chains["publish-message"],
            chains["process-message"][-1:],
            "process-message" in chains["persist-message"],
            spans["publish-message"]["parent_id"],
        ) == ([], ["publish-message"], True, None)

    def test_services(self, marked: Marked, relay: Relay) -> None:
        """Each span comes from its service: react-web-app, processor, persister."""
        _, _, spans = marked
        services = {
            name: relay.services.get(spans[name]["context"]["span_id"])
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
        attributes = spans["publish-message"]["attributes"]
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

    def test_only_protobuf_is_exported(self, marked: Marked, relay: Relay) -> None:
        """Every export, the browser's included, is OTLP protobuf."""
        assert relay.content_types == {"application/x-protobuf"}


# --- broker outage -----------------------------------------------------------


@dataclass
class Broker:
    """A devbroker that can be stopped and started again on the same ports."""

    tcp_port: int
    ws_port: int
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ampsflow",
                    "devbroker",
                    "--tcp",
                    f"127.0.0.1:{self.tcp_port}",
                    "--websocket",
                    f"127.0.0.1:{self.ws_port}",
                    "--data-dir",
                    str(self.data_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def listening() -> bool | None:
            assert self.process is not None
            assert self.process.poll() is None, "devbroker exited"
            with socket.socket() as sock:
                return True if sock.connect_ex(("127.0.0.1", self.ws_port)) == 0 else None

        _poll("the devbroker to listen", listening)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(_free_port(), _free_port(), tmp_path / "broker", tmp_path / "devbroker.log")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def marker_url(tmp_path: Path, broker: Broker) -> Iterator[str]:
    port = _free_port()
    config = tmp_path / "marker.yaml"
    config.write_text(
        "marker:\n"
        f"  listen: 127.0.0.1:{port}\n"
        f"  amps_websocket_upstream: ws://127.0.0.1:{broker.ws_port}/amps/json\n"
        "  otlp_traces_upstream: null\n",
        encoding="utf-8",
    )
    args = [sys.executable, "-m", "ampsflow", "marker", "--config", str(config)]
    with _process(args, tmp_path / "marker.log") as process:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool | None:
            assert process.poll() is None, "ampsflow marker exited"
            return _http_ok(f"{url}/healthz")

        _poll("the marker to serve", healthy)
        yield url + "/"


class TestBrokerOutage:
    def test_page_shows_disconnected(
        self, browser: WebDriver, broker: Broker, marker_url: str
    ) -> None:
        """With the broker stopped, the page shows the connection as disconnected."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.stop()
        _wait_connection(browser, "disconnected")
        assert browser.find_element(By.ID, "connection-reason").text != ""

    def test_mark_fails_while_down(
        self, browser: WebDriver, broker: Broker, marker_url: str
    ) -> None:
        """A mark sent while the broker is down is listed as failed with a reason."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.stop()
        _wait_connection(browser, "disconnected")
        shown = _mark(browser, "while down")
        assert (shown.status, shown.reason.startswith("not connected to AMPS")) == ("failed", True)

    def test_page_recovers(self, browser: WebDriver, broker: Broker, marker_url: str) -> None:
        """When the broker returns, the page reconnects by itself and publishes again."""
        browser.get(marker_url)
        _wait_connection(browser, "connected")
        broker.stop()
        _wait_connection(browser, "disconnected")
        broker.start()
        _wait_connection(browser, "connected")
        assert _mark(browser, "after the outage").status == "published"
