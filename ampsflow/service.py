"""The lifecycle every ampsflow daemon shares.

:func:`run_daemon` wraps a service's work function:

1. Logging is configured (``logging`` section).
2. With ``--daemonize`` the process detaches (python-daemon: double fork,
   ``--pid-file`` held while running, log files kept open). Hosts with systemd
   run the daemons in the foreground with ``Type=notify`` instead.
3. Signals are routed: SIGTERM and SIGINT set the stop event; SIGHUP sets the
   reload flag (files are reopened by whoever owns them). No code runs in
   signal context: the signals are blocked before any thread starts and a
   dedicated thread takes them with ``sigwait``, so setting the events cannot
   deadlock the interrupted thread. A second SIGTERM/SIGINT also sets
   :attr:`Daemon.force`, which cuts drain waits short.
4. Telemetry is set up (:func:`ampsflow.adapters.telemetry.setup_telemetry`),
   then garbage collection is tuned for a message loop
   (:func:`tune_garbage_collection`).
5. The work function runs. It announces ``READY=1`` (:meth:`Daemon.ready`) once
   subscribed, pings the watchdog from its loop, reports ``STATUS=`` changes,
   and returns once :attr:`Daemon.stop` is set and it has drained.
6. ``STOPPING=1`` is sent, telemetry is shut down last (flushing every span),
   and the exit status is 0.

A startup failure (:class:`~ampsflow.errors.StartupError`) prints one line on
stderr, ``ampsflow <service>: <reason>``, and exits 1; if the stop signal came
first, the exit is a clean 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ampsflow.adapters.systemd import Notifier
from ampsflow.adapters.telemetry import Telemetry, setup_telemetry
from ampsflow.config import Config
from ampsflow.errors import StartupError
from ampsflow.logs import configure_logging

logger = logging.getLogger(__name__)

EXIT_STARTUP_FAILURE = 1
"""Exit status when a daemon cannot start (the reason is on stderr)."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_HANDLED = {*_STOP_SIGNALS, signal.SIGHUP}


class Daemon:
    """The running daemon's flags and its line to the service manager.

    Attributes:
        name: The service name (logs, status lines).
        stop: Set when the daemon must stop (SIGTERM, SIGINT, or a fatal error).
        force: Set by a second stop signal: skip remaining drain waits.
        notifier: The sd_notify client (a no-op without systemd).
    """

    def __init__(self, name: str, *, notifier: Notifier | None = None) -> None:
        self.name = name
        self.stop = threading.Event()
        self.force = threading.Event()
        self.notifier = notifier if notifier is not None else Notifier()
        self._reload = threading.Event()
        self._reload_callbacks: list[Callable[[], None]] = []
        self._signal_thread: threading.Thread | None = None
        self._signals_closed = False
        self._old_mask: set[int | signal.Signals] | None = None

    # -- signals ---------------------------------------------------------------------

    def install_signal_handling(self) -> None:
        """Block SIGTERM/SIGINT/SIGHUP and start the thread that takes them.

        Call before any other thread starts, so every thread inherits the mask.
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
        """Act on one signal: stop (twice: force) or request a reload."""
        if signum == signal.SIGHUP:
            logger.info("SIGHUP: reopening files")
            self._reload.set()
            for callback in list(self._reload_callbacks):
                try:
                    callback()
                except Exception:
                    logger.exception("reload callback failed")
            return
        name = signal.Signals(signum).name
        if self.stop.is_set():
            logger.warning("%s again: stopping without waiting for the drain", name)
            self.force.set()
        else:
            logger.info("%s: stopping", name)
        self.request_stop(f"stopping ({name})")

    def request_stop(self, status: str = "stopping") -> None:
        """Set the stop event and tell the service manager."""
        if not self.stop.is_set():
            self.notifier.stopping()
            self.notifier.status(status)
        self.stop.set()

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

    def on_reload(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the signal thread) on every SIGHUP; keep it short."""
        self._reload_callbacks.append(callback)

    def take_reload(self) -> bool:
        """Whether a SIGHUP arrived since the last call (clears the flag)."""
        if self._reload.is_set():
            self._reload.clear()
            return True
        return False

    # -- service manager -------------------------------------------------------------

    def ready(self, status: str) -> None:
        """``READY=1`` with a status line: call once subscribed and working."""
        logger.info("ready: %s", status)
        self.notifier.ready(status)

    def status(self, status: str) -> None:
        """``STATUS=`` line (reconnects, errors, recoveries)."""
        self.notifier.status(status)

    def watchdog(self) -> None:
        """``WATCHDOG=1`` (rate-limited); call from the work loop only."""
        self.notifier.watchdog()


WorkFunction = Callable[[Daemon, Telemetry], None]

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


def run_daemon(
    config: Config,
    args: argparse.Namespace,
    *,
    service: str,
    service_name: str,
    work: WorkFunction,
    notifier: Notifier | None = None,
) -> int:
    """Run ``work`` inside the shared daemon lifecycle; returns the exit status.

    Args:
        config: The loaded configuration.
        args: The command's arguments (``daemonize`` and ``pid_file`` are used).
        service: The command name (``processor``), for stderr lines.
        service_name: The telemetry and log service name.
        work: Runs the service until ``daemon.stop`` is set and it has drained;
            raises :class:`~ampsflow.errors.StartupError` when it cannot start.
        notifier: sd_notify client (default: from the environment).
    """
    configure_logging(config.logging, service=service_name)
    daemonize = bool(getattr(args, "daemonize", False))
    pid_file: Path | None = getattr(args, "pid_file", None)
    try:
        with _daemon_context(daemonize, pid_file, service):
            return _run(config, service, service_name, work, notifier)
    except StartupError as exc:
        return _startup_failure(service, str(exc))


def _run(
    config: Config,
    service: str,
    service_name: str,
    work: WorkFunction,
    notifier: Notifier | None,
) -> int:
    daemon = Daemon(service_name, notifier=notifier)
    daemon.install_signal_handling()
    telemetry = setup_telemetry(config.telemetry, service_name)
    tune_garbage_collection()
    try:
        work(daemon, telemetry)
    except StartupError as exc:
        if daemon.stop.is_set():
            logger.info("stopped during startup: %s", exc)
            return 0
        return _startup_failure(service, str(exc))
    finally:
        daemon.request_stop()
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
def _daemon_context(daemonize: bool, pid_file: Path | None, service: str) -> Iterator[None]:
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
