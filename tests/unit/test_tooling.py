"""The developer tooling agrees with CI: the pre-commit hooks run CI's static checks."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def ci_static_checks() -> set[str]:
    """The commands of the "static checks" step of ``.ci/run`` (the marker's npm block aside)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index('step "static checks"') + 1
    commands: set[str] = set()
    for line in lines[start:]:
        text = line.strip()
        if text.startswith("step "):
            break
        if not text or text.startswith(("#", "if ", "fi", "(")):
            continue
        commands.add(shlex.join(shlex.split(text)))
    return commands


def pre_commit_hooks() -> set[str]:
    """The command line of every hook in ``.pre-commit-config.yaml``."""
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    entries: set[str] = set()
    for repo in config["repos"]:
        for hook in repo["hooks"]:
            argv = shlex.split(hook["entry"]) + list(hook.get("args", []))
            entries.add(shlex.join(argv))
    return entries


class TestPreCommit:
    def test_hooks_are_the_static_checks_of_ci(self) -> None:
        """Every static check CI runs is a pre-commit hook, and every hook is one of them."""
        assert ci_static_checks() == pre_commit_hooks()

    def test_hooks_check_the_whole_tree(self) -> None:
        """Hooks get no file names, so a commit is checked exactly as CI checks the tree."""
        config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
        hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
        assert all(hook.get("pass_filenames") is False for hook in hooks)
        assert all(hook.get("always_run") is True for hook in hooks)
