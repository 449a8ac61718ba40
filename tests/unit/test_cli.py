"""The `ampsflow` command line: config errors, check-config, console scripts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ampsflow.cli import _apply_overrides, build_parser, main
from ampsflow.config import Config
from ampsflow.errors import EX_CONFIG


class TestCheckConfig:
    def test_prints_effective_config(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config prints the effective settings, file values merged over defaults."""
        path = tmp_path / "a.yaml"
        path.write_text("persister:\n  path: /srv/out.jsonl\n")
        assert main(["check-config", "--config", str(path)]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["persister"]["path"] == "/srv/out.jsonl"
        assert printed["processor"]["input_topic"] == "internal"

    def test_bad_config_exits_78_with_every_problem(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad config exits 78 (EX_CONFIG) and lists each problem as FILE: key.path: message."""
        path = tmp_path / "bad.yaml"
        path.write_text("amps:\n  uri: nope\nprocessor:\n  colour: red\n")
        assert main(["processor", "--config", str(path)]) == EX_CONFIG
        err = capsys.readouterr().err.splitlines()
        assert f"{path}: amps.uri: must be a tcp://, tcps:// or unix:// AMPS URI, got 'nope'" in err
        assert any(line.startswith(f"{path}: processor.colour: unknown key") for line in err)

    def test_flags_override_the_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Command-line flags win over the config file."""
        args = build_parser().parse_args(
            ["devbroker", "--tcp", "127.0.0.1:1", "--data-dir", str(tmp_path)]
        )
        config = _apply_overrides(Config(), args)
        assert ("127.0.0.1:1", str(tmp_path)) == (config.devbroker.tcp, config.devbroker.data_dir)

    def test_bad_listen_flag_is_rejected(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A malformed HOST:PORT flag is a usage error, not a crash later."""
        with pytest.raises(SystemExit) as info:
            main(["marker", "--listen", "8080"])
        assert info.value.code == 2
        assert "must be HOST:PORT" in capsys.readouterr().err
