"""The trace sampler, whose ratio a reload can change while the service runs.

:class:`RatioSampler` behaves as ``ParentBased(TraceIdRatioBased(ratio))``: a
message whose CorrelationId carries a sampling decision (the page's) follows
it, a new trace is sampled with probability ``ratio``. Tracers keep a
reference to their provider's sampler, so the ratio is changed inside this
object rather than by installing a new sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes


class RatioSampler(Sampler):
    """``ParentBased(TraceIdRatioBased(ratio))`` with a ratio :meth:`set_ratio` changes.

    Args:
        ratio: The probability of sampling a trace that has no parent decision.
    """

    def __init__(self, ratio: float) -> None:
        self._delegate = ParentBased(TraceIdRatioBased(ratio))
        self.ratio = ratio

    def set_ratio(self, ratio: float) -> None:
        """Sample new root traces with probability ``ratio`` from now on."""
        # One reference assignment: a span being sampled concurrently sees
        # either the old or the new delegate, both complete.
        self._delegate = ParentBased(TraceIdRatioBased(ratio))
        self.ratio = ratio

    def should_sample(  # noqa: PLR0917 - the SDK's Sampler signature
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Delegate to the current ``ParentBased(TraceIdRatioBased)`` sampler."""
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """The delegate's description (``ParentBased{root:TraceIdRatioBased{0.5},...}``)."""
        description: str = self._delegate.get_description()  # type: ignore[no-untyped-call]
        return description
