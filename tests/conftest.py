"""Fixtures shared by every test tier.

- ``processes``: a :class:`tests.support.processes.Processes` for the test's own
  directory; every daemon started through it is stopped at the end.
- ``phoenix``: one Arize Phoenix per session (it takes ~20 s to start), with
  the service-recording tap in front; see :mod:`tests.support.phoenix`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.phoenix import Phoenix, start_phoenix
from tests.support.processes import Processes
from tests.support.processes import processes as process_group


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Daemons for one test, all stopped (SIGTERM, then SIGKILL) at its end."""
    with process_group(tmp_path) as group:
        yield group


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    """A running Phoenix trace backend shared by the session's tests."""
    with start_phoenix(tmp_path_factory.mktemp("phoenix")) as backend:
        yield backend
