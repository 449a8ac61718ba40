"""The ``ampsflow`` command line: one entry point, one subcommand per service.

Each subcommand loads the config (``--config``, default
``/etc/ampsflow/ampsflow.yaml``), applies command-line overrides, and hands
over to the service's ``run``. A bad config prints every problem as
``FILE: key.path: message`` and exits 78.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ampsflow import __version__
from ampsflow.config import DEFAULT_CONFIG_PATH, Config, load_config, parse_host_port, to_mapping
from ampsflow.errors import EX_CONFIG, ConfigError, ConfigProblem

# Each service module exposes ``run(config: Config, args: argparse.Namespace) -> int``.
# Imported lazily so that `ampsflow check-config` does not load the AMPS client or aiohttp.
_RUNNERS = {
    "devbroker": "ampsflow.devbroker.server",
    "processor": "ampsflow.services.processor",
    "persister": "ampsflow.services.persister",
    "marker": "ampsflow.services.marker.server",
    "demo": "ampsflow.services.demo",
    "setup-system": "ampsflow.services.setup_system",
    "audit": "ampsflow.services.audit",
    "journey": "ampsflow.services.journey",
}


def _host_port(value: str) -> str:
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="ampsflow", description="A traced AMPS message pipeline.")
    parser.add_argument("--version", action="version", version=f"ampsflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument(
                "--config",
                type=Path,
                default=None,
                metavar="FILE",
                help=f"YAML config (default: {DEFAULT_CONFIG_PATH}; built-in defaults if absent)",
            )
        return p

    p = command("devbroker", "Run the AMPS-protocol-compatible development broker.")
    p.add_argument(
        "--tcp",
        type=_host_port,
        metavar="HOST:PORT",
        help="TCP listener (tcp://HOST:PORT/amps/json)",
    )
    p.add_argument(
        "--websocket", type=_host_port, metavar="HOST:PORT", help="WebSocket listener (/amps/json)"
    )
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="transaction log directory")
    p.add_argument(
        "--users-file",
        type=Path,
        metavar="FILE",
        help="name:hashed-password lines; enables authentication",
    )

    for name, text in (
        ("processor", "Run the processor daemon (input_topic -> processed -> output_topic)."),
        ("persister", "Run the persister daemon (topic -> fsync'd JSONL file)."),
    ):
        p = command(name, text)
        p.add_argument(
            "--daemonize",
            action="store_true",
            help="detach from the terminal (hosts without systemd)",
        )
        p.add_argument(
            "--pid-file", type=Path, metavar="FILE", help="pid file to hold while daemonized"
        )
        if name == "processor":
            p.add_argument(
                "--instance",
                type=_instance,
                metavar="NAME",
                help="run as queue-mode instance NAME: own client name and state directory",
            )

    p = command("marker", "Run the marker web server (page, /config.json, OTLP and AMPS proxies).")
    p.add_argument("--listen", type=_host_port, metavar="HOST:PORT", help="address to serve on")

    p = command(
        "demo", "Run devbroker, processor, persister and marker together on loopback.", config=False
    )
    p.add_argument(
        "--dir", type=Path, default=Path("ampsflow-demo"), metavar="DIR", help="state directory"
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send every service's spans to this OTLP/HTTP endpoint",
    )
    p.add_argument("--port", type=int, default=8080, help="marker page port (default 8080)")
    p.add_argument(
        "--jaeger-ui-url",
        metavar="URL",
        help="show an 'open trace' link per mark (e.g. http://127.0.0.1:16686)",
    )

    command("check-config", "Validate the config and print the effective settings.")

    p = command(
        "setup-system",
        "Create the ampsflow user, directories, default config and systemd units.",
        config=False,
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be done, change nothing"
    )
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="install below this root (packaging, tests)"
    )
    p.add_argument("--no-user", action="store_true", help="do not create the system user")

    p = command("journey", "Print a message's journey from the marker's index and its JSONL line.")
    p.add_argument("id", metavar="ID", help="a message id or a 32-hex trace id")
    p.add_argument(
        "--marker",
        metavar="URL",
        help="the marker's base URL (default: http://<marker.listen> from the config)",
    )

    p = command("audit", "Reconcile published message ids against a JSONL file.", config=False)
    p.add_argument(
        "--published",
        type=Path,
        required=True,
        metavar="FILE",
        help="one published message id per line",
    )
    p.add_argument(
        "--jsonl", type=Path, required=True, metavar="FILE", help="the persister's JSONL output"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--any-order",
        action="store_true",
        help="do not check publish order (several processors sharing a queue)",
    )
    return parser


def _instance(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise argparse.ArgumentTypeError(
            f"must be 1-64 letters, digits, '_', '.' or '-', got {value!r}"
        )
    return value


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    devbroker: dict[str, Any] = {}
    for flag, key in (
        ("tcp", "tcp"),
        ("websocket", "websocket"),
        ("data_dir", "data_dir"),
        ("users_file", "users_file"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            devbroker[key] = str(value)
    if devbroker:
        config = dataclasses.replace(
            config, devbroker=dataclasses.replace(config.devbroker, **devbroker)
        )
    if getattr(args, "listen", None):
        config = dataclasses.replace(
            config, marker=dataclasses.replace(config.marker, listen=args.listen)
        )
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ampsflow``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    config = Config()
    if hasattr(args, "config"):
        try:
            config = _apply_overrides(
                load_config(args.config, required=args.config is not None), args
            )
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return EX_CONFIG
        # SIGHUP reads the same file again, with the same command-line overrides.
        args.config_loader = lambda: _apply_overrides(
            load_config(args.config, required=args.config is not None), args
        )
    if args.command == "check-config":
        print(f"# {config.source}: OK", file=sys.stderr)
        sys.stdout.write(yaml.safe_dump(to_mapping(config), sort_keys=False))
        return 0
    module = importlib.import_module(_RUNNERS[args.command])
    run: Callable[[Config, argparse.Namespace], int] = module.run
    try:
        return run(config, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _service_main(name: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(main([name, *sys.argv[1:]]))

    entry.__doc__ = f"Console script ``ampsflow-{name}``."
    return entry


processor_main = _service_main("processor")
persister_main = _service_main("persister")
marker_main = _service_main("marker")
devbroker_main = _service_main("devbroker")

__all__ = ["ConfigProblem", "build_parser", "main"]
