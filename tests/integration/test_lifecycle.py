"""The shared lifecycle in every service process, driven by real signals.

Each of the four services (processor, persister, devbroker, marker) is started as
a subprocess with a fake ``NOTIFY_SOCKET``; the tests send SIGHUP, SIGTERM and
SIGINT and read what the service logged and told the service manager.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import (
    Daemon,
    Processes,
    free_port,
    pipeline_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

SERVICES = ("processor", "persister", "devbroker", "marker")
WAIT_S = 20.0


class Service:
    """One service subprocess with its own config file, which tests rewrite."""

    def __init__(self, name: str, daemon: Daemon, config_path: Path, config: dict[str, Any]):
        self.name = name
        self.daemon = daemon
        self.config_path = config_path
        self.config = config

    def rewrite(self, section: str, **values: Any) -> None:
        """Change keys of ``section`` in the file (the service sees it on SIGHUP)."""
        self.config.setdefault(section, {}).update(values)
        write_config(self.config_path, self.config)

    def reload(self) -> None:
        """SIGHUP, then wait until the service said READY=1 again."""
        before = len(self.daemon.notify.values("READY"))
        reloading = len(self.daemon.notify.values("RELOADING"))
        self.daemon.signal(signal.SIGHUP)
        wait_for(
            lambda: (
                len(self.daemon.notify.values("RELOADING")) > reloading
                and len(self.daemon.notify.values("READY")) > before
            ),
            timeout_s=WAIT_S,
            what=f"{self.name} to finish reloading",
        )

    def wait_logged(self, text: str) -> None:
        wait_for(
            lambda: text in self.daemon.log_text(),
            timeout_s=WAIT_S,
            what=f"{self.name} to log {text!r}:\n{self.daemon.log_tail()}",
        )


def start_service(
    processes: Processes,
    tmp_path: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    marker: dict[str, Any] | None = None,
) -> Service:
    """Start service ``name`` (and a devbroker for the daemons) with a config file."""
    config_path = tmp_path / f"{name}.yaml"
    if name in ("processor", "persister"):
        broker = processes.devbroker()
        config = pipeline_config(tmp_path, broker)
    else:
        config = {
            "logging": {"level": "info"},
            "telemetry": {"exporter": "none"},
            "devbroker": {
                "tcp": f"127.0.0.1:{free_port()}",
                "websocket": f"127.0.0.1:{free_port()}",
                "data_dir": str(tmp_path / "devbroker-data"),
            },
            "marker": {"listen": f"127.0.0.1:{free_port()}", **(marker or {})},
        }
    write_config(config_path, config)
    daemon = processes.service(name, config_path, env=env, start=False)
    daemon.start()
    return Service(name, daemon, config_path, config)


@pytest.fixture(params=SERVICES)
def service(request: pytest.FixtureRequest, processes: Processes, tmp_path: Path) -> Service:
    return start_service(processes, tmp_path, request.param)


class TestReload:
    def test_changed_level_takes_effect(self, service: Service) -> None:
        """After `logging.level: debug` and SIGHUP, the service logs debug lines."""
        service.rewrite("logging", level="debug")
        service.reload()
        service.wait_logged("reload: applied logging.level")
        service.wait_logged("DEBUG ampsflow.lifecycle: reload: finished, logging at debug")
        assert service.daemon.running

    def test_broken_file_changes_nothing_and_says_why(self, service: Service) -> None:
        """A broken file keeps the running settings; every problem is logged as FILE: key: msg."""
        service.rewrite("logging", level="loud", colour="red")
        service.reload()
        name = str(service.config_path)
        service.wait_logged(f"{name}: logging.level: must be one of debug, info, warning, error")
        service.wait_logged(f"{name}: logging.colour: unknown key")
        service.rewrite("logging", level="info")
        del service.config["logging"]["colour"]
        write_config(service.config_path, service.config)
        service.reload()
        text = service.daemon.log_text()
        expected = (True, False, True)
        actual = (
            service.daemon.running,
            "DEBUG ampsflow" in text,
            any(s.startswith("reload rejected: ") for s in service.daemon.notify.values("STATUS")),
        )
        assert expected == actual

    def test_key_that_needs_a_restart_is_named(self, service: Service) -> None:
        """A changed key that cannot change live is logged with its path as needing a restart."""
        key = {
            "processor": ("processor", "output_topic", "elsewhere"),
            "persister": ("persister", "topic", "elsewhere"),
            "devbroker": ("devbroker", "commit_delay_ms", 7),
            "marker": ("marker", "listen", f"127.0.0.1:{free_port()}"),
        }[service.name]
        service.rewrite(key[0], **{key[1]: key[2]})
        service.reload()
        service.wait_logged(f"reload: {key[0]}.{key[1]} changed")
        line = next(
            line for line in service.daemon.log_text().splitlines() if f"{key[0]}.{key[1]}" in line
        )
        assert "needs a restart" in line


class TestServiceSpecificReload:
    def test_marker_serves_the_new_jaeger_url(self, processes: Processes, tmp_path: Path) -> None:
        """After a reload with a new marker.jaeger_ui_url, /config.json carries it."""
        marker = start_service(processes, tmp_path, "marker", marker={"jaeger_ui_url": None})
        marker.rewrite("marker", jaeger_ui_url="http://jaeger.example:16686")
        marker.reload()
        listen = marker.config["marker"]["listen"]
        with urllib.request.urlopen(f"http://{listen}/config.json", timeout=5) as response:
            page = json.load(response)
        assert "http://jaeger.example:16686" == page["jaeger_ui_url"]

    def test_devbroker_takes_a_new_users_file(self, processes: Processes, tmp_path: Path) -> None:
        """Setting devbroker.users_file and reloading turns logon checks on, without a restart."""
        from ampsflow.devbroker.auth import hash_password  # noqa: PLC0415

        broker = start_service(processes, tmp_path, "devbroker")
        users = tmp_path / "users"
        users.write_text(f"alice:{hash_password('secret')}\n", encoding="utf-8")
        broker.rewrite("devbroker", users_file=str(users))
        broker.reload()
        broker.wait_logged(f"reload: 1 users from {users}")
        assert broker.daemon.running


class TestStop:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_one_stop_signal_drains_and_exits_zero(
        self, service: Service, signum: signal.Signals
    ) -> None:
        """One SIGTERM or SIGINT stops the service cleanly: STOPPING=1, exit 0."""
        service.daemon.signal(signum)
        assert service.daemon.process is not None
        code = service.daemon.process.wait(WAIT_S)
        assert (0, True) == (code, "1" in service.daemon.notify.values("STOPPING"))

    def test_second_stop_signal_exits_at_once(self, processes: Processes, tmp_path: Path) -> None:
        """A second SIGTERM during the drain exits at once with 128 + 15."""
        marker = start_service(processes, tmp_path, "marker", marker={"body_timeout_s": 60})
        listen = marker.config["marker"]["listen"]
        host, port = listen.rsplit(":", 1)
        # A span upload whose body never completes keeps a request in flight, so the
        # graceful shutdown waits for it (up to 5 s) instead of exiting at once.
        with socket.create_connection((host, int(port)), timeout=10) as upload:
            upload.sendall(
                f"POST /v1/traces HTTP/1.1\r\nHost: {listen}\r\n"
                "Content-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n".encode()
                + b"\x0a"
            )
            # A later request answered means the upload's headers were handled.
            with urllib.request.urlopen(f"http://{listen}/healthz", timeout=5) as response:
                assert 200 == response.status
            marker.daemon.signal(signal.SIGTERM)
            marker.wait_logged("SIGTERM: stopping")
            marker.daemon.signal(signal.SIGTERM)
            assert marker.daemon.process is not None
            code = marker.daemon.process.wait(WAIT_S)
        assert (143, True) == (code, "SIGTERM again: exiting now" in marker.daemon.log_text())


class TestWatchdog:
    @pytest.mark.parametrize("name", SERVICES)
    def test_idle_service_pings_the_watchdog(
        self, processes: Processes, tmp_path: Path, name: str
    ) -> None:
        """With WATCHDOG_USEC set, an idle service keeps sending WATCHDOG=1."""
        service = start_service(processes, tmp_path, name, env={"WATCHDOG_USEC": "1000000"})
        wait_for(
            lambda: len(service.daemon.notify.values("WATCHDOG")) >= 4,
            timeout_s=WAIT_S,
            what=f"{name} to ping the watchdog",
        )
        assert service.daemon.running
