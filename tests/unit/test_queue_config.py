"""``devbroker.queues`` and ``processor.input_mode``: typed, strict, errors with their path."""

from __future__ import annotations

import pytest

from ampsflow.config import DevbrokerQueueConfig, parse_config, to_mapping
from ampsflow.errors import ConfigError


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="f.yaml")
    return [str(p) for p in info.value.problems]


def test_queue_entries_are_typed_with_defaults() -> None:
    """An entry needs only a name; the underlying topic defaults to it."""
    config = parse_config({"devbroker": {"queues": [{"name": "q", "lease_period_s": 5}]}})
    (queue,) = config.devbroker.queues
    assert DevbrokerQueueConfig(name="q", lease_period_s=5.0) == queue
    assert "q" == queue.topic


def test_round_trip_through_the_effective_config() -> None:
    """check-config's output of queues loads back to the same values."""
    config = parse_config({"devbroker": {"queues": [{"name": "q", "underlying_topic": "t"}]}})
    assert config == parse_config(to_mapping(config), source=config.source)


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        ("q", "f.yaml: devbroker.queues: must be a list, got 'q'"),
        ([{"lease_period_s": 1}], "f.yaml: devbroker.queues[0].name: is required"),
        (
            [{"name": "q", "semantics": "exactly-once"}],
            "f.yaml: devbroker.queues[0].semantics: must be one of at-least-once, at-most-once",
        ),
        (
            [{"name": "q", "priority": 3}],
            "f.yaml: devbroker.queues[0].priority: priority queues are not supported",
        ),
        ([{"name": "q", "bogus": 1}], "f.yaml: devbroker.queues[0].bogus: unknown key"),
        ([{"name": "q"}, {"name": "q"}], "f.yaml: devbroker.queues[1].name: 'q' is already"),
        (
            [{"name": "q", "max_per_subscription_backlog": 0}],
            "f.yaml: devbroker.queues[0].max_per_subscription_backlog: must be at least 1",
        ),
        ([{"name": "q", "lease_period_s": 0}], "f.yaml: devbroker.queues[0].lease_period_s"),
        (["q"], "f.yaml: devbroker.queues[0]: must be a mapping"),
    ],
)
def test_bad_entries_name_their_path(queues: object, expected: str) -> None:
    """Each problem names the entry and key."""
    found = problems_of({"devbroker": {"queues": queues}})
    assert any(p.startswith(expected) for p in found), found


def test_processor_input_mode() -> None:
    """bookmark (default) or queue; anything else is an error; max_backlog at least 1."""
    assert "bookmark" == parse_config({}).processor.input_mode
    assert "queue" == parse_config({"processor": {"input_mode": "queue"}}).processor.input_mode
    assert problems_of({"processor": {"input_mode": "pull"}}) == [
        "f.yaml: processor.input_mode: must be one of bookmark, queue, got 'pull'"
    ]
    assert problems_of({"processor": {"max_backlog": 0}}) == [
        "f.yaml: processor.max_backlog: must be at least 1"
    ]
