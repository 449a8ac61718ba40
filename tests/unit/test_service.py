"""The shared daemon lifecycle: signals become flags, sd_notify lines, startup failures."""

from __future__ import annotations

import argparse
import signal

import pytest

from ampsflow.adapters.systemd import Notifier
from ampsflow.adapters.telemetry import Telemetry
from ampsflow.config import Config, TelemetryConfig
from ampsflow.errors import StartupError
from ampsflow.service import EXIT_STARTUP_FAILURE, Daemon, run_daemon


class RecordingNotifier(Notifier):
    """A notifier that records what it would send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def _send(self, message: str) -> None:
        self.sent.append(message)


def quiet_config() -> Config:
    return Config(telemetry=TelemetryConfig(exporter="none"))


def args() -> argparse.Namespace:
    return argparse.Namespace(daemonize=False, pid_file=None)


class TestSignals:
    def test_sigterm_sets_stop(self) -> None:
        """SIGTERM sets the stop event but not force."""
        daemon = Daemon("t", notifier=RecordingNotifier())
        daemon.handle_signal(signal.SIGTERM)
        assert (True, False) == (daemon.stop.is_set(), daemon.force.is_set())

    def test_second_stop_signal_forces(self) -> None:
        """A second SIGTERM/SIGINT sets force."""
        daemon = Daemon("t", notifier=RecordingNotifier())
        daemon.handle_signal(signal.SIGTERM)
        daemon.handle_signal(signal.SIGINT)
        assert daemon.force.is_set()

    def test_stop_announces_stopping_once(self) -> None:
        """Stopping sends STOPPING=1 once, however often it is requested."""
        notifier = RecordingNotifier()
        daemon = Daemon("t", notifier=notifier)
        daemon.handle_signal(signal.SIGTERM)
        daemon.request_stop()
        assert notifier.sent.count("STOPPING=1") == 1

    def test_sighup_requests_reload(self) -> None:
        """SIGHUP sets the reload flag once and runs the reload callbacks, without stopping."""
        daemon = Daemon("t", notifier=RecordingNotifier())
        calls: list[str] = []
        daemon.on_reload(lambda: calls.append("reopen"))
        daemon.handle_signal(signal.SIGHUP)
        assert (True, False, ["reopen"], False) == (
            daemon.take_reload(),
            daemon.take_reload(),
            calls,
            daemon.stop.is_set(),
        )

    def test_failing_reload_callback_is_contained(self) -> None:
        """A reload callback that raises does not break signal handling."""
        daemon = Daemon("t", notifier=RecordingNotifier())

        def broken() -> None:
            raise OSError("cannot reopen")

        daemon.on_reload(broken)
        daemon.handle_signal(signal.SIGHUP)
        assert daemon.take_reload()


class TestRunDaemon:
    def test_clean_run_exits_zero_and_stops(self) -> None:
        """A work function that returns gives exit 0 and STOPPING=1."""
        notifier = RecordingNotifier()
        seen: list[Telemetry] = []

        def work(daemon: Daemon, telemetry: Telemetry) -> None:
            daemon.ready("working")
            seen.append(telemetry)

        code = run_daemon(
            quiet_config(), args(), service="t", service_name="t", work=work, notifier=notifier
        )
        assert (0, 1, True) == (
            code,
            len(seen),
            any(m.startswith("READY=1") for m in notifier.sent) and "STOPPING=1" in notifier.sent,
        )

    def test_startup_failure_is_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A StartupError gives exit 1 and one 'ampsflow <service>: reason' line on stderr."""

        def work(daemon: Daemon, telemetry: Telemetry) -> None:
            raise StartupError("cannot open /nowhere")

        code = run_daemon(
            quiet_config(),
            args(),
            service="processor",
            service_name="processor",
            work=work,
            notifier=RecordingNotifier(),
        )
        lines = [
            line
            for line in capsys.readouterr().err.splitlines()
            if line.startswith("ampsflow processor:")
        ]
        assert (EXIT_STARTUP_FAILURE, ["ampsflow processor: cannot open /nowhere"]) == (
            code,
            lines,
        )

    def test_startup_error_after_stop_is_clean(self) -> None:
        """A StartupError caused by a stop request exits 0."""

        def work(daemon: Daemon, telemetry: Telemetry) -> None:
            daemon.request_stop()
            raise StartupError("stopped before connecting to AMPS")

        code = run_daemon(
            quiet_config(),
            args(),
            service="t",
            service_name="t",
            work=work,
            notifier=RecordingNotifier(),
        )
        assert code == 0


class TestSignalThread:
    def test_restore_ends_the_signal_thread(self) -> None:
        """Restoring signal handling ends the sigwait thread and unblocks the signals."""
        before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        daemon = Daemon("t", notifier=RecordingNotifier())
        daemon.install_signal_handling()
        thread = daemon._signal_thread
        daemon.restore_signal_handling()
        after = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert (False, before, False) == (
            thread is not None and thread.is_alive(),
            after,
            daemon.take_reload(),
        )
