"""The YAML config: strict typed sections, every problem reported together."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given

from ampsflow.config import (
    Config,
    changed_keys,
    load_config,
    merge_keys,
    parse_config,
    parse_host_port,
    to_mapping,
)
from ampsflow.errors import ConfigError
from tests.strategies import config_mappings


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="f.yaml")
    return [str(p) for p in info.value.problems]


class TestParseConfig:
    def test_empty_file_gives_defaults(self) -> None:
        """An empty document is the built-in defaults."""
        assert Config(source="f.yaml") == parse_config(None, source="f.yaml")

    def test_values_are_typed(self) -> None:
        """Values land in their typed fields; lists become tuples."""
        config = parse_config(
            {
                "amps": {"uris": ["tcp://a:1/amps/json", "tcp://b:1/amps/json"], "heartbeat_s": 5},
                "telemetry": {"sampler_ratio": 1},
                "processor": {"carrier": "header", "dead_letter_topic": None},
            }
        )
        assert config.amps.all_uris == ("tcp://a:1/amps/json", "tcp://b:1/amps/json")
        assert config.amps.heartbeat_s == 5
        assert config.telemetry.sampler_ratio == 1.0
        assert config.processor.carrier == "header"
        assert config.processor.dead_letter_topic is None

    def test_every_problem_is_reported_with_its_path(self) -> None:
        """Unknown sections, keys and bad values are all listed, each with file and key path."""
        found = problems_of(
            {
                "nope": {},
                "amps": {"bogus": 1, "heartbeat_s": "ten"},
                "processor": {"carrier": "pigeon"},
            }
        )
        assert len(found) == 4
        assert any(p.startswith("f.yaml: nope: unknown section") for p in found)
        assert any(p.startswith("f.yaml: amps.bogus: unknown key") for p in found)
        assert "f.yaml: amps.heartbeat_s: must be an integer, got 'ten'" in found
        assert any(
            p.startswith("f.yaml: processor.carrier: must be one of header, payload, both")
            for p in found
        )

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            ({"amps": {"uri": "http://x"}}, "f.yaml: amps.uri: must be a tcp://"),
            (
                {"telemetry": {"sampler_ratio": 2}},
                "f.yaml: telemetry.sampler_ratio: must be between 0 and 1",
            ),
            (
                {"processor": {"output_topic": "internal"}},
                "f.yaml: processor.output_topic: must differ",
            ),
            ({"marker": {"listen": "8080"}}, "f.yaml: marker.listen: must be HOST:PORT"),
            (
                {"persister": {"max_batch_lines": 0}},
                "f.yaml: persister.max_batch_lines: must be at least 1",
            ),
            ({"amps": {"heartbeat_s": -1}}, "f.yaml: amps.heartbeat_s: must not be negative"),
            ({"logging": {"level": "loud"}}, "f.yaml: logging.level: must be one of"),
            (
                {"amps": {"password_file": "/run/credentials/pw"}},
                "f.yaml: amps.password_file: is set but amps.user is not",
            ),
        ],
    )
    def test_bad_values_are_rejected(self, data: dict[str, object], expected: str) -> None:
        """Each invalid value is named with its key path."""
        assert any(p.startswith(expected) for p in problems_of(data)), problems_of(data)

    def test_section_must_be_a_mapping(self) -> None:
        """A section given as a scalar is a clear error, not a crash."""
        assert problems_of({"amps": 3}) == ["f.yaml: amps: must be a mapping, got int 3"]

    def test_booleans_are_not_integers(self) -> None:
        """YAML `yes` is not accepted where a number is expected."""
        assert problems_of({"amps": {"heartbeat_s": True}}) == [
            "f.yaml: amps.heartbeat_s: must be an integer, got bool True"
        ]


class TestLoadConfig:
    def test_missing_required_file(self, tmp_path: Path) -> None:
        """An explicitly named file that does not exist is an error."""
        with pytest.raises(ConfigError, match="no such file"):
            load_config(tmp_path / "absent.yaml")

    def test_missing_optional_file_gives_defaults(self, tmp_path: Path) -> None:
        """Without --config and without /etc/ampsflow, the defaults apply."""
        assert Config() == load_config(tmp_path / "absent.yaml", required=False)

    def test_invalid_yaml_names_the_line(self, tmp_path: Path) -> None:
        """A YAML syntax error reports the file and line."""
        path = tmp_path / "bad.yaml"
        path.write_text("amps:\n  uri: [unclosed\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: not valid YAML"):
            load_config(path)

    def test_round_trip_through_check_config_output(self, tmp_path: Path) -> None:
        """The effective config printed by check-config loads back to the same values."""
        original = parse_config(
            {"persister": {"path": "/tmp/x.jsonl"}, "amps": {"uris": ["tcp://h:1/amps/json"]}}
        )
        path = tmp_path / "effective.yaml"
        path.write_text(yaml.safe_dump(to_mapping(original)))
        assert to_mapping(original) == to_mapping(load_config(path))


class TestHostPort:
    @pytest.mark.parametrize(
        ("value", "expected"), [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9007", ("::1", 9007))]
    )
    def test_valid(self, value: str, expected: tuple[str, int]) -> None:
        """HOST:PORT and [v6]:PORT parse."""
        assert expected == parse_host_port(value)

    @pytest.mark.parametrize("value", ["8080", ":80", "host:", "host:99999", "host:x"])
    def test_invalid(self, value: str) -> None:
        """Anything else is a ValueError naming the value."""
        with pytest.raises(ValueError, match="must be HOST:PORT"):
            parse_host_port(value)


class TestReloadDiff:
    def test_unchanged_config_has_no_changed_keys(self) -> None:
        """Comparing a config with itself finds nothing."""
        config = parse_config({"logging": {"level": "debug"}})
        assert [] == changed_keys(config, config, ["logging", "processor"])

    def test_changed_keys_are_dotted_paths_of_the_given_sections(self) -> None:
        """Only keys of the listed sections are reported, as section.key."""
        old = parse_config({})
        new = parse_config({"logging": {"level": "debug"}, "marker": {"listen": "127.0.0.1:1"}})
        assert ["logging.level"] == changed_keys(old, new, ["logging", "processor"])

    def test_merge_takes_only_the_named_keys(self) -> None:
        """merge_keys copies the named keys from the new config and keeps the rest."""
        old = parse_config({})
        new = parse_config(
            {"logging": {"level": "debug"}, "processor": {"input_topic": "x"}}, source="new.yaml"
        )
        merged = merge_keys(old, new, ["logging.level"])
        assert ("debug", "internal", "new.yaml") == (
            merged.logging.level,
            merged.processor.input_topic,
            merged.source,
        )

    @given(old=config_mappings(), new=config_mappings())
    def test_merging_every_changed_key_gives_the_new_config(
        self, old: dict[str, Any], new: dict[str, Any]
    ) -> None:
        """Applying every changed key of every section turns the old config into the new one."""
        before = parse_config(old, source="f")
        after = parse_config(new, source="f")
        sections = [f.name for f in dataclasses.fields(Config) if f.name != "source"]
        changed = changed_keys(before, after, sections)
        assert (after, []) == (
            merge_keys(before, after, changed),
            changed_keys(merge_keys(before, after, changed), after, sections),
        )
