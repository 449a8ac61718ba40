"""``ampsflow setup-system``: make a pip install run like the Debian package.

Creates the ``ampsflow`` system user and group, the directories, installs the
default config (never over an existing one), writes the systemd units with
``ExecStart=`` pointing at this environment's executables, installs the
logrotate file, and runs ``systemctl daemon-reload`` when systemd is running.

Every step first looks at what is there and only changes what differs, so a
second run changes nothing. ``--dry-run`` prints the same plan without doing
it; ``--root DIR`` works below another root (an image, a test directory).

The files come from the package data in ``ampsflow/data`` (copies of the
repository's ``systemd/`` and ``etc/`` files, which the Debian package ships).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ampsflow.config import Config
from ampsflow.errors import SetupError

SERVICE_USER = "ampsflow"
SERVICE_GROUP = "ampsflow"
SERVICE_HOME = "/var/lib/ampsflow"
PACKAGED_BIN_DIR = "/opt/venvs/ampsflow/bin"
"""Where the units in ``ampsflow/data/systemd`` (the Debian package's) find the commands."""

UNITS = (
    "ampsflow-processor.service",
    "ampsflow-processor@.service",
    "ampsflow-persister.service",
    "ampsflow-marker.service",
    "ampsflow-devbroker.service",
    "ampsflow.target",
)
COMMANDS = ("ampsflow-processor", "ampsflow-persister", "ampsflow-marker", "ampsflow-devbroker")

# Directories below the root: (path, mode, owner, group).
DIRECTORIES = (
    ("etc/ampsflow", 0o750, "root", SERVICE_GROUP),
    ("var/lib/ampsflow", 0o750, SERVICE_USER, SERVICE_GROUP),
    ("var/log/ampsflow", 0o750, SERVICE_USER, SERVICE_GROUP),
)
CONFIG_PATH = "etc/ampsflow/ampsflow.yaml"
LOGROTATE_PATH = "etc/logrotate.d/ampsflow"
UNIT_DIR = "etc/systemd/system"
RELOAD_COMMAND = "/bin/kill"
"""The units' ``ExecReload=`` sends SIGHUP with it (Debian package procps)."""
# Directories that ProtectHome=yes hides from the services.
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))


@dataclass(frozen=True, slots=True)
class Step:
    """One thing setup-system does (or, with ``changes`` false, found already done)."""

    description: str
    changes: bool
    apply: Callable[[], None] | None = None


def render_unit(text: str, bin_dir: str) -> str:
    """Point a packaged unit's commands at ``bin_dir`` instead of the Debian venv.

    Pure: only the ``ExecStart=`` paths change, so the hardening stays identical.
    """
    prefix = bin_dir.rstrip("/") + "/"
    return "".join(
        line.replace(PACKAGED_BIN_DIR + "/", prefix) if line.startswith("ExecStart=") else line
        for line in text.splitlines(keepends=True)
    )


def data_file(*parts: str) -> str:
    """Text of a file shipped in ``ampsflow/data``."""
    node = resources.files("ampsflow").joinpath("data")
    for part in parts:
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def _ids(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """User and group ids by name, as seen below ``root``."""
    if root == Path("/"):
        return (
            {p.pw_name: p.pw_uid for p in pwd.getpwall()},
            {g.gr_name: g.gr_gid for g in grp.getgrall()},
        )
    users: dict[str, int] = {}
    groups: dict[str, int] = {}
    for table, name in ((users, "etc/passwd"), (groups, "etc/group")):
        try:
            text = (root / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for row in text.splitlines():
            fields = row.split(":")
            if len(fields) >= 3 and fields[2].isdigit():
                table[fields[0]] = int(fields[2])
    return users, groups


def _user_step(root: Path) -> Step:
    users, _ = _ids(root)
    if SERVICE_USER in users:
        return Step(f"user {SERVICE_USER} exists", changes=False)
    sysusers = shutil.which("systemd-sysusers")
    line = f'u {SERVICE_USER} - "ampsflow daemons" {SERVICE_HOME} /usr/sbin/nologin'
    if sysusers is None:
        raise SetupError(
            "systemd-sysusers not found: create the system user and group "
            f"{SERVICE_USER} yourself, then run again with --no-user"
        )
    command = [sysusers, f"--root={root}", "--inline", line]

    def create() -> None:
        # systemd-sysusers takes a lock in <root>/etc, which must exist.
        (root / "etc").mkdir(parents=True, exist_ok=True)
        subprocess.run(command, check=True, capture_output=True, text=True)

    return Step(
        f"create system user and group {SERVICE_USER} (home {SERVICE_HOME}, no login)",
        changes=True,
        apply=create,
    )


def _directory_steps(root: Path, *, user_planned: bool) -> Iterator[Step]:
    users, groups = _ids(root)
    for rel, mode, owner, group in DIRECTORIES:
        path = root / rel
        uid = 0 if owner == "root" else users.get(owner)
        gid = 0 if group == "root" else groups.get(group)
        known = uid is not None and gid is not None
        # Ownership is set when the user exists or an earlier step creates it.
        chown = known or user_planned
        if chown:
            wants = f"{mode:04o} {owner}:{group}"
        else:
            wants = f"{mode:04o}; {owner}:{group} unknown below {root}, owner left as is"
        if path.is_dir():
            st = path.stat()
            right_owner = not chown or (known and (st.st_uid, st.st_gid) == (uid, gid))
            if st.st_mode & 0o7777 == mode and right_owner:
                yield Step(f"directory {path} is {wants}", changes=False)
                continue
            verb = "fix"
        else:
            verb = "create"
        yield Step(
            f"{verb} directory {path} ({wants})",
            changes=True,
            apply=_make_dir(root, path, mode, (owner, group) if chown else None),
        )


def _make_dir(
    root: Path, path: Path, mode: int, owner: tuple[str, str] | None
) -> Callable[[], None]:
    def make() -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if owner is not None:
            users, groups = _ids(root)
            uid = 0 if owner[0] == "root" else users.get(owner[0])
            gid = 0 if owner[1] == "root" else groups.get(owner[1])
            if uid is None or gid is None:
                raise SetupError(f"{owner[0]}:{owner[1]} does not exist below {root}")
            os.chown(path, uid, gid)

    return make


def _write(
    root: Path, path: Path, text: str, mode: int, group: str | None = None
) -> Callable[[], None]:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(mode)
        if group is not None:
            gid = _ids(root)[1].get(group)
            if gid is not None:
                os.chown(tmp, 0, gid)
        tmp.replace(path)

    return write


def _keep_or_install(root: Path, rel: str, text: str, mode: int, group: str | None) -> Step:
    path = root / rel
    if path.exists():
        note = "" if path.read_text(encoding="utf-8") == text else " (differs from the default)"
        return Step(f"keep {path}{note}: existing files are never overwritten", changes=False)
    return Step(
        f"install {path} (mode {mode:04o})",
        changes=True,
        apply=_write(root, path, text, mode, group),
    )


def _unit_steps(root: Path, bin_dir: str) -> Iterator[Step]:
    for unit in UNITS:
        text = render_unit(data_file("systemd", unit), bin_dir)
        path = root / UNIT_DIR / unit
        if path.exists() and path.read_text(encoding="utf-8") == text:
            yield Step(f"unit {path} is up to date", changes=False)
            continue
        verb = "update" if path.exists() else "write"
        where = f" (commands in {bin_dir})" if unit.endswith(".service") else ""
        yield Step(
            f"{verb} unit {path}{where}",
            changes=True,
            apply=_write(root, path, text, 0o644),
        )


def _daemon_reload() -> None:
    subprocess.run(["systemctl", "daemon-reload"], check=True, capture_output=True, text=True)


def _is_systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def plan(root: Path, bin_dir: str, *, create_user: bool) -> list[Step]:
    """Every step for ``root``, looking at what already exists (reads only)."""
    steps: list[Step] = []
    if create_user:
        steps.append(_user_step(root))
    user_planned = any(s.changes for s in steps)
    steps.extend(_directory_steps(root, user_planned=user_planned))
    steps.append(_keep_or_install(root, CONFIG_PATH, data_file("ampsflow.yaml"), 0o640, "ampsflow"))
    units = list(_unit_steps(root, bin_dir))
    steps.extend(units)
    steps.append(_keep_or_install(root, LOGROTATE_PATH, data_file("logrotate"), 0o644, None))
    if _is_systemd_running(root) and any(s.changes for s in units):
        steps.append(Step("systemctl daemon-reload", changes=True, apply=_daemon_reload))
    return steps


def warnings_for(bin_dir: str) -> list[str]:
    """Problems that would stop the units from starting, found before writing them."""
    found = []
    missing = [c for c in COMMANDS if not os.access(Path(bin_dir) / c, os.X_OK)]
    if missing:
        found.append(f"{', '.join(missing)} not found in {bin_dir}: the units would not start")
    if not os.access(RELOAD_COMMAND, os.X_OK):
        found.append(f"{RELOAD_COMMAND} not found: `systemctl reload` would fail (install procps)")
    resolved = Path(bin_dir).resolve()
    for home in HOME_DIRS:
        if resolved.is_relative_to(home):
            found.append(
                f"{bin_dir} is below {home}, which the units hide (ProtectHome=yes) and the "
                f"{SERVICE_USER} user cannot read: install into a virtualenv such as "
                "/opt/ampsflow instead"
            )
    return found


def run(config: Config, args: argparse.Namespace) -> int:
    """Run ``ampsflow setup-system``; prints every step, returns the exit status."""
    del config  # setup-system installs files; it reads no settings
    root = Path(args.root).resolve()
    bin_dir = sysconfig.get_path("scripts")
    dry_run: bool = args.dry_run
    for warning in warnings_for(bin_dir):
        print(f"warning: {warning}", file=sys.stderr)
    try:
        steps = plan(root, bin_dir, create_user=not args.no_user)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for step in steps:
        if not step.changes:
            print(f"ok: {step.description}")
        elif dry_run:
            print(f"would {step.description}")
        else:
            print(step.description)
            assert step.apply is not None
            try:
                step.apply()
            except (OSError, subprocess.CalledProcessError, SetupError) as exc:
                detail = getattr(exc, "stderr", None) or exc
                print(f"error: {step.description}: {detail}", file=sys.stderr)
                return 1
    changed = sum(s.changes for s in steps)
    if dry_run:
        print(f"dry run: {changed} change(s) planned, nothing done")
    else:
        print(f"done: {changed} change(s)")
        if changed and root == Path("/"):
            print(
                "next: edit /etc/ampsflow/ampsflow.yaml, then "
                "`systemctl enable --now ampsflow.target` "
                "(add ampsflow-devbroker to evaluate without AMPS)"
            )
    return 0
