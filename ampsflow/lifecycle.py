"""The lifecycle of every ampsflow process: processor, persister, devbroker, marker.

:func:`run_service` wraps a service's work function, threaded or asyncio alike:

1. Logging is configured (``logging`` section).
2. With ``--daemonize`` the process detaches (python-daemon: double fork,
   ``--pid-file`` held while running, log files kept open). Hosts with systemd
   run the services in the foreground with ``Type=notify`` instead.
3. Signals are routed. No code runs in signal context: SIGTERM, SIGINT and
   SIGHUP are blocked before any thread starts and a dedicated thread takes
   them with ``sigwait`` (the same for threads and for asyncio event loops).

   - The first SIGTERM/SIGINT sends ``STOPPING=1`` and sets :attr:`Daemon.stop`;
     the service stops intake, drains under its deadline and returns.
   - A second SIGTERM/SIGINT exits at once, without draining or flushing
     spans, with status ``128 + signal number`` (130 after two Ctrl-C, 143 after
     two SIGTERM). Nothing acknowledged is lost: every service discards or
     acknowledges work only once it is durable, so what was in flight is
     delivered again after the next start.
   - SIGHUP reloads (:meth:`Daemon.reload`): ``RELOADING=1`` with
     ``MONOTONIC_USEC``; files are reopened (the log file by its handler, the
     persister's JSONL between two batches); the config file is read again and
     validated; what can change live is applied, every other changed key is
     logged as needing a restart, an invalid file keeps the running settings
     and every problem is logged as ``FILE: key.path: message``; then
     ``READY=1``.
4. Telemetry is set up for the services that trace
   (:func:`ampsflow.adapters.telemetry.setup_telemetry`), then garbage
   collection is tuned for a message loop (:func:`tune_garbage_collection`).
5. The work function runs. It announces ``READY=1`` (:meth:`Daemon.ready`)
   once working, reports ``STATUS=`` changes, pings the watchdog from its main
   loop (:meth:`Daemon.watchdog`; asyncio services await
   :func:`serve_until_stopped`, which pings from the event loop), and returns
   once :attr:`Daemon.stop` is set and it has drained. Because the ping comes
   from the loop's own progress, a wedged loop stops pinging and systemd
   restarts it, while an idle healthy one keeps pinging.
6. ``STOPPING=1`` is sent, telemetry is shut down last (flushing every span),
   and the exit status is 0.

Exit statuses: 0 after a clean stop; :data:`EXIT_STARTUP_FAILURE` (1) when the
service cannot start (one line on stderr, ``ampsflow <service>: <reason>``, or
a clean 0 if the stop signal came first); 78 (``EX_CONFIG``, from the command
line) for a bad config at start; ``128 + N`` after a second stop signal N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from ampsflow.adapters.export_health import ExportLogFilter
from ampsflow.adapters.systemd import Notifier
from ampsflow.adapters.telemetry import Telemetry, setup_telemetry
from ampsflow.config import Config, changed_keys, key_value, merge_keys
from ampsflow.errors import ConfigError, StartupError
from ampsflow.logs import configure_logging

logger = logging.getLogger(__name__)

EXIT_STARTUP_FAILURE = 1
"""Exit status when a service cannot start (the reason is on stderr)."""

EXIT_FORCED_BASE = 128
"""A second stop signal N exits with ``EXIT_FORCED_BASE + N`` (130 for SIGINT)."""

LIVE_KEYS_COMMON = frozenset({"logging.level", "logging.file"})
"""Keys every service applies on reload without a restart."""

LIVE_KEYS_TRACING = frozenset({"telemetry.sampler_ratio"})
"""Keys the tracing services (processor, persister) also apply on reload."""

WATCHDOG_TICK_S = 1.0
"""How often :func:`serve_until_stopped` wakes to ping the watchdog."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED = {*_STOP_SIGNALS, signal.SIGHUP}

_LOG_FILTERS = (ExportLogFilter(),)
"""Telemetry export errors: one warning when failing starts, one line when it ends."""

ReloadCallback = Callable[[Config, Config], None]
"""Called as ``callback(running, new)`` on a reload with a valid file."""


class Daemon:
    """The running service's flags, its settings and its line to the service manager.

    Args:
        name: The service name (logs, status lines).
        notifier: The sd_notify client (default: from the environment).
        config: The running configuration (reload compares the file with it).
        loader: Reads and validates the config file again (reload); ``None``
            when the service runs without one (files are still reopened).
        sections: The config sections this service reads: changes elsewhere
            in the shared file are not reported.
        live_keys: Dotted keys this service applies without a restart.
        exit: Called with the status on a second stop signal (tests).

    Attributes:
        stop: Set when the service must stop (SIGTERM, SIGINT, or a fatal error).
        force: Set by a second stop signal just before the process exits;
            waiting on it is a sleep that such a signal cuts short.
        config: The settings in effect (live changes applied).
    """

    def __init__(
        self,
        name: str,
        *,
        notifier: Notifier | None = None,
        config: Config | None = None,
        loader: Callable[[], Config] | None = None,
        sections: Collection[str] = (),
        live_keys: Collection[str] = LIVE_KEYS_COMMON,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.name = name
        self.stop = threading.Event()
        self.force = threading.Event()
        self.notifier = notifier if notifier is not None else Notifier()
        self.config = config if config is not None else Config()
        self.telemetry: Telemetry | None = None
        self._loader = loader
        self._sections = tuple(sections)
        self._live_keys = frozenset(live_keys)
        self._exit = exit
        self._reload = threading.Event()
        self._reload_callbacks: list[ReloadCallback] = []
        self._stop_callbacks: list[Callable[[], object]] = []
        self._status = ""
        self._is_ready = False
        self._lock = threading.Lock()
        self._signal_thread: threading.Thread | None = None
        self._signals_closed = False
        self._old_mask: set[int | signal.Signals] | None = None

    # -- signals ---------------------------------------------------------------------

    def install_signal_handling(self) -> None:
        """Block SIGTERM/SIGINT/SIGHUP and start the thread that takes them.

        Call before any other thread starts (and before an event loop is
        created), so every thread inherits the mask.
        """
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        self._signal_thread = threading.Thread(
            target=self._take_signals, name="signals", daemon=True
        )
        self._signal_thread.start()

    def _take_signals(self) -> None:
        while True:
            signum = signal.sigwait(_HANDLED)
            if self._signals_closed:
                return
            self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        """Act on one signal: stop, exit at once (second stop), or reload."""
        if signum == signal.SIGHUP:
            self.reload()
            return
        name = signal.Signals(signum).name
        if self.stop.is_set():
            status = EXIT_FORCED_BASE + signum
            logger.warning("%s again: exiting now without draining (status %d)", name, status)
            self.force.set()
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            self._exit(status)
            return
        logger.info("%s: stopping", name)
        self.request_stop(f"stopping ({name})")

    def request_stop(self, status: str = "stopping") -> None:
        """Set the stop event, tell the service manager and wake asyncio loops."""
        if not self.stop.is_set():
            self.notifier.stopping()
            self.notifier.status(status)
        self.stop.set()
        for callback in list(self._stop_callbacks):
            try:
                callback()
            except Exception:
                logger.exception("stop callback failed")

    def on_stop(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when the stop is requested.

        Asyncio services pass ``lambda: loop.call_soon_threadsafe(event.set)``.

        Returns:
            A function that removes the callback again (call it before the
            event loop the callback wakes is closed).
        """
        self._stop_callbacks.append(callback)
        if self.stop.is_set():
            callback()

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._stop_callbacks.remove(callback)

        return remove

    def restore_signal_handling(self) -> None:
        """End the signal thread and unblock the signals it took."""
        thread = self._signal_thread
        if thread is not None and thread.ident is not None:
            self._signals_closed = True
            # Wakes the thread's sigwait (SIGHUP is blocked there, so nothing
            # else sees it); the flag makes it return without acting.
            signal.pthread_kill(thread.ident, signal.SIGHUP)
            thread.join(5)
            self._signal_thread = None
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            self._old_mask = None

    # -- reload ----------------------------------------------------------------------

    def on_reload(self, callback: ReloadCallback) -> None:
        """Call ``callback(running, new)`` on each reload with a valid config file.

        It runs on the signal thread, after logging and sampling are updated;
        it applies the service's own live keys and must be quick and
        thread-safe (asyncio services hand the work to their loop).
        """
        self._reload_callbacks.append(callback)

    def take_reload(self) -> bool:
        """Whether a SIGHUP arrived since the last call (clears the flag).

        For files a main loop owns and reopens itself, between two units of work.
        """
        if self._reload.is_set():
            self._reload.clear()
            return True
        return False

    def reload(self) -> None:
        """SIGHUP: announce, reopen, re-read the config, apply, report, announce ready."""
        with self._lock:
            # Before READY=1 (still connecting) the reload is done but not announced:
            # a READY=1 here would tell systemd the start had finished.
            started = self._is_ready
            if started:
                self.notifier.reloading()
            self._reload.set()
            status = self._status
            try:
                status = self._reload_config()
            except Exception:
                logger.exception("reload failed; the running settings stay in effect")
            if started:
                self.notifier.ready(status)
            elif status != self._status:
                self.notifier.status(status)

    def _reload_config(self) -> str:
        """Re-read and apply the config; returns the status to report with ``READY=1``."""
        if self._loader is None:
            logger.info("SIGHUP: reopening files (no config file to re-read)")
            return self._status
        running = self.config
        try:
            new = self._loader()
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload rejected, the running settings stay in effect: %s", problem)  # noqa: TRY400 - the problem is the message
            # Shown by `systemctl status` until the next reload or status change.
            return f"reload rejected: {exc.problems[0]}"
        changes = changed_keys(running, new, self._sections)
        live = [key for key in changes if key in self._live_keys]
        restart = [key for key in changes if key not in self._live_keys]
        applied = self._apply_live(new, live)
        for key in restart:
            logger.warning(
                "reload: %s changed (running %r, file %r): needs a restart to take effect",
                key,
                key_value(running, key),
                key_value(new, key),
            )
        self.config = merge_keys(running, new, applied)
        for callback in list(self._reload_callbacks):
            try:
                callback(running, self.config)
            except Exception:
                logger.exception("reload: applying the new settings failed")
        if applied:
            logger.info("reload: applied %s", ", ".join(applied))
        elif not restart:
            logger.info("reload: %s re-read, nothing changed", new.source)
        logger.debug("reload: finished, logging at %s", self.config.logging.level)
        return self._status

    def _apply_live(self, new: Config, live: list[str]) -> list[str]:
        """Apply the generic live keys (logging, sampling); returns those applied."""
        applied = [key for key in live if not key.startswith(("logging.", "telemetry."))]
        if any(key.startswith("logging.") for key in live):
            try:
                configure_logging(new.logging, service=self.name, filters=_LOG_FILTERS)
            except OSError as exc:
                logger.error(  # noqa: TRY400 - one line says it all
                    "reload: %s: logging.file: cannot open %s: %s; logging stays as it was",
                    new.source,
                    new.logging.file,
                    exc.strerror or exc,
                )
            else:
                applied += [key for key in live if key.startswith("logging.")]
        if "telemetry.sampler_ratio" in live:
            sampler = self.telemetry.sampler if self.telemetry is not None else None
            if sampler is not None:
                sampler.set_ratio(new.telemetry.sampler_ratio)
                applied.append("telemetry.sampler_ratio")
            else:
                logger.warning(
                    "reload: telemetry.sampler_ratio is not used (OTEL_TRACES_SAMPLER is set)"
                )
        return applied

    # -- service manager -------------------------------------------------------------

    def ready(self, status: str) -> None:
        """``READY=1`` with a status line: call once working.

        The first call also takes what the process built to start (modules, config,
        connections) out of the collector's way (:func:`freeze_startup_objects`).
        """
        logger.info("ready: %s", status)
        if not self._is_ready:
            freeze_startup_objects()
        self._status = status
        self._is_ready = True
        self.notifier.ready(status)

    def status(self, status: str) -> None:
        """``STATUS=`` line (reconnects, errors, recoveries)."""
        self.notifier.status(status)

    def watchdog(self) -> None:
        """``WATCHDOG=1`` (rate-limited); call from the main loop only, never a side thread."""
        self.notifier.watchdog()


WorkFunction = Callable[[Daemon, Telemetry | None], None]
"""Runs the service until ``daemon.stop`` is set and it has drained."""

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two young-generation collections (CPython's default: 700)."""


def tune_garbage_collection() -> None:
    """Make cyclic garbage collection rare in a daemon's message loop.

    With tracing on, every message leaves spans (each a dozen container objects)
    in the batch span queue for up to ``schedule_delay_ms``; at CPython's default
    thresholds (700, 10, 10) the collector traverses them again every few messages,
    and each full collection walks the whole queue. The message paths create no
    reference cycles (reference counting frees everything), so collecting less
    often only saves time. ``benchmarks/tracing_cost.py --what-if`` and
    BENCHMARKS.md give the figures.
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


def freeze_startup_objects() -> None:
    """Exclude every object alive now from all later cyclic garbage collections.

    A started service holds ~50,000 container objects that live as long as it does
    (the modules of the AMPS client, OpenTelemetry, aiohttp; its config and
    connections), and every full collection walked them all: a 20-35 ms stall
    of the message loop each time, in every process (``gc.callbacks`` during
    ``benchmarks/pipeline.py``, BENCHMARKS.md "Tracing, fourth pass").
    Garbage is collected first, so none is kept; what is frozen is still freed by
    reference counting when it goes.
    """
    gc.collect()
    gc.freeze()


async def serve_until_stopped(daemon: Daemon, *, tick_s: float = WATCHDOG_TICK_S) -> None:
    """Return once ``daemon.stop`` is set; ping the watchdog from this event loop meanwhile.

    The ping runs as a task of the loop, so it stops when the loop is blocked
    (a wedged loop is restarted) and continues while the loop is idle.
    """
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    remove = daemon.on_stop(lambda: loop.call_soon_threadsafe(woken.set))
    try:
        while not daemon.stop.is_set():
            daemon.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=tick_s)
    finally:
        # The lifecycle requests the stop once more after the loop is closed.
        remove()


def run_service(
    config: Config,
    args: argparse.Namespace,
    *,
    service: str,
    service_name: str,
    work: WorkFunction,
    sections: Collection[str],
    live_keys: Collection[str] = LIVE_KEYS_COMMON,
    tracing: bool = True,
    notifier: Notifier | None = None,
) -> int:
    """Run ``work`` inside the shared lifecycle; returns the exit status.

    Args:
        config: The loaded configuration.
        args: The command's arguments: ``daemonize`` and ``pid_file`` are used
            when present, and ``config_loader`` (set by the command line)
            re-reads the file on SIGHUP.
        service: The command name (``processor``), for stderr lines.
        service_name: The telemetry and log service name.
        work: Runs the service until ``daemon.stop`` is set and it has drained;
            raises :class:`~ampsflow.errors.StartupError` when it cannot start.
            Its second argument is the telemetry, ``None`` when not ``tracing``.
        sections: The config sections the service reads.
        live_keys: The dotted keys it applies on reload (its own ones through
            :meth:`Daemon.on_reload`).
        tracing: Whether the service emits spans (set up telemetry).
        notifier: sd_notify client (default: from the environment).
    """
    configure_logging(config.logging, service=service_name, filters=_LOG_FILTERS)
    daemonize = bool(getattr(args, "daemonize", False))
    pid_file: Path | None = getattr(args, "pid_file", None)
    daemon = Daemon(
        service_name,
        notifier=notifier,
        config=config,
        loader=getattr(args, "config_loader", None),
        sections=sections,
        live_keys=live_keys,
    )
    try:
        with _daemon_context(daemonize, pid_file):
            return _run(daemon, service, work, tracing=tracing)
    except StartupError as exc:
        return _startup_failure(service, str(exc))


def _run(daemon: Daemon, service: str, work: WorkFunction, *, tracing: bool) -> int:
    daemon.install_signal_handling()
    telemetry: Telemetry | None = None
    try:
        if tracing:
            telemetry = setup_telemetry(daemon.config.telemetry, daemon.name)
            daemon.telemetry = telemetry
            tune_garbage_collection()
        work(daemon, telemetry)
    except StartupError as exc:
        if daemon.stop.is_set():
            logger.info("stopped during startup: %s", exc)
            return 0
        return _startup_failure(service, str(exc))
    finally:
        daemon.request_stop()
        if telemetry is not None:
            telemetry.shutdown()
        daemon.restore_signal_handling()
    logger.info("stopped")
    return 0


def _startup_failure(service: str, reason: str) -> int:
    to_stderr = any(getattr(h, "stream", None) is sys.stderr for h in logging.getLogger().handlers)
    if not to_stderr:
        logger.error("cannot start: %s", reason)
    print(f"ampsflow {service}: {reason}", file=sys.stderr, flush=True)
    return EXIT_STARTUP_FAILURE


@contextlib.contextmanager
def _daemon_context(daemonize: bool, pid_file: Path | None) -> Iterator[None]:
    """Detach (python-daemon) when asked; otherwise do nothing."""
    if not daemonize:
        if pid_file is not None:
            with _plain_pid_file(pid_file):
                yield
            return
        yield
        return
    import daemon  # noqa: PLC0415 - only hosts without systemd need it
    import daemon.pidfile  # noqa: PLC0415

    preserve: list[Any] = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and stream is not sys.stderr:
            preserve.append(stream)
    if not preserve:
        logger.warning("daemonized without logging.file: log lines are discarded")
    lock = daemon.pidfile.TimeoutPIDLockFile(str(pid_file), 1) if pid_file else None
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o027,
        pidfile=lock,
        files_preserve=preserve,
        signal_map={},
        prevent_core=True,
    )
    try:
        context.open()
    except Exception as exc:
        raise StartupError(f"cannot daemonize: {exc}") from exc
    try:
        yield
    finally:
        context.close()


@contextlib.contextmanager
def _plain_pid_file(path: Path) -> Iterator[None]:
    """Write our pid to ``path`` while running in the foreground; remove it after."""
    try:
        path.write_text(f"{os.getpid()}\n", encoding="ascii")
    except OSError as exc:
        raise StartupError(f"cannot write pid file {path}: {exc.strerror}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
