"""``processor.max_message_bytes`` and ``persister.max_message_bytes`` in the config."""

from __future__ import annotations

import pytest

from ampsflow.config import MIN_MESSAGE_BYTES, parse_config
from ampsflow.errors import ConfigError


@pytest.mark.parametrize("section", ["processor", "persister"])
def test_default_matches_the_devbroker_frame_cap(section: str) -> None:
    """Both limits default to the devbroker's max_frame_bytes (16 MiB)."""
    config = parse_config({})
    assert getattr(config, section).max_message_bytes == config.devbroker.max_frame_bytes


@pytest.mark.parametrize("section", ["processor", "persister"])
def test_too_small_a_limit_is_a_config_error(section: str) -> None:
    """Below MIN_MESSAGE_BYTES a dead letter's own fields would not fit: the file is refused."""
    with pytest.raises(ConfigError) as info:
        parse_config({section: {"max_message_bytes": MIN_MESSAGE_BYTES - 1}}, source="f.yaml")
    assert [str(p) for p in info.value.problems] == [
        f"f.yaml: {section}.max_message_bytes: must be at least {MIN_MESSAGE_BYTES}"
    ]
