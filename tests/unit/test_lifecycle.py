"""The shared lifecycle: signals become flags, reloads, sd_notify lines, startup failures."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given

from ampsflow.adapters.sampling import RatioSampler
from ampsflow.adapters.systemd import Notifier
from ampsflow.adapters.telemetry import Telemetry
from ampsflow.config import Config, LoggingConfig, TelemetryConfig, load_config
from ampsflow.errors import StartupError
from ampsflow.lifecycle import (
    EXIT_FORCED_BASE,
    EXIT_STARTUP_FAILURE,
    LIVE_KEYS_COMMON,
    LIVE_KEYS_TRACING,
    Daemon,
    run_service,
    serve_until_stopped,
)
from ampsflow.logs import configure_logging
from ampsflow.testing import in_memory_telemetry
from tests.strategies import config_texts


class RecordingNotifier(Notifier):
    """A notifier that records what it would send (its watchdog is armed at 2 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.watchdog_interval_s = 2.0

    def _send(self, message: str) -> None:
        self.sent.append(message)


def quiet_config() -> Config:
    return Config(telemetry=TelemetryConfig(exporter="none"))


def args() -> argparse.Namespace:
    return argparse.Namespace(daemonize=False, pid_file=None)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Reloads reconfigure the root logger; put the test runner's handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


class ConfigFile:
    """A config file on disk and a daemon that reloads from it."""

    def __init__(
        self, path: Path, *, live_keys: frozenset[str] = LIVE_KEYS_COMMON, ready: bool = True
    ) -> None:
        self.path = path
        self.write("logging: {level: info}\nprocessor: {input_topic: internal}\n")
        self.notifier = RecordingNotifier()
        configure_logging(load_config(path).logging, service="t")
        self.daemon = Daemon(
            "t",
            notifier=self.notifier,
            config=load_config(path),
            loader=lambda: load_config(path),
            sections=("logging", "telemetry", "processor"),
            live_keys=live_keys,
        )
        if ready:
            self.daemon.ready("working")
            self.notifier.sent.clear()

    def write(self, text: str) -> None:
        self.path.write_text(text, encoding="utf-8")


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFile:
    return ConfigFile(tmp_path / "ampsflow.yaml")


class TestStartupObjects:
    def test_what_was_built_to_start_is_left_out_of_later_collections(self) -> None:
        """At READY the objects alive are frozen: a later full collection does not walk
        them (it was a 20-30 ms stall of the message loop), and garbage was not kept."""
        gc.unfreeze()
        try:
            daemon = Daemon("t", notifier=RecordingNotifier(), exit=lambda _code: None)
            startup = [{"config": i} for i in range(10_000)]
            cycle: list[object] = []
            cycle.append(cycle)
            cycle_ref = weakref.ref(_Cyclic(cycle))
            daemon.ready("working")
            frozen = gc.get_freeze_count()
            later = [{"message": i} for i in range(1_000)]
            daemon.ready("working again")
            # Only the first READY freezes: ``later`` would be frozen by a second one.
            # The count can still fall: a frozen object another thread frees leaves it.
            assert frozen >= len(startup)
            assert gc.get_freeze_count() <= frozen
            assert later
            assert cycle_ref() is None
        finally:
            gc.unfreeze()


class _Cyclic:
    """Garbage only the cyclic collector can free."""

    def __init__(self, payload: object) -> None:
        self.me = self
        self.payload = payload


class TestSignals:
    def test_sigterm_sets_stop(self) -> None:
        """SIGTERM sets the stop event and does not exit."""
        exits: list[int] = []
        daemon = Daemon("t", notifier=RecordingNotifier(), exit=exits.append)
        daemon.handle_signal(signal.SIGTERM)
        assert (True, []) == (daemon.stop.is_set(), exits)

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            (signal.SIGTERM, signal.SIGTERM),
            (signal.SIGINT, signal.SIGINT),
            (signal.SIGTERM, signal.SIGINT),
        ],
    )
    def test_second_stop_signal_exits_at_once(
        self, first: signal.Signals, second: signal.Signals
    ) -> None:
        """A second SIGTERM/SIGINT exits with 128 + its number, whichever came first."""
        exits: list[int] = []
        daemon = Daemon("t", notifier=RecordingNotifier(), exit=exits.append)
        daemon.handle_signal(first)
        daemon.handle_signal(second)
        assert ([EXIT_FORCED_BASE + second], True) == (exits, daemon.force.is_set())

    def test_stop_announces_stopping_once(self) -> None:
        """Stopping sends STOPPING=1 once, however often it is requested."""
        notifier = RecordingNotifier()
        daemon = Daemon("t", notifier=notifier)
        daemon.handle_signal(signal.SIGTERM)
        daemon.request_stop()
        assert notifier.sent.count("STOPPING=1") == 1

    def test_stop_callbacks_run_once_stop_is_requested(self) -> None:
        """on_stop callbacks run on the stop request, or at once when already stopping."""
        calls: list[str] = []
        daemon = Daemon("t", notifier=RecordingNotifier())
        daemon.on_stop(lambda: calls.append("early"))
        daemon.handle_signal(signal.SIGTERM)
        daemon.on_stop(lambda: calls.append("late"))
        assert ["early", "late"] == calls

    def test_sighup_brackets_the_reload(self) -> None:
        """SIGHUP sends RELOADING=1 with MONOTONIC_USEC, then READY=1, and sets the reopen flag."""
        notifier = RecordingNotifier()
        daemon = Daemon("t", notifier=notifier)
        daemon.ready("working")
        notifier.sent.clear()
        daemon.handle_signal(signal.SIGHUP)
        reloading = notifier.sent[0].splitlines()
        assert (
            "RELOADING=1",
            True,
            True,
            True,
            False,
            False,
        ) == (
            reloading[0],
            reloading[1].startswith("MONOTONIC_USEC=") and reloading[1][15:].isdigit(),
            notifier.sent[-1].startswith("READY=1") and "STATUS=working" in notifier.sent[-1],
            daemon.take_reload(),
            daemon.take_reload(),
            daemon.stop.is_set(),
        )


class TestReload:
    def test_reload_before_ready_does_not_announce_ready(self, tmp_path: Path) -> None:
        """A SIGHUP while still starting applies the file but sends no RELOADING=1/READY=1."""
        config_file = ConfigFile(tmp_path / "c.yaml", ready=False)
        config_file.write("logging: {level: debug}\nprocessor: {input_topic: internal}\n")
        config_file.daemon.handle_signal(signal.SIGHUP)
        sent = config_file.notifier.sent
        assert ([], "debug") == (
            [m for m in sent if m.startswith(("READY=1", "RELOADING=1"))],
            config_file.daemon.config.logging.level,
        )

    def test_changed_level_applies(self, config_file: ConfigFile) -> None:
        """A reload with a new logging.level changes the root logger's level."""
        config_file.write("logging: {level: debug}\nprocessor: {input_topic: internal}\n")
        config_file.daemon.handle_signal(signal.SIGHUP)
        assert (logging.DEBUG, "debug") == (
            logging.getLogger().level,
            config_file.daemon.config.logging.level,
        )

    def test_changed_log_file_applies(self, config_file: ConfigFile, tmp_path: Path) -> None:
        """A reload with a new logging.file sends the following lines there."""
        log = tmp_path / "new.log"
        config_file.write(f"logging: {{level: info, file: {log}}}\n")
        config_file.daemon.handle_signal(signal.SIGHUP)
        logging.getLogger("ampsflow.test").warning("after the reload")
        assert "after the reload" in log.read_text(encoding="utf-8")

    def test_restart_keys_are_reported_not_applied(
        self, config_file: ConfigFile, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A changed key that cannot change live is logged as needing a restart, with its path."""
        config_file.write("logging: {level: info}\nprocessor: {input_topic: other}\n")
        with caplog.at_level(logging.INFO, logger="ampsflow.lifecycle"):
            config_file.daemon.handle_signal(signal.SIGHUP)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (1, True, "internal") == (
            len(warnings),
            warnings[0].startswith("reload: processor.input_topic changed")
            and "needs a restart" in warnings[0],
            config_file.daemon.config.processor.input_topic,
        )

    def test_other_sections_are_ignored(
        self, config_file: ConfigFile, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A change in a section the service does not read is not reported."""
        config_file.write("logging: {level: info}\nmarker: {listen: '127.0.0.1:1'}\n")
        with caplog.at_level(logging.INFO, logger="ampsflow.lifecycle"):
            config_file.daemon.handle_signal(signal.SIGHUP)
        assert [] == [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_invalid_file_keeps_the_settings(
        self, config_file: ConfigFile, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An invalid file changes nothing and logs every problem as FILE: key.path: message."""
        config_file.write("logging: {level: loud}\nprocessor: {input_topc: x}\n")
        before = config_file.daemon.config
        with caplog.at_level(logging.INFO, logger="ampsflow.lifecycle"):
            config_file.daemon.handle_signal(signal.SIGHUP)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        name = str(config_file.path)
        assert (before, logging.INFO, 2, True, True) == (
            config_file.daemon.config,
            logging.getLogger().level,
            len(errors),
            any(f"{name}: logging.level: must be one of" in e for e in errors),
            any(f"{name}: processor.input_topc: unknown key" in e for e in errors),
        )

    def test_invalid_file_still_ends_with_ready(self, config_file: ConfigFile) -> None:
        """A rejected reload still tells systemd it is ready again, with the reason in STATUS."""
        config_file.write("logging: [")
        config_file.daemon.handle_signal(signal.SIGHUP)
        sent = config_file.notifier.sent
        expected = (True, True, True)
        actual = (
            sent[0].startswith("RELOADING=1"),
            sent[-1].startswith("READY=1"),
            f"STATUS=reload rejected: {config_file.path}: line" in sent[-1],
        )
        assert expected == actual

    def test_service_callback_gets_the_new_settings(self, config_file: ConfigFile) -> None:
        """on_reload callbacks see the running and the reloaded settings."""
        seen: list[tuple[str, str]] = []
        config_file.daemon.on_reload(
            lambda running, new: seen.append((running.logging.level, new.logging.level))
        )
        config_file.write("logging: {level: error}\n")
        config_file.daemon.handle_signal(signal.SIGHUP)
        assert [("info", "error")] == seen

    def test_sampler_ratio_applies_live(self, tmp_path: Path) -> None:
        """A reload with a new telemetry.sampler_ratio changes the running sampler."""
        config_file = ConfigFile(
            tmp_path / "c.yaml", live_keys=LIVE_KEYS_COMMON | LIVE_KEYS_TRACING
        )

        otel = in_memory_telemetry("t")
        sampler = RatioSampler(1.0)
        otel.telemetry.sampler = sampler
        config_file.daemon.telemetry = otel.telemetry
        config_file.write("telemetry: {exporter: none, sampler_ratio: 0.25}\n")
        config_file.daemon.handle_signal(signal.SIGHUP)
        assert (0.25, 0.25) == (sampler.ratio, config_file.daemon.config.telemetry.sampler_ratio)

    @given(text=config_texts())
    def test_any_file_content_leaves_a_valid_running_config(
        self, config_file: ConfigFile, text: str
    ) -> None:
        """Whatever the file holds, reload ends with READY=1 and valid, consistent settings."""
        config_file.write(text)
        config_file.notifier.sent.clear()
        config_file.daemon.handle_signal(signal.SIGHUP)
        running = config_file.daemon.config
        expected = (True, True, running.logging.level.upper())
        actual = (
            config_file.notifier.sent[0].startswith("RELOADING=1"),
            config_file.notifier.sent[-1].startswith("READY=1"),
            logging.getLevelName(logging.getLogger().level),
        )
        assert expected == actual


class TestWatchdog:
    def test_idle_event_loop_keeps_pinging(self) -> None:
        """serve_until_stopped pings the watchdog while the loop is idle, until stopped."""
        notifier = RecordingNotifier()
        notifier.watchdog_interval_s = 0.02
        daemon = Daemon("t", notifier=notifier)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, daemon.request_stop)
            await serve_until_stopped(daemon, tick_s=0.02)

        asyncio.run(main())
        assert notifier.sent.count("WATCHDOG=1") >= 3

    def test_wedged_event_loop_stops_pinging(self) -> None:
        """While the event loop is blocked, no WATCHDOG=1 is sent."""
        notifier = RecordingNotifier()
        notifier.watchdog_interval_s = 0.02
        daemon = Daemon("t", notifier=notifier)
        wedged = threading.Event()
        release = threading.Event()
        counts: list[int] = []

        def wedge() -> None:
            counts.append(notifier.sent.count("WATCHDOG=1"))
            wedged.set()
            release.wait(5)  # the loop is stuck here: nothing else runs on it
            counts.append(notifier.sent.count("WATCHDOG=1"))
            daemon.request_stop()

        async def main() -> None:
            asyncio.get_running_loop().call_later(0.1, wedge)
            await serve_until_stopped(daemon, tick_s=0.01)

        def releaser() -> None:
            wedged.wait(5)
            # Long enough for several pings had the loop been free.
            threading.Event().wait(0.2)
            release.set()

        helper = threading.Thread(target=releaser)
        helper.start()
        asyncio.run(main())
        helper.join()
        assert counts[0] == counts[1]


class TestRunService:
    def test_clean_run_exits_zero_and_stops(self) -> None:
        """A work function that returns gives exit 0, READY=1 and STOPPING=1."""
        notifier = RecordingNotifier()
        seen: list[Telemetry | None] = []

        def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
            daemon.ready("working")
            seen.append(telemetry)

        code = run_service(
            quiet_config(),
            args(),
            service="t",
            service_name="t",
            work=work,
            sections=("logging",),
            notifier=notifier,
        )
        assert (0, 1, True) == (
            code,
            len([t for t in seen if t is not None]),
            any(m.startswith("READY=1") for m in notifier.sent) and "STOPPING=1" in notifier.sent,
        )

    def test_asyncio_service_without_tracing(self) -> None:
        """An asyncio work function runs under the same lifecycle, with no telemetry."""
        notifier = RecordingNotifier()
        seen: list[Telemetry | None] = []

        def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
            seen.append(telemetry)

            async def main() -> None:
                daemon.ready("serving")
                asyncio.get_running_loop().call_soon(daemon.request_stop)
                await serve_until_stopped(daemon)

            asyncio.run(main())

        code = run_service(
            quiet_config(),
            args(),
            service="t",
            service_name="t",
            work=work,
            sections=("logging",),
            tracing=False,
            notifier=notifier,
        )
        assert (0, [None]) == (code, seen)

    def test_asyncio_service_leaves_no_callback_on_a_closed_loop(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A stop requested after the event loop has closed logs no error."""
        daemon = Daemon("t", notifier=RecordingNotifier())

        async def main() -> None:
            asyncio.get_running_loop().call_later(0.05, daemon.stop.set)
            await serve_until_stopped(daemon, tick_s=0.01)

        asyncio.run(main())
        with caplog.at_level(logging.ERROR, logger="ampsflow.lifecycle"):
            daemon.request_stop()
        assert [] == caplog.records

    def test_startup_failure_is_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A StartupError gives exit 1 and one 'ampsflow <service>: reason' line on stderr."""

        def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
            raise StartupError("cannot open /nowhere")

        code = run_service(
            quiet_config(),
            args(),
            service="processor",
            service_name="processor",
            work=work,
            sections=("logging",),
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

        def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
            daemon.request_stop()
            raise StartupError("stopped before connecting to AMPS")

        code = run_service(
            quiet_config(),
            args(),
            service="t",
            service_name="t",
            work=work,
            sections=("logging",),
            notifier=RecordingNotifier(),
        )
        assert code == 0

    def test_reload_uses_the_command_line_loader(self, tmp_path: Path) -> None:
        """run_service re-reads the file through args.config_loader on SIGHUP."""
        path = tmp_path / "c.yaml"
        path.write_text("logging: {level: info}\n", encoding="utf-8")
        levels: list[str] = []

        def work(daemon: Daemon, telemetry: Telemetry | None) -> None:
            path.write_text("logging: {level: warning}\n", encoding="utf-8")
            daemon.handle_signal(signal.SIGHUP)
            levels.append(daemon.config.logging.level)

        namespace = args()
        namespace.config_loader = lambda: load_config(path)
        run_service(
            Config(logging=LoggingConfig(level="info"), telemetry=TelemetryConfig(exporter="none")),
            namespace,
            service="t",
            service_name="t",
            work=work,
            sections=("logging",),
            notifier=RecordingNotifier(),
        )
        assert ["warning"] == levels


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
