"""Prometheus telemetry: what the model does (scores, edits, clamps) and how the service does.

All metrics live in one registry per app. With several worker processes, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) aggregates them at scrape time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from service.core import _bulk
from service.core.allocator import DEFAULT_TAU_COLLAPSE, DEFAULT_TAU_EXPAND, REJECT_REASONS, Allocation

__all__ = ["CONTENT_TYPE", "Metrics"]

SESSION_CREATE, SESSION_STEP, SESSION = "/v1/sessions", "/v1/sessions/{id}/focus", "/v1/sessions/{id}"
ENDPOINTS = (
    "/v1/focus", "/v1/score", SESSION_CREATE, SESSION_STEP, SESSION, "/v1/model", "/healthz", "/readyz", "/metrics",
    "/docs", "other",
)  # fmt: skip
SCORED = ("/v1/focus", "/v1/score", SESSION_CREATE, SESSION_STEP)
STAGES = ("admit", "receive", "queue", "decode", "apply", "model", "allocate", "telemetry", "encode")
EVICTION_REASONS = ("count", "memory", "ttl")
RESYNC_REASONS = ("not_found", "version")
# Sub-millisecond resolution, with the budget edge added by Metrics (3 ms by default).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SCORE_EDGES = (-1.0, -0.9, -0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
WC_SIZE_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
disable_created_metrics()  # the *_created series only add noise to every scrape


def score_buckets() -> tuple[float, ...]:
    """Edges over [-1, 1] including the default thresholds ±tau, so threshold crossings are exact."""
    return tuple(sorted({*SCORE_EDGES, -DEFAULT_TAU_COLLAPSE, DEFAULT_TAU_EXPAND}))


class Metrics:
    def __init__(self, budget_s: float, max_lod: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.budget_s = budget_s
        self.score_edges = np.asarray(score_buckets(), dtype=np.float64)
        self.max_lod = max_lod
        latency = tuple(sorted({*LATENCY_BUCKETS, budget_s}))
        r = self.registry
        self.requests = Histogram(
            "lensnet_request_duration_seconds", "Server-side request latency, arrival to response.",
            ["endpoint", "status"], buckets=latency, registry=r,
        )  # fmt: skip
        self.over_budget = Counter(
            "lensnet_requests_over_budget_total", "Requests slower than the latency budget.", ["endpoint"], registry=r
        )
        self.stages = Histogram(
            "lensnet_stage_duration_seconds", "Time per request stage.", ["stage"], buckets=latency, registry=r
        )
        self.scores = Histogram(
            "lensnet_entry_score", "LensNet scores (before the legality clamp) per WC entry.", ["lod"],
            buckets=tuple(self.score_edges), registry=r,
        )  # fmt: skip
        self.edits = Counter(
            "lensnet_edits_total", "Edits returned, by action, cause and the LOD they act on.",
            ["action", "cause", "lod"], registry=r,
        )  # fmt: skip
        self.clamps = Counter(
            "lensnet_clamps_total", "Scores clamped because they asked for an illegal action.", ["action"], registry=r
        )
        self.rejections = Counter(
            "lensnet_allocator_rejections_total", "Candidate edits not taken, by reason.", ["reason"], registry=r
        )
        self.budget_unmet = Counter(
            "lensnet_budget_unmet_total", "Focus steps whose WC stayed over w_max (no legal collapse left).", registry=r
        )
        self.refused = Counter(
            "lensnet_requests_refused_total",
            "Requests refused before scoring: overload (429), not_ready/shutting_down (503), deadline (504), "
            "too_large (413).",
            ["reason"],
            registry=r,
        )
        self.wc_size = Histogram(
            "lensnet_working_context_entries", "WC length N per scored request.", buckets=WC_SIZE_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "lensnet_in_flight_requests", "/v1 requests being served.", registry=r, multiprocess_mode="livesum"
        )
        self.queued = Gauge(
            "lensnet_queued_requests",
            "Requests waiting for an inference slot.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "lensnet_model_info", "The loaded model (value 1).", ["name", "version", "precision", "provider", "sha256"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_ready = Gauge(
            "lensnet_model_ready", "1 when the model is loaded, verified and warmed up.", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip
        self.model_errors = Counter(
            "lensnet_model_errors_total", "Inferences that failed or produced non-finite scores.", registry=r
        )
        self.sessions_active = Gauge(
            "lensnet_sessions_active", "Focus sessions held.", registry=r, multiprocess_mode="livesum"
        )
        self.session_bytes = Gauge(
            "lensnet_session_bytes", "Bytes of session state held (embeddings in the graph's dtype, metadata).",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.session_evictions = Counter(
            "lensnet_session_evictions_total", "Sessions dropped by a bound: count, memory or ttl (idle).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.session_creates = Counter("lensnet_sessions_created_total", "Focus sessions created.", registry=r)
        self.session_steps = Counter("lensnet_session_steps_total", "Session steps answered.", registry=r)
        self.session_resyncs = Counter(
            "lensnet_session_resyncs_total",
            "Session calls the client must recover from with a full upload: not_found (404: unknown, evicted, "
            "another process) or version (409).",
            ["reason"],
            registry=r,
        )
        for reason in EVICTION_REASONS:
            self.session_evictions.labels(reason=reason)
        for reason in RESYNC_REASONS:
            self.session_resyncs.labels(reason=reason)
        for reason in ("overload", "not_ready", "shutting_down", "deadline", "too_large"):
            self.refused.labels(reason=reason)
        # Children resolved once: `labels()` costs microseconds a call on the request path.
        self._score_by_lod = [self.scores.labels(lod=str(level)) for level in range(max_lod + 1)]
        self._stage = {stage: self.stages.labels(stage=stage) for stage in STAGES}
        self._rejected = {reason: self.rejections.labels(reason=reason) for reason in REJECT_REASONS}
        self._clamped = {action: self.clamps.labels(action=action) for action in ("expand", "collapse")}
        self._edits: dict[tuple[str, str, int], Any] = {}
        self._requests: dict[tuple[str, int], Any] = {}
        self._over_budget = {endpoint: self.over_budget.labels(endpoint=endpoint) for endpoint in SCORED}
        self.model_ready.set(0)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        child = self._requests.get((endpoint, status))
        if child is None:
            child = self._requests[endpoint, status] = self.requests.labels(endpoint=endpoint, status=str(status))
        child.observe(seconds)
        if seconds > self.budget_s and endpoint in SCORED:
            self._over_budget[endpoint].inc()

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            self._stage[stage].observe(seconds)

    def observe_scores(self, scores: np.ndarray, lod: np.ndarray) -> None:
        """Bulk-observe N scores: one C pass counts them per LOD and bucket.

        prometheus-client stores per-bucket (non-cumulative) counts per child; we add to those
        directly (N `observe` calls would take milliseconds). It exports no `_sum` for
        histograms with negative buckets, so none is kept. tests/test_metrics.py pins this
        against the one-by-one `observe`.
        """
        width = self.score_edges.size + 1
        counts = np.zeros((self.max_lod + 1) * width, dtype=np.int64)
        _bulk.bucket_counts(scores, lod, self.score_edges, counts)
        self.wc_size.observe(scores.size)
        slots = np.flatnonzero(counts)
        for slot, count in zip(slots.tolist(), counts[slots].tolist(), strict=True):
            self._score_by_lod[slot // width]._buckets[slot % width].inc(count)

    def observe_allocation(self, allocation: Allocation) -> None:
        for edit in allocation.edits:
            key = (edit.action, edit.cause, edit.lod_before)
            child = self._edits.get(key)
            if child is None:
                child = self._edits[key] = self.edits.labels(action=key[0], cause=key[1], lod=str(key[2]))
            child.inc()
        c = allocation.counters
        if c.clamped_expand:
            self._clamped["expand"].inc(c.clamped_expand)
        if c.clamped_collapse:
            self._clamped["collapse"].inc(c.clamped_collapse)
        for reason, count in c.rejected.items():
            if count:
                self._rejected[reason].inc(count)
        if not allocation.budget_met:
            self.budget_unmet.inc()

    def observe_sessions(self, active: int, held_bytes: int) -> None:
        self.sessions_active.set(active)
        self.session_bytes.set(held_bytes)

    def set_model(self, name: str, version: str, precision: str, provider: str, sha256: str) -> None:
        self.model_info.labels(name=name, version=version, precision=precision, provider=provider, sha256=sha256).set(1)

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
