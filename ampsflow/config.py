"""The YAML configuration, loaded into frozen dataclasses.

One file configures every service; each service reads the sections it needs.
Unknown keys are rejected and every problem is reported together, each as
``FILE: key.path: message`` (see :class:`ampsflow.errors.ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from ampsflow.errors import ConfigError, ConfigProblem

DEFAULT_CONFIG_PATH = Path("/etc/ampsflow/ampsflow.yaml")

MIN_MESSAGE_BYTES = 4096
"""Smallest ``max_message_bytes``: room for a dead-letter envelope's own fields."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AmpsConfig:
    """How the daemons reach AMPS."""

    uri: str = "tcp://127.0.0.1:9007/amps/json"
    uris: tuple[str, ...] = ()
    client_name: str | None = None
    user: str | None = None
    password_file: str | None = None
    heartbeat_s: int = 10
    reconnect_max_delay_s: float = 30.0
    command_timeout_s: float = 10.0

    @property
    def all_uris(self) -> tuple[str, ...]:
        """The URIs to try in turn: ``uris`` when set, else ``uri``."""
        return self.uris or (self.uri,)


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryConfig:
    """Where spans and metrics go and how they are sampled and batched."""

    exporter: Literal["otlp", "console", "none"] = "otlp"
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    endpoint: str = "http://127.0.0.1:4318"
    sampler_ratio: float = 1.0
    max_queue_size: int = 65536
    max_export_batch_size: int = 2048
    schedule_delay_ms: int = 500
    export_timeout_ms: int = 10000
    metrics_interval_ms: int = 15000
    shutdown_timeout_ms: int = 10000


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorConfig:
    """The processor daemon: ``input_topic`` -> add ``processed`` -> ``output_topic``."""

    service_name: str = "processor"
    input_topic: str = "internal"
    output_topic: str = "external"
    dead_letter_topic: str | None = "internal.dlq"
    carrier: Literal["header", "payload", "both"] = "both"
    state_dir: str = "/var/lib/ampsflow/processor"
    max_message_bytes: int = 16 * 1024 * 1024
    input_mode: Literal["bookmark", "queue"] = "bookmark"
    max_backlog: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class PersisterConfig:
    """The persister daemon: ``topic`` -> one fsync'd JSON line per message."""

    service_name: str = "persister"
    topic: str = "external"
    path: str = "/var/lib/ampsflow/messages.jsonl"
    max_batch_lines: int = 1000
    max_batch_delay_ms: int = 0
    state_dir: str = "/var/lib/ampsflow/persister"
    retry_max_delay_ms: int = 5000
    max_message_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class MarkerConfig:
    """The marker web server and the page it serves."""

    service_name: str = "react-web-app"
    listen: str = "127.0.0.1:8080"
    topic: str = "internal"
    amps_websocket_url: str | None = None
    amps_websocket_upstream: str = "ws://127.0.0.1:9008/amps/json"
    otlp_traces_upstream: str | None = "http://127.0.0.1:4318/v1/traces"
    otlp_max_body_bytes: int = 4 * 1024 * 1024
    otlp_timeout_ms: int = 5000
    jaeger_ui_url: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    otlp_max_decoded_bytes: int = 32 * 1024 * 1024
    forward_queue_max_requests: int = 1000
    forward_queue_max_bytes: int = 64 * 1024 * 1024
    forward_retry_max_delay_ms: int = 30000
    journey_max_spans: int = 100_000
    journey_max_bytes: int = 64 * 1024 * 1024
    journey_stall_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DevbrokerQueueConfig:
    """One message queue of the devbroker (``devbroker.queues`` entry)."""

    name: str
    underlying_topic: str | None = None
    semantics: Literal["at-least-once", "at-most-once"] = "at-least-once"
    fairness: Literal["round-robin", "proportional"] = "round-robin"
    max_per_subscription_backlog: int = 10
    lease_period_s: float = 60.0

    @property
    def topic(self) -> str:
        """The topic (or regular expression) whose messages enter the queue."""
        return self.underlying_topic or self.name


UNSUPPORTED_QUEUE_KEYS = {
    "priority": "priority queues",
    "barrier_expression": "barrier expressions",
    "barrier": "barrier expressions",
    "max_cancels": "cancel limits",
    "max_deliveries": "delivery limits",
    "expiration": "message expiration",
    "filter": "queue filters",
    "projection": "projection",
    "delivery_fairness": "delivery fairness (use fairness)",
}
"""AMPS ``<Queue>`` features the devbroker does not implement, refused with their name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DevbrokerConfig:
    """The AMPS-protocol-compatible development broker."""

    tcp: str = "127.0.0.1:9007"
    websocket: str = "127.0.0.1:9008"
    data_dir: str = "/var/lib/ampsflow/devbroker"
    users_file: str | None = None
    max_frame_bytes: int = 16 * 1024 * 1024
    max_outbound_bytes: int = 64 * 1024 * 1024
    slow_consumer_timeout_s: float = 30.0
    segment_bytes: int = 64 * 1024 * 1024
    retention_bytes: int | None = 1024 * 1024 * 1024
    retention_age_s: int | None = 7 * 24 * 3600
    commit_delay_ms: int = 1
    max_header_bytes: int = 64 * 1024
    max_filter_bytes: int = 16 * 1024
    max_filter_depth: int = 32
    max_filter_in_list: int = 1000
    max_connections: int = 1000
    logon_timeout_s: float = 10.0
    max_concurrent_logons: int = 2
    queues: tuple[DevbrokerQueueConfig, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingConfig:
    """Log level and destination (stderr, i.e. journald, unless ``file`` is set)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole file. ``source`` names where it came from, for messages."""

    amps: AmpsConfig = field(default_factory=AmpsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    persister: PersisterConfig = field(default_factory=PersisterConfig)
    marker: MarkerConfig = field(default_factory=MarkerConfig)
    devbroker: DevbrokerConfig = field(default_factory=DevbrokerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def load_config(path: Path | str | None, *, required: bool = True) -> Config:
    """Load and validate a config file.

    Args:
        path: The YAML file. ``None`` means :data:`DEFAULT_CONFIG_PATH`.
        required: When false and the file does not exist, return the defaults.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: with every problem found in the file.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    name = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not required:
            return Config()
        raise ConfigError([ConfigProblem(name, "(file)", "no such file")]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(name, "(file)", f"cannot read: {exc.strerror}")]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        # One line: each problem is one journal entry.
        detail = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError([ConfigProblem(name, where, f"not valid YAML: {detail}")]) from exc
    return parse_config(data, source=name)


def parse_config(data: object, *, source: str = "<config>") -> Config:
    """Validate already-parsed YAML data (pure: no I/O).

    Raises:
        ConfigError: with every problem found.
    """
    problems: list[ConfigProblem] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigProblem(source, "(top level)", "must be a mapping of sections")])
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _SECTIONS:
            problems.append(
                ConfigProblem(
                    source, str(key), f"unknown section (expected one of: {', '.join(_SECTIONS)})"
                )
            )
            continue
        built = _build(_SECTIONS[key], value, str(key), source, problems)
        if built is not None:
            sections[key] = built
    # Cross-field checks run on whatever parsed, so one pass reports everything;
    # a key already reported as malformed is not reported twice.
    config = Config(**sections, source=source)
    reported = {p.path for p in problems}
    problems.extend(p for p in _cross_checks(config, source) if p.path not in reported)
    if not problems:
        return config
    raise ConfigError(problems)


def _build(
    cls: type[Any], value: object, path: str, source: str, problems: list[ConfigProblem]
) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        problems.append(ConfigProblem(source, path, f"must be a mapping, got {_describe(value)}"))
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for key, item in value.items():
        key_path = f"{path}.{key}"
        if key not in names:
            problems.append(
                ConfigProblem(
                    source, key_path, f"unknown key (expected one of: {', '.join(sorted(names))})"
                )
            )
            continue
        if hints[key] == tuple[DevbrokerQueueConfig, ...]:
            queues = _build_queues(item, key_path, source, problems)
            if queues is not None:
                kwargs[key] = queues
            continue
        ok, converted, message = _convert(hints[key], item)
        if ok:
            kwargs[key] = converted
        else:
            problems.append(ConfigProblem(source, key_path, message))
    return cls(**kwargs) if len(problems) == before else None


def _build_queues(
    value: object, path: str, source: str, problems: list[ConfigProblem]
) -> tuple[DevbrokerQueueConfig, ...] | None:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list):
        problems.append(ConfigProblem(source, path, f"must be a list, got {_describe(value)}"))
        return None
    before = len(problems)
    queues: list[DevbrokerQueueConfig] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, Mapping):
            for key in item:
                if key in UNSUPPORTED_QUEUE_KEYS:
                    problems.append(
                        ConfigProblem(
                            source,
                            f"{where}.{key}",
                            f"{UNSUPPORTED_QUEUE_KEYS[key]} are not supported by the devbroker",
                        )
                    )
            if "name" not in item:
                problems.append(ConfigProblem(source, f"{where}.name", "is required"))
                continue
            entry: object = {k: v for k, v in item.items() if k not in UNSUPPORTED_QUEUE_KEYS}
        else:
            entry = item
        built = _build(DevbrokerQueueConfig, entry, where, source, problems)
        if built is not None:
            queues.append(built)
    return tuple(queues) if len(problems) == before else None


def _convert(hint: Any, value: object) -> tuple[bool, Any, str]:
    """Check ``value`` against a type hint; return (ok, converted value, problem)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        ok, converted, message = _convert(inner[0], value)
        return ok, converted, message
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return True, value, ""
        return False, None, f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list):
            return False, None, f"must be a list, got {_describe(value)}"
        (item_hint, _) = typing.get_args(hint)
        items = []
        for i, item in enumerate(value):
            ok, converted, message = _convert(item_hint, item)
            if not ok:
                return False, None, f"item {i}: {message}"
            items.append(converted)
        return True, tuple(items), ""
    if hint is bool:
        if isinstance(value, bool):
            return True, value, ""
        return False, None, f"must be true or false, got {_describe(value)}"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                return False, None, f"must not be negative, got {value}"
            return True, value, ""
        return False, None, f"must be an integer, got {_describe(value)}"
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value < 0:
                return False, None, f"must not be negative, got {value}"
            return True, float(value), ""
        return False, None, f"must be a number, got {_describe(value)}"
    if hint is str:
        if isinstance(value, str) and value:
            return True, value, ""
        return False, None, f"must be a non-empty string, got {_describe(value)}"
    raise TypeError(f"config type {hint!r} is not supported")  # pragma: no cover


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"{value!r}"
    return f"{type(value).__name__} {value!r}"


def _cross_checks(config: Config, source: str) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []

    def bad(path: str, message: str) -> None:
        problems.append(ConfigProblem(source, path, message))

    for i, uri in enumerate(config.amps.all_uris):
        where = f"amps.uris[{i}]" if config.amps.uris else "amps.uri"
        if not uri.startswith(("tcp://", "tcps://", "unix://")):
            bad(where, f"must be a tcp://, tcps:// or unix:// AMPS URI, got {uri!r}")
    if config.amps.heartbeat_s == 0:
        bad("amps.heartbeat_s", "must be at least 1")
    if config.amps.password_file is not None and config.amps.user is None:
        bad("amps.password_file", "is set but amps.user is not")
    if not 0.0 <= config.telemetry.sampler_ratio <= 1.0:
        bad(
            "telemetry.sampler_ratio",
            f"must be between 0 and 1, got {config.telemetry.sampler_ratio}",
        )
    if config.telemetry.max_export_batch_size > config.telemetry.max_queue_size:
        bad("telemetry.max_export_batch_size", "must not exceed telemetry.max_queue_size")
    if not config.telemetry.endpoint.startswith(("http://", "https://")):
        bad(
            "telemetry.endpoint",
            f"must be an http:// or https:// URL, got {config.telemetry.endpoint!r}",
        )
    if config.processor.input_topic == config.processor.output_topic:
        bad("processor.output_topic", "must differ from processor.input_topic (it would loop)")
    if config.processor.dead_letter_topic in (
        config.processor.input_topic,
        config.processor.output_topic,
    ):
        bad("processor.dead_letter_topic", "must differ from the input and output topics")
    if config.processor.max_backlog == 0:
        bad("processor.max_backlog", "must be at least 1")
    for section in ("processor", "persister"):
        if getattr(config, section).max_message_bytes < MIN_MESSAGE_BYTES:
            bad(f"{section}.max_message_bytes", f"must be at least {MIN_MESSAGE_BYTES}")
    if config.persister.max_batch_lines == 0:
        bad("persister.max_batch_lines", "must be at least 1")
    for path, value in (
        ("marker.listen", config.marker.listen),
        ("devbroker.tcp", config.devbroker.tcp),
        ("devbroker.websocket", config.devbroker.websocket),
    ):
        try:
            parse_host_port(value)
        except ValueError as exc:
            bad(path, str(exc))
    if not config.marker.amps_websocket_upstream.startswith(("ws://", "wss://")):
        bad("marker.amps_websocket_upstream", "must be a ws:// or wss:// URL")
    for i, origin in enumerate(config.marker.allowed_origins):
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            bad(
                f"marker.allowed_origins[{i}]",
                f"must be an origin like https://marker.example.com[:PORT], got {origin!r}",
            )
    for key in ("header_timeout_s", "body_timeout_s"):
        if getattr(config.marker, key) == 0:
            bad(f"marker.{key}", "must be more than 0")
    if config.devbroker.max_frame_bytes < 1024:
        bad("devbroker.max_frame_bytes", "must be at least 1024")
    broker = config.devbroker
    if not 1024 <= broker.max_header_bytes <= broker.max_frame_bytes:
        bad("devbroker.max_header_bytes", "must be at least 1024 and at most max_frame_bytes")
    for key in ("max_filter_bytes", "max_filter_depth", "max_filter_in_list", "max_connections"):
        if getattr(broker, key) == 0:
            bad(f"devbroker.{key}", "must be at least 1")
    if broker.max_concurrent_logons == 0:
        bad("devbroker.max_concurrent_logons", "must be at least 1")
    if broker.logon_timeout_s == 0:
        bad("devbroker.logon_timeout_s", "must be above 0")
    if broker.slow_consumer_timeout_s == 0:
        bad("devbroker.slow_consumer_timeout_s", "must be above 0")
    if broker.max_outbound_bytes < 64 * 1024:
        bad("devbroker.max_outbound_bytes", "must be at least 65536")
    seen: dict[str, int] = {}
    for i, queue in enumerate(config.devbroker.queues):
        where = f"devbroker.queues[{i}]"
        if queue.name in seen:
            bad(f"{where}.name", f"{queue.name!r} is already queue {seen[queue.name]}")
        seen.setdefault(queue.name, i)
        if queue.max_per_subscription_backlog == 0:
            bad(f"{where}.max_per_subscription_backlog", "must be at least 1")
        if queue.lease_period_s <= 0:
            bad(f"{where}.lease_period_s", "must be above 0")
        if queue.name.startswith("\x00"):
            bad(f"{where}.name", "must not start with a NUL character")
    return problems


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` allowed) into its parts.

    Raises:
        ValueError: when the value is not ``HOST:PORT`` with a port in 0..65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def to_mapping(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, for ``check-config`` to print."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
    return out


def changed_keys(old: Config, new: Config, sections: Iterable[str]) -> list[str]:
    """The dotted keys (``logging.level``) whose value differs between two configs.

    Pure: compares the given ``sections`` only (a service ignores the sections
    of the others; an entry ``section.key`` compares that one key), in the order
    the dataclasses declare their keys.
    """
    changed: list[str] = []
    for section in sections:
        if "." in section:  # one key of a section the service otherwise ignores
            if key_value(old, section) != key_value(new, section):
                changed.append(section)
            continue
        before, after = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(before):
            if getattr(before, f.name) != getattr(after, f.name):
                changed.append(f"{section}.{f.name}")
    return changed


def key_value(config: Config, key: str) -> Any:
    """The value of dotted ``key`` (``logging.level``) in ``config``."""
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def merge_keys(base: Config, source: Config, keys: Iterable[str]) -> Config:
    """``base`` with the dotted ``keys`` taken from ``source`` (what a reload applied).

    ``source`` names the result's file, since the keys came from it.
    """
    result = dataclasses.replace(base, source=source.source)
    for key in keys:
        section, _, name = key.partition(".")
        updated = dataclasses.replace(getattr(result, section), **{name: key_value(source, key)})
        result = dataclasses.replace(result, **{section: updated})
    return result


def read_secret(path: str) -> str:
    """Read a secret from a file (e.g. a systemd credential), stripped of the newline."""
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
