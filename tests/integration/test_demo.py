"""``ampsflow demo`` as a user runs it: readiness banner, Ctrl-C, a dying child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ampsflow.config import load_config
from ampsflow.services.demo import child_environment, demo_config, traces_url
from tests.support.processes import free_port

pytestmark = pytest.mark.timeout(180)


class TestTracesUrl:
    def test_appends_the_traces_path(self) -> None:
        """A collector base URL gets /v1/traces."""
        assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"

    def test_keeps_a_full_traces_url(self) -> None:
        """A URL that already ends in /v1/traces is kept."""
        assert traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"


class TestDemoConfig:
    def test_is_a_valid_config(self, tmp_path: Path) -> None:
        """The generated config passes the strict config loader."""
        path = tmp_path / "ampsflow.yaml"
        mapping = demo_config(
            tmp_path, broker_tcp_port=1, broker_ws_port=2, marker_port=3, otlp_endpoint=None
        )
        path.write_text(yaml.safe_dump(mapping), encoding="utf-8")
        assert load_config(path, required=True).marker.listen == "127.0.0.1:3"

    def test_without_collector_the_marker_relays(self, tmp_path: Path) -> None:
        """Without --otlp-endpoint every daemon exports to the marker, which forwards nowhere."""
        mapping = demo_config(
            tmp_path, broker_tcp_port=1, broker_ws_port=2, marker_port=3, otlp_endpoint=None
        )
        assert (
            mapping["telemetry"]["exporter"],
            mapping["telemetry"]["endpoint"],
            mapping["marker"]["otlp_traces_upstream"],
        ) == ("otlp", "http://127.0.0.1:3", None)

    def test_collector_gets_every_service(self, tmp_path: Path) -> None:
        """With --otlp-endpoint the daemons still export to the marker, which forwards there."""
        mapping = demo_config(
            tmp_path,
            broker_tcp_port=1,
            broker_ws_port=2,
            marker_port=3,
            otlp_endpoint="http://127.0.0.1:4318",
        )
        assert (
            mapping["telemetry"]["endpoint"],
            mapping["marker"]["otlp_traces_upstream"],
        ) == ("http://127.0.0.1:3", "http://127.0.0.1:4318/v1/traces")

    def test_jaeger_ui_url_reaches_the_page(self, tmp_path: Path) -> None:
        """--jaeger-ui-url turns on the page's "open trace" links."""
        mapping = demo_config(
            tmp_path,
            broker_tcp_port=1,
            broker_ws_port=2,
            marker_port=3,
            otlp_endpoint=None,
            jaeger_ui_url="http://127.0.0.1:16686",
        )
        path = tmp_path / "ampsflow.yaml"
        path.write_text(yaml.safe_dump(mapping), encoding="utf-8")
        assert "http://127.0.0.1:16686" == load_config(path).marker.jaeger_ui_url


class TestChildEnvironment:
    def test_drops_service_name_override(self) -> None:
        """OTEL_SERVICE_NAME would give all four services one name; children do not get it."""
        env = child_environment({"OTEL_SERVICE_NAME": "x", "PATH": "/bin"}, Path("/tmp/n.sock"))
        assert ("OTEL_SERVICE_NAME" in env, env["PATH"]) == (False, "/bin")

    def test_own_notify_socket(self) -> None:
        """Each child reports readiness to the demo, not to the demo's own service manager."""
        env = child_environment({"NOTIFY_SOCKET": "/run/systemd/notify"}, Path("/tmp/n.sock"))
        assert env["NOTIFY_SOCKET"] == "/tmp/n.sock"

    def test_metrics_off_by_default(self) -> None:
        """Metric export is off unless the operator asks for it."""
        assert child_environment({}, Path("/tmp/n.sock"))["OTEL_METRICS_EXPORTER"] == "none"

    def test_metrics_exporter_kept_when_set(self) -> None:
        """An explicit OTEL_METRICS_EXPORTER is passed on."""
        env = child_environment({"OTEL_METRICS_EXPORTER": "otlp"}, Path("/tmp/n.sock"))
        assert env["OTEL_METRICS_EXPORTER"] == "otlp"


@dataclass
class RunningDemo:
    process: subprocess.Popen[str]
    output: list[str]
    port: int

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while not any("Press Ctrl-C to stop." in line for line in self.output):
            assert self.process.poll() is None, "demo exited:\n" + "".join(self.output)
            assert time.monotonic() < deadline, "demo not ready:\n" + "".join(self.output)
            time.sleep(0.1)

    def child_pid(self, name: str) -> int:
        """PID of the demo's child running ``ampsflow NAME``."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if name.encode() in cmdline:
                return int(pid)
        raise AssertionError(f"no {name} child")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[RunningDemo]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ampsflow", "demo", "--dir", str(tmp_path), "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(process.stdout or ()), daemon=True)
    reader.start()
    try:
        yield RunningDemo(process, output, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(timeout=10)


@pytest.mark.slow
class TestDemoProcess:
    def test_banner_names_page_and_jsonl(self, demo: RunningDemo, tmp_path: Path) -> None:
        """Once ready, the demo prints the page URL and the JSONL path."""
        demo.wait_ready()
        text = "".join(demo.output)
        assert (
            f"http://127.0.0.1:{demo.port}/" in text,
            str(tmp_path / "messages.jsonl") in text,
        ) == (
            True,
            True,
        )

    def test_ctrl_c_stops_cleanly(self, demo: RunningDemo) -> None:
        """SIGINT stops every service and the demo exits 0."""
        demo.wait_ready()
        marker = demo.child_pid("marker")
        demo.process.send_signal(signal.SIGINT)
        status = demo.process.wait(timeout=60)
        assert (status, Path(f"/proc/{marker}").exists()) == (0, False)

    def test_dead_child_is_named(self, demo: RunningDemo) -> None:
        """When a service dies, the demo says which one and exits non-zero."""
        demo.wait_ready()
        os.kill(demo.child_pid("processor"), signal.SIGKILL)
        status = demo.process.wait(timeout=60)
        text = "".join(demo.output)
        assert (status, "processor was killed by signal 9" in text) == (1, True)
