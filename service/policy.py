"""Policy health: decision ids on focus answers, measured ΔNLL feedback, live score↔benefit correlation.

`PolicyHealth.decide` gives an allocation its `decision_id` and remembers its edits (called by the
pipeline for every focus answer, and by anything else that answers with edits); `feedback`
matches a batch of (decision_id, edit, delta_nll) items to those edits, feeds the matched ones to
the rolling correlations and the ΔNLL histograms, and answers one result per item. The gauges
are recomputed from the windows at scrape time (and after feedback, at most every REFRESH_S, so
each worker of a multi-process server keeps its own series fresh), in `executor`: one thread, off
the event loop, at the process's own priority. Not niced: this is Python holding the GIL, and a
niced thread the scheduler leaves waiting while it holds the GIL stalls every focus request's
Python stages behind it (measured: focus p50 ×2.6 on a busy 2-core machine with the thread at nice
19). Its work is small instead: a few µs an item (`benchmarks.feedback` measures it) and a refresh
every few seconds.

A batch is handled as columns, never as per-item objects: `FeedbackBody.parse` reads the usual
JSON body straight into columns in one C pass (parsing it into Python objects, then checking
them, was the largest part of an item's cost; `benchmarks.feedback` reports the parse's own cost
per item) and the memory, windows and histograms take arrays. The GIL the focus requests' Python
stages need is held for short stretches only.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .core import _bulk
from .core.allocator import Allocation, AllocatorOptions
from .core.correlation import PolicyCorrelation, benefit
from .core.decisions import RESULTS, DecisionMemory, Result
from .metrics import Metrics
from .settings import Settings
from .traces import DecisionRecord, FeedbackRecord, TraceWriter

REFRESH_S = 5.0  # feedback recomputes the gauges at most this often (scrapes always do): 10-30 ms each
MAX_DECISION_ID = 64
_QUOTED_RESULTS = [json.dumps(result) for result in RESULTS]


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


@dataclass(frozen=True, slots=True)
class FeedbackBatch:
    """A valid /v1/feedback body as columns, one element per item."""

    decision_id: list[str]
    edit: np.ndarray  # int64 >= 0; beyond EDIT_CAP (no decision has that many edits) as EDIT_CAP
    delta_nll: np.ndarray  # float64, finite


EDIT_CAP = 1 << 62


class FeedbackBody:
    """The /v1/feedback body: its pydantic model (the schema, and the wording of every error) and
    a bulk reader of the usual body that accepts only what the model accepts."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.model = feedback_request(max_items)

    def parse(self, body: bytes) -> FeedbackBatch:
        """The batch in `body`. A body of the usual form (ASCII ids without escapes, plain numbers)
        is read in one C pass (`_bulk.feedback_columns`); anything else goes through the model,
        which words the error (raising pydantic's ValidationError) or yields the items."""
        columns = _bulk.feedback_columns(body, self.max_items, MAX_DECISION_ID)
        if columns is not None:
            ids, edits, deltas = columns
            return FeedbackBatch(ids, np.frombuffer(edits, dtype=np.int64), np.frombuffer(deltas, dtype=np.float64))
        items = self.model.model_validate_json(body).items  # type: ignore[attr-defined]
        return FeedbackBatch(
            [item.decision_id for item in items],
            _edit_column([item.edit for item in items]),
            np.array([item.delta_nll for item in items], dtype=np.float64),
        )


def _edit_column(edits: list[int]) -> np.ndarray:
    """The edit indices, capped at EDIT_CAP (no decision has that many edits: bad_index either way)."""
    try:
        return np.minimum(np.array(edits, dtype=np.int64), EDIT_CAP)
    except OverflowError:  # beyond int64
        return np.array([min(edit, EDIT_CAP) for edit in edits], dtype=np.int64)


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
        # Feedback batches and gauge refreshes run here (not niced: see the module docstring).
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lensnet-policy")

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

    def feedback(self, batch: FeedbackBatch) -> bytes:
        """Match a batch to remembered edits; matched ones feed the windows and the histograms.
        The answer, JSON: one result per item, in order, and how many of each."""
        now = time.monotonic()
        codes, matched = self.memory.match(batch.decision_id, batch.edit, now)
        delta = batch.delta_nll[matched.item]
        with self._lock:
            self.correlation.add(matched.expand, matched.score, benefit(matched.expand, delta), now)
        counts = dict(zip(RESULTS, np.bincount(codes, minlength=len(RESULTS)).tolist(), strict=True))
        self.metrics.observe_feedback(counts, matched, delta)
        if self.tracer is not None and matched.traced.any():
            wall = time.time()
            for k in matched.item[matched.traced].tolist():
                record = FeedbackRecord(batch.decision_id[k], wall, int(batch.edit[k]), float(batch.delta_nll[k]))
                self.tracer.offer(record)
        if now - self._refreshed >= REFRESH_S:
            self.refresh(now)
        results = ",".join(map(_QUOTED_RESULTS.__getitem__, codes.tolist()))
        return f'{{"results":[{results}],"counts":{json.dumps(counts, separators=(",", ":"))}}}'.encode()

    def refresh(self, now: float | None = None) -> None:
        """Recompute the correlation gauges from the windows (exact, over what they hold now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            correlations = self.correlation.compute(now)
        self._refreshed = now
        self.metrics.set_correlations(correlations, len(self.memory))
