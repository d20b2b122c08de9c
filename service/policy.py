"""Policy health: decision ids on focus answers, measured ΔNLL feedback, live score↔benefit correlation.

`PolicyHealth.decide` gives an allocation its `decision_id` and remembers its edits (called by the
pipeline for every focus answer, and by anything else that answers with edits); `feedback`
matches a batch of (decision_id, edit, delta_nll) items to those edits, feeds the matched ones to
the rolling correlations and the ΔNLL histograms, and answers one result per item. The gauges
are recomputed from the windows at scrape time (and after feedback, at most once a second, so
each worker of a multi-process server keeps its own series fresh), in `executor`: one
low-priority thread, so this work takes the CPU only when the model's threads leave it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .core.allocator import Allocation, AllocatorOptions
from .core.correlation import PolicyCorrelation, benefit
from .core.decisions import RESULTS, DecisionMemory, Result
from .metrics import Metrics
from .priority import lower_priority
from .settings import Settings
from .traces import DecisionRecord, FeedbackRecord, TraceWriter

REFRESH_S = 1.0  # feedback recomputes the gauges at most this often (scrapes always do)
MAX_DECISION_ID = 64


class FeedbackItem(BaseModel):
    """The measured effect of one edit of one focus answer."""

    model_config = ConfigDict(extra="forbid", strict=True)
    decision_id: str = Field(max_length=MAX_DECISION_ID, description="the focus answer's decision_id")
    edit: int = Field(ge=0, description="index into that answer's edits")
    delta_nll: float = Field(
        allow_inf_nan=False,
        description="NLL with the edit applied minus without it, on the tokens the stack evaluated",
    )


def feedback_request(max_items: int) -> type[BaseModel]:
    """The /v1/feedback body, with its batch size bound from the settings."""

    class FeedbackRequest(BaseModel):
        """A batch of measured ΔNLLs, each naming the edit it measured."""

        model_config = ConfigDict(extra="forbid", strict=True)
        items: list[FeedbackItem] = Field(min_length=1, max_length=max_items)

    return FeedbackRequest


class FeedbackResponse(BaseModel):
    """One result per item, in order, and how many of each."""

    results: list[Result]
    counts: dict[Result, int]


class PolicyHealth:
    """The decision memory and the correlation windows of one process, reported into `metrics`."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.memory = DecisionMemory(settings.decision_memory_size, settings.decision_memory_s)
        self.correlation = PolicyCorrelation(
            settings.correlation_window_count, settings.correlation_window_s, settings.correlation_window_max_samples
        )
        self._lock = threading.Lock()  # windows: fed by feedback, read by scrapes
        self._refreshed = 0.0
        self.trace_rate, self.trace_embeddings = settings.trace_sample_rate, settings.trace_embeddings
        self.tracer: TraceWriter | None = None  # set once the model (its sha256) is known
        # Feedback batches and gauge refreshes run here, yielding the CPU to the model's threads.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lensnet-policy", initializer=lower_priority)

    def decide(
        self,
        allocation: Allocation,
        lod: np.ndarray,
        positions: np.ndarray,
        scores: np.ndarray,
        options: AllocatorOptions,
        embeddings: np.ndarray | None = None,
    ) -> str:
        """Remember an allocation's edits for feedback, trace a sampled share; its decision_id."""
        traced = self.tracer is not None and random.random() < self.trace_rate
        decision_id = self.memory.remember(allocation.edits, time.monotonic(), traced)
        if traced and self.tracer is not None:
            # A copy: the live buffers (a session's rows) may change once the answer is out.
            kept = embeddings.copy() if self.trace_embeddings and embeddings is not None else None
            self.tracer.offer(
                DecisionRecord(decision_id, time.time(), lod, positions, scores, allocation, options, kept)
            )
        return decision_id

    def feedback(self, items: list[FeedbackItem]) -> dict[str, Any]:
        """Match a batch to remembered edits; matched ones feed the windows and the histograms."""
        now = time.monotonic()
        results, matched = self.memory.match([(item.decision_id, item.edit) for item in items], now)
        delta = np.array([items[k].delta_nll for k in matched.item.tolist()], dtype=np.float64)
        with self._lock:
            self.correlation.add(matched.expand, matched.score, benefit(matched.expand, delta), now)
        counts = Counter(results)
        self.metrics.observe_feedback(counts, matched, delta)
        if self.tracer is not None and matched.traced.any():
            wall = time.time()
            for k in matched.item[matched.traced].tolist():
                item = items[k]
                self.tracer.offer(FeedbackRecord(item.decision_id, wall, item.edit, item.delta_nll))
        if now - self._refreshed >= REFRESH_S:
            self.refresh(now)
        return {"results": results, "counts": {result: counts[result] for result in RESULTS}}

    def refresh(self, now: float | None = None) -> None:
        """Recompute the correlation gauges from the windows (exact, over what they hold now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            correlations = self.correlation.compute(now)
        self._refreshed = now
        self.metrics.set_correlations(correlations, len(self.memory))
