"""``ampsflow devbroker``: the process around the :class:`~ampsflow.devbroker.broker.Broker`.

Logging, the broker on its event loop, signals (SIGTERM/SIGINT stop it, SIGHUP re-reads the
users file) and the systemd notifications. The broker itself is
:mod:`ampsflow.devbroker.broker`, its listeners :mod:`ampsflow.devbroker.transports`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ampsflow.config import Config, parse_host_port
from ampsflow.devbroker.broker import Broker
from ampsflow.errors import (
    AuthError,
    StartupError,
    TransactionLogError,
)
from ampsflow.lifecycle import LIVE_KEYS_COMMON, Daemon, run_service, serve_until_stopped

logger = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL_S = 0.0005


def run(config: Config, args: argparse.Namespace) -> int:
    """``ampsflow devbroker``: serve until SIGTERM/SIGINT; exit 1 when it cannot start.

    The shared lifecycle (:mod:`ampsflow.lifecycle`) takes the signals, pings the
    watchdog from the event loop and reloads on SIGHUP: ``logging.*`` and
    ``devbroker.users_file`` apply live (the users file is read again on every
    reload); the listeners, data directory and log settings need a restart.
    """
    # The commit thread needs the GIL back right after each fdatasync to hand the batch to
    # the event loop; CPython's default 5 ms switch interval would add that to every ack
    # and delivery while the loop is busy.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    def work(daemon: Daemon, telemetry: object) -> None:
        del telemetry  # the broker emits no spans
        asyncio.run(_serve(daemon))

    return run_service(
        config,
        args,
        service="devbroker",
        service_name="devbroker",
        work=work,
        sections=("devbroker", "logging"),
        live_keys=LIVE_KEYS_COMMON | {"devbroker.users_file"},
        tracing=False,
    )


async def _serve(daemon: Daemon) -> None:
    config = daemon.config.devbroker
    broker = Broker(config)
    try:
        await broker.start()
    except (TransactionLogError, AuthError, OSError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    tcp_host = parse_host_port(config.tcp)[0]
    ws_host = parse_host_port(config.websocket)[0]
    status = (
        f"listening on tcp://{tcp_host}:{broker.tcp_port}/amps/json and "
        f"ws://{ws_host}:{broker.websocket_port}/amps/json"
    )
    logger.info("devbroker %s (data dir %s)", status, config.data_dir)
    # Runs on the lifecycle's signal thread: reading the file there keeps the event
    # loop serving, and replacing broker.users is one reference assignment.
    daemon.on_reload(lambda _running, new: broker.reload_users(new.devbroker.users_file))
    daemon.ready(status)
    try:
        await serve_until_stopped(daemon)
    finally:
        await broker.stop()
