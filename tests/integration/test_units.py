"""The shipped systemd units, default config, logrotate file and ``setup-system``.

Runs the real tools: ``systemd-analyze`` (verify, offline security), ``logrotate -d``,
``systemd-sysusers --root``; none of them needs a running systemd.
"""

from __future__ import annotations

import dataclasses
import getpass
import grp
import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import typing
from pathlib import Path

import pytest
import yaml

from ampsflow import cli
from ampsflow.config import Config, load_config
from ampsflow.services import setup_system

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "systemd"
SERVICES = sorted(p.name for p in UNIT_DIR.glob("*.service"))
UNITS = [*SERVICES, "ampsflow.target"]
DEFAULT_CONFIG = REPO / "etc" / "ampsflow" / "ampsflow.yaml"
LOGROTATE = REPO / "etc" / "logrotate.d" / "ampsflow"
MAX_EXPOSURE = 2.0
AMPS_CLIENT_UNITS = (
    "ampsflow-processor.service",
    "ampsflow-processor@.service",
    "ampsflow-persister.service",
)

# The repository files are the source; ampsflow/data ships identical copies.
DATA_COPIES = [
    *((UNIT_DIR / u, REPO / "ampsflow" / "data" / "systemd" / u) for u in UNITS),
    (DEFAULT_CONFIG, REPO / "ampsflow" / "data" / "ampsflow.yaml"),
    (LOGROTATE, REPO / "ampsflow" / "data" / "logrotate"),
]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install systemd logrotate)")
    return path


def _directives(unit: str) -> dict[str, list[str]]:
    """``Key`` -> every value assigned in the unit (comments and sections ignored)."""
    found: dict[str, list[str]] = {}
    for line in (UNIT_DIR / unit).read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at stand-in executables that exist.

    ``systemd-analyze verify`` rejects a unit whose binary is missing; the Debian venv
    does not exist here, so only the path changes (as ``setup-system`` does).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in setup_system.COMMANDS:
        stand_in = bin_dir / command
        stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        stand_in.chmod(0o755)
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text(encoding="utf-8")
        (tmp_path / unit).write_text(setup_system.render_unit(text, str(bin_dir)), "utf-8")
    return tmp_path


class TestUnits:
    """systemd/*.service and ampsflow.target."""

    def test_units_exist(self) -> None:
        """The four services, the processor instance template and the target are shipped."""
        expected = sorted(
            [f"{c}.service" for c in setup_system.COMMANDS] + ["ampsflow-processor@.service"]
        )
        assert expected == SERVICES
        assert sorted(UNITS) == sorted(setup_system.UNITS)

    @pytest.mark.parametrize("unit", UNITS)
    def test_unit_passes_verify(self, unit: str, runnable_units: Path) -> None:
        """``systemd-analyze verify`` accepts the unit without a warning."""
        analyze = _tool("systemd-analyze")
        result = subprocess.run(
            [analyze, "verify", str(runnable_units / unit)],
            capture_output=True,
            text=True,
            check=False,
            cwd=runnable_units,
        )
        expected = (0, "")
        assert expected == (result.returncode, result.stderr)

    @pytest.mark.parametrize("unit", SERVICES)
    def test_service_exposure_is_ok(self, unit: str) -> None:
        """``systemd-analyze security --offline`` rates the service 2.0 or lower."""
        analyze = _tool("systemd-analyze")
        result = subprocess.run(
            [
                analyze,
                "security",
                "--offline=true",
                f"--threshold={int(MAX_EXPOSURE * 10)}",
                str(UNIT_DIR / unit),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert match is not None, result.stdout + result.stderr
        exposure = float(match.group(1))
        expected = (0, True)
        assert expected == (result.returncode, exposure <= MAX_EXPOSURE), f"exposure {exposure}"

    @pytest.mark.parametrize("unit", SERVICES)
    def test_service_has_the_lifecycle_settings(self, unit: str) -> None:
        """Each service is Type=notify with watchdog, reload by HUP and no restart on 78."""
        found = _directives(unit)
        expected = {
            "Type": ["notify"],
            "NotifyAccess": ["main"],
            "Restart": ["on-failure"],
            "RestartPreventExitStatus": ["78"],
            "ExecReload": ["/bin/kill -HUP $MAINPID"],
            "User": ["ampsflow"],
            "PartOf": ["ampsflow.target"],
            "WantedBy": ["ampsflow.target"],
            "ConfigurationDirectory": ["ampsflow"],
            "LogsDirectory": ["ampsflow"],
        }
        assert expected == {key: found.get(key) for key in expected}
        assert "WatchdogSec" in found
        assert "RestartSec" in found
        assert found["StateDirectory"][0].split()[0] == "ampsflow"

    @pytest.mark.parametrize("unit", SERVICES)
    def test_service_runs_this_command(self, unit: str) -> None:
        """ExecStart runs the unit's own console script from the Debian venv."""
        command = unit.removesuffix(".service").removesuffix("@")
        instance = " --instance %i" if unit.endswith("@.service") else ""
        expected = [
            f"{setup_system.PACKAGED_BIN_DIR}/{command} --config /etc/ampsflow/ampsflow.yaml"
            + instance
        ]
        assert expected == _directives(unit)["ExecStart"]

    def test_processor_instances_have_their_own_state_and_client_name(self) -> None:
        """The template gives instance %i the state directory processor-%i, which is where
        --instance puts its stores; the client name follows the instance too."""
        from ampsflow.config import parse_config  # noqa: PLC0415
        from ampsflow.services.processor import instance_config  # noqa: PLC0415

        found = _directives("ampsflow-processor@.service")
        assert "ampsflow/processor-%i" in found["StateDirectory"][0].split()
        config = instance_config(
            parse_config({"processor": {"input_mode": "queue"}, "amps": {"client_name": "p"}}),
            "3",
        )
        expected = ("/var/lib/ampsflow/processor-3", "p-3")
        assert expected == (config.processor.state_dir, config.amps.client_name)

    @pytest.mark.parametrize("unit", SERVICES)
    def test_every_sandboxing_directive_says_why(self, unit: str) -> None:
        """Each line of the sandboxing block is directly below a comment."""
        lines = (UNIT_DIR / unit).read_text(encoding="utf-8").splitlines()
        start = lines.index("# Sandboxing: each line removes something the daemon never needs.")
        block = lines[start : lines.index("[Install]")]
        uncommented = [
            line
            for before, line in itertools.pairwise(block)
            if line and not line.startswith("#") and not before.startswith("#")
        ]
        expected: list[str] = []
        assert expected == uncommented

    def test_daemons_start_after_the_development_broker_without_requiring_it(self) -> None:
        """Processor and persister are ordered after the devbroker but never pull it in."""
        for unit in AMPS_CLIENT_UNITS:
            found = _directives(unit)
            assert "ampsflow-devbroker.service" in found["After"][0].split()
            wanted = " ".join(found.get("Wants", []) + found.get("Requires", []))
            assert "ampsflow-devbroker" not in wanted

    def test_amps_clients_wait_for_amps_without_a_start_timeout(self) -> None:
        """Processor and persister stay activating (no timeout, no restart loop) until AMPS."""
        found = [_directives(unit)["TimeoutStartSec"] for unit in AMPS_CLIENT_UNITS]
        expected = [["infinity"]] * len(AMPS_CLIENT_UNITS)
        assert expected == found

    def test_target_wants_the_pipeline_but_not_the_development_broker(self) -> None:
        """Starting ampsflow.target starts processor, persister and marker only."""
        wants = _directives("ampsflow.target")["Wants"][0].split()
        expected = ["ampsflow-marker.service", "ampsflow-persister.service"]
        expected.append("ampsflow-processor.service")
        assert expected == sorted(wants)

    @pytest.mark.parametrize(("source", "copy"), DATA_COPIES, ids=lambda p: p.name)
    def test_package_data_is_a_copy_of_the_source(self, source: Path, copy: Path) -> None:
        """ampsflow/data ships the repository's file unchanged (cp it after editing)."""
        assert source.read_text(encoding="utf-8") == copy.read_text(encoding="utf-8")


class TestRenderUnit:
    """setup_system.render_unit."""

    def test_only_exec_start_changes(self) -> None:
        """The commands move to the given directory; every other line stays."""
        text = (UNIT_DIR / "ampsflow-processor.service").read_text(encoding="utf-8")
        rendered = setup_system.render_unit(text, "/opt/ampsflow/bin/")
        changed = [
            (a, b) for a, b in zip(text.splitlines(), rendered.splitlines(), strict=True) if a != b
        ]
        expected = [
            (
                "ExecStart=/opt/venvs/ampsflow/bin/ampsflow-processor"
                " --config /etc/ampsflow/ampsflow.yaml",
                "ExecStart=/opt/ampsflow/bin/ampsflow-processor"
                " --config /etc/ampsflow/ampsflow.yaml",
            )
        ]
        assert expected == changed


class TestDefaultConfig:
    """etc/ampsflow/ampsflow.yaml."""

    def test_loads(self) -> None:
        """The shipped file is a valid config equal to the built-in defaults."""
        loaded = load_config(DEFAULT_CONFIG)
        assert Config() == dataclasses.replace(loaded, source=Config().source)

    def test_lists_every_key(self) -> None:
        """Every key of every section of config.py appears in the file (documented)."""
        data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
        hints = typing.get_type_hints(Config)
        missing = [
            f"{section.name}.{key.name}"
            for section in dataclasses.fields(Config)
            if section.name != "source"
            for key in dataclasses.fields(hints[section.name])
            if key.name not in (data.get(section.name) or {})
        ]
        expected: list[str] = []
        assert expected == missing

    def test_every_key_has_a_comment(self) -> None:
        """Each key line is directly below a comment line."""
        lines = DEFAULT_CONFIG.read_text(encoding="utf-8").splitlines()
        uncommented = [
            line
            for before, line in itertools.pairwise(lines)
            if re.match(r"^  [a-z_]+:", line) and not before.lstrip().startswith("#")
        ]
        expected: list[str] = []
        assert expected == uncommented


class TestLogrotate:
    """etc/logrotate.d/ampsflow."""

    def test_passes_a_debug_run(self, tmp_path: Path) -> None:
        """``logrotate -d`` reads the file without an error."""
        logrotate = _tool("logrotate")
        text = LOGROTATE.read_text(encoding="utf-8")
        try:
            grp.getgrnam("ampsflow")
        except KeyError:
            # logrotate resolves `su`/`create` owners; without the service user on this
            # machine, check the same file with the current user instead.
            me, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
            text = text.replace("ampsflow ampsflow\n", f"{me} {group}\n")
        config = tmp_path / "ampsflow"
        config.write_text(text, encoding="utf-8")
        result = subprocess.run(
            [logrotate, "-d", "-s", str(tmp_path / "state"), str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        expected: tuple[int, list[str]] = (0, [])
        assert expected == (result.returncode, errors)

    def test_never_copytruncates(self) -> None:
        """Files are renamed and recreated, never copied and truncated (which loses lines)."""
        lines = [line.strip() for line in LOGROTATE.read_text(encoding="utf-8").splitlines()]
        assert ("copytruncate" in lines, lines.count("create 0640 ampsflow ampsflow")) == (
            False,
            2,
        )


def _setup(root: Path, *extra: str) -> tuple[int, list[str]]:
    """Run ``ampsflow setup-system --root root``; the exit status and printed lines."""
    result = subprocess.run(
        [sys.executable, "-m", "ampsflow", "setup-system", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stdout.splitlines()


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path below root with its mode, owner, group and content."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, content)
    return found


class TestSetupSystem:
    """``ampsflow setup-system --root`` into a temporary directory."""

    def test_dry_run_changes_nothing(self, tmp_path: Path) -> None:
        """--dry-run prints the plan and creates no file."""
        status, lines = _setup(tmp_path, "--dry-run", "--no-user")
        expected: tuple[int, list[Path], bool] = (0, [], True)
        assert expected == (
            status,
            list(tmp_path.iterdir()),
            lines[-1].startswith("dry run: 11 change(s) planned"),
        )

    def test_installs_config_units_and_logrotate(self, tmp_path: Path) -> None:
        """A first run installs the default config, the six units and the logrotate file."""
        status, _ = _setup(tmp_path, "--no-user")
        installed = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
        expected = sorted(
            [
                "etc/ampsflow/ampsflow.yaml",
                "etc/logrotate.d/ampsflow",
                *(f"etc/systemd/system/{u}" for u in UNITS),
            ]
        )
        assert (0, expected) == (status, installed)

    def test_units_point_at_this_environment(self, tmp_path: Path) -> None:
        """ExecStart runs the console scripts of the Python running setup-system."""
        _setup(tmp_path, "--no-user")
        unit = tmp_path / "etc/systemd/system/ampsflow-persister.service"
        exec_start = [
            line for line in unit.read_text(encoding="utf-8").splitlines() if "ExecStart=" in line
        ]
        scripts = sysconfig.get_path("scripts")
        expected = [f"ExecStart={scripts}/ampsflow-persister --config /etc/ampsflow/ampsflow.yaml"]
        assert expected == exec_start

    def test_second_run_changes_nothing(self, tmp_path: Path) -> None:
        """Running twice leaves every file, mode and owner as the first run made them."""
        _setup(tmp_path, "--no-user")
        before = _tree(tmp_path)
        status, lines = _setup(tmp_path, "--no-user")
        assert (0, "done: 0 change(s)", before) == (status, lines[-1], _tree(tmp_path))

    def test_never_overwrites_an_edited_config(self, tmp_path: Path) -> None:
        """An operator's config survives a later run byte for byte."""
        _setup(tmp_path, "--no-user")
        config = tmp_path / "etc/ampsflow/ampsflow.yaml"
        edited = "amps:\n  uri: tcp://amps.example:9007/amps/json\n"
        config.write_text(edited, encoding="utf-8")
        status, lines = _setup(tmp_path, "--no-user")
        kept = [line for line in lines if str(config) in line]
        assert (0, edited, 1) == (status, config.read_text(encoding="utf-8"), len(kept))
        assert "differs from the default" in kept[0]

    def test_restores_a_deleted_unit(self, tmp_path: Path) -> None:
        """A unit removed since the last run is written again, and only that one."""
        _setup(tmp_path, "--no-user")
        unit = tmp_path / "etc/systemd/system/ampsflow-marker.service"
        unit.unlink()
        status, lines = _setup(tmp_path, "--no-user")
        expected = (0, "done: 1 change(s)", True)
        assert expected == (status, lines[-1], unit.is_file())

    def test_creates_the_service_user_and_owns_the_directories(self, tmp_path: Path) -> None:
        """Without --no-user the ampsflow user is created below the root and owns its dirs."""
        _tool("systemd-sysusers")
        if os.geteuid() != 0:
            pytest.skip("creating a user and chowning needs root")
        status, _ = _setup(tmp_path)
        passwd = (tmp_path / "etc/passwd").read_text(encoding="utf-8")
        entry = next(line for line in passwd.splitlines() if line.startswith("ampsflow:"))
        uid, gid = int(entry.split(":")[2]), int(entry.split(":")[3])
        state = (tmp_path / "var/lib/ampsflow").stat()
        config = (tmp_path / "etc/ampsflow/ampsflow.yaml").stat()
        assert (0, (uid, gid, 0o750), (0, gid, 0o640)) == (
            status,
            (state.st_uid, state.st_gid, state.st_mode & 0o7777),
            (config.st_uid, config.st_gid, config.st_mode & 0o7777),
        )

    def test_cli_reports_a_missing_tool_clearly(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without systemd-sysusers it exits 1 naming the tool and the --no-user way out."""
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        status = cli.main(["setup-system", "--root", str(tmp_path / "root")])
        err = capsys.readouterr().err
        expected = (1, True)
        assert expected == (status, "systemd-sysusers not found" in err and "--no-user" in err)
