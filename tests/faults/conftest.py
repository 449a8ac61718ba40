"""Fixtures for the fault scenarios: a whole pipeline on loopback under steady load.

``pipeline`` starts a devbroker, the processor and the persister as real
subprocesses (:mod:`tests.support.processes`) for one test and stops them all at
its end. Scenario modules that assert several behaviours of one expensive run
build their own module-scoped pipeline with :func:`start_pipeline` and
:func:`tests.support.processes.processes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Pipeline, start_pipeline
from tests.support.processes import Processes


@pytest.fixture
def pipeline_factory(processes: Processes, tmp_path: Path) -> Callable[..., Pipeline]:
    """Builds the test's pipeline (once); every daemon is stopped at the test's end."""

    def build(
        *,
        otlp_endpoint: str | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        start_services: bool = True,
    ) -> Pipeline:
        return start_pipeline(
            processes,
            tmp_path,
            otlp_endpoint=otlp_endpoint,
            overrides=overrides,
            start_services=start_services,
        )

    return build


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline]) -> Pipeline:
    """Devbroker, processor and persister running, telemetry off."""
    return pipeline_factory()
