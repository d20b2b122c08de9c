"""Prometheus telemetry: what the model does (scores, edits, clamps) and how the service does.

All metrics live in one registry per app. With several worker processes, prometheus-client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) aggregates them at scrape time.
"""

from __future__ import annotations

import os

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from service.core import _bulk
from service.core.agreement import Agreement
from service.core.allocator import DEFAULT_TAU_COLLAPSE, DEFAULT_TAU_EXPAND, REJECT_REASONS, Allocation
from service.core.correlation import Correlation
from service.core.decisions import RESULTS, Matched
from service.core.stages import STAGES

__all__ = ["CONTENT_TYPE", "Metrics"]

SESSION_CREATE, SESSION_STEP, SESSION = "/v1/sessions", "/v1/sessions/{id}/focus", "/v1/sessions/{id}"
# /v2/infer: Open Inference Protocol scoring, whatever the model name or version in its path.
SCORED = ("/v1/focus", "/v1/score", "/v2/infer", SESSION_CREATE, SESSION_STEP)
ENDPOINTS = (*SCORED, SESSION, "/v1/feedback", "/v1/model", "/healthz", "/readyz", "/v2/health/live",
             "/v2/health/ready", "/metrics", "/docs", "other")  # fmt: skip
# The statuses each endpoint can answer: their series exist from startup at 0, so the first
# increments count in rate()/increase() (a series born at its first increment loses them).
SCORED_STATUSES = (200, 400, 405, 406, 408, 413, 415, 422, 429, 499, 500, 503, 504)
STATUSES = {
    **dict.fromkeys(SCORED, SCORED_STATUSES),
    SESSION_CREATE: (201, *SCORED_STATUSES[1:]),
    SESSION_STEP: (*SCORED_STATUSES, 404, 409),
    SESSION: (200, 204, 404, 405, 503),
    "/v1/feedback": (200, 400, 405, 408, 413, 415, 422, 429, 499, 500),
    "/healthz": (200, 503), "/readyz": (200, 503), "/v1/model": (200,), "/metrics": (200,), "/docs": (200,),
    "/v2/health/live": (200, 400), "/v2/health/ready": (200, 400), "other": (404, 405),
}  # fmt: skip
REFUSAL_REASONS = ("overload", "not_ready", "shutting_down", "deadline", "deadline_short", "too_large", "body_timeout")
EDIT_CAUSES = {"expand": ("threshold",), "collapse": ("threshold", "budget", "make_room")}
EVICTION_REASONS = ("count", "memory", "ttl")
RESYNC_REASONS = ("not_found", "version")
PLACEMENT_OUTCOMES = ("placed", "none", "memory", "busy", "gone", "error")
# Sub-millisecond resolution, with the budget edge added by Metrics (3 ms by default).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
SCORE_EDGES = (-1.0, -0.9, -0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# ΔNLL of one edit (nats per evaluated token, summed or averaged as the stack measures it), both signs.
DELTA_NLL_EDGES = (-1.0, -0.3, -0.1, -0.03, -0.01, -0.003, 0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# Agreement of two models on one snapshot, in [-1, 1]: fine near 1, where candidates differ.
AGREEMENT_EDGES = (-0.5, 0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
WC_SIZE_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
disable_created_metrics()  # the *_created series only add noise to every scrape


def score_buckets() -> tuple[float, ...]:
    """Edges over [-1, 1] including the default thresholds ±tau, so threshold crossings are exact."""
    return tuple(sorted({*SCORE_EDGES, -DEFAULT_TAU_COLLAPSE, DEFAULT_TAU_EXPAND}))


class Metrics:
    def __init__(self, budget_s: float, max_lod: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU seconds, open fds, start time
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
            "lensnet_stage_duration_seconds", "Time per stage of answered scoring calls; the stages of a call sum "
            "to its request duration.", ["stage"], buckets=latency, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "lensnet_overhead_seconds", "Time beside the model of answered scoring calls: request duration minus "
            "the model stage.", ["endpoint"], buckets=latency, registry=r,
        )  # fmt: skip
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
            "Requests refused before scoring: overload (429), not_ready/shutting_down (503), deadline (504; "
            "deadline_short: shorter than the latency budget), too_large (413), body_timeout (408).",
            ["reason"],
            registry=r,
        )
        self.wc_size = Histogram(
            "lensnet_working_context_entries", "WC length N per scored request.", buckets=WC_SIZE_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "lensnet_in_flight_requests",
            "/v1 and v2 inference requests being served.",
            registry=r,
            multiprocess_mode="livesum",
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
        self.session_placements = Counter(
            "lensnet_session_placements_total",
            "Row placements after session answers (the rows moved for the answer's edits before the next step): "
            "placed, or skipped: none (no edits, or placed already), memory (the buffer's growth and the rows set "
            "aside do not fit the free bytes of --session-memory-bytes), busy (a step holds or awaits the "
            "session, or rarely the store undoing its placement), gone (deleted or evicted), error (a failure, "
            "logged).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.session_unplacements = Counter(
            "lensnet_session_placements_undone_total",
            "Placements undone to free their set-aside rows' bytes for a creation or step that needed room, "
            "rather than evict sessions.",
            registry=r,
        )
        self.session_placement_seconds = Histogram(
            "lensnet_session_placement_seconds", "Time of the row placements made (on an inference thread, after "
            "the answer).", buckets=latency, registry=r,
        )  # fmt: skip
        for reason in EVICTION_REASONS:
            self.session_evictions.labels(reason=reason)
        for outcome in PLACEMENT_OUTCOMES:
            self.session_placements.labels(outcome=outcome)
        for reason in RESYNC_REASONS:
            self.session_resyncs.labels(reason=reason)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)
        # Children resolved once: `labels()` costs microseconds a call on the request path.
        self._score_by_lod = [self.scores.labels(lod=str(level)) for level in range(max_lod + 1)]
        self._stage = {stage: self.stages.labels(stage=stage) for stage in STAGES}
        self._rejected = {reason: self.rejections.labels(reason=reason) for reason in REJECT_REASONS}
        self._clamped = {action: self.clamps.labels(action=action) for action in ("expand", "collapse")}
        self._edits = {
            (action, cause, level): self.edits.labels(action=action, cause=cause, lod=str(level))
            for action, causes in EDIT_CAUSES.items()
            for cause in causes
            for level in (range(1, max_lod + 1) if action == "expand" else range(max_lod))  # the level acted on
        }
        self._requests = {
            (endpoint, status): self.requests.labels(endpoint=endpoint, status=str(status))
            for endpoint, statuses in STATUSES.items()
            for status in statuses
        }
        self._over_budget = {endpoint: self.over_budget.labels(endpoint=endpoint) for endpoint in SCORED}
        self._overhead = {endpoint: self.overhead.labels(endpoint=endpoint) for endpoint in SCORED}
        self.model_ready.set(0)
        self._init_policy()
        self._init_shadow()

    def _init_shadow(self) -> None:
        """Live vs shadow model agreement (README: "Shadow scoring")."""
        r = self.registry
        self.shadow_requests = Counter(
            "lensnet_shadow_requests_total", "Sampled focus requests the shadow model scored, dropped (its slot "
            "was busy) or failed on.", ["result"], registry=r,
        )  # fmt: skip
        self.shadow_correlation = Histogram(
            "lensnet_shadow_score_correlation", "Pearson correlation of live and shadow scores, per scored request.",
            buckets=AGREEMENT_EDGES, registry=r,
        )  # fmt: skip
        self.shadow_sign_agreement = Histogram(
            "lensnet_shadow_sign_agreement", "Share of entries live and shadow scores give the same sign, per request.",
            buckets=AGREEMENT_EDGES, registry=r,
        )  # fmt: skip
        self.shadow_live_edits = Counter(
            "lensnet_shadow_live_edits_total", "Live edits of the requests the shadow scored.", registry=r
        )
        self.shadow_shared_edits = Counter(
            "lensnet_shadow_shared_edits_total", "Of those, edits the shadow's scores led to as well.", registry=r
        )
        self.shadow_model_info = Gauge(
            "lensnet_shadow_model_info", "The shadow (candidate) model (value 1).", ["name", "version", "sha256"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        for result in ("scored", "dropped", "failed"):
            self.shadow_requests.labels(result=result)

    def observe_shadow(self, agreement: Agreement) -> None:
        self.shadow_requests.labels(result="scored").inc()
        if agreement.correlation == agreement.correlation:  # NaN (a constant side) is not a correlation
            self.shadow_correlation.observe(agreement.correlation)
        self.shadow_sign_agreement.observe(agreement.sign_agreement)
        self.shadow_live_edits.inc(agreement.live_edits)
        self.shadow_shared_edits.inc(agreement.shared_edits)

    def _init_policy(self) -> None:
        """Feedback, policy-health and deployment-trace series (README: "Policy health", "Deployment traces")."""
        r = self.registry
        self.feedback_items = Counter(
            "lensnet_feedback_items_total", "Feedback items received, by result of matching them to a decision.",
            ["result"], registry=r,
        )  # fmt: skip
        self.delta_nll = Histogram(
            "lensnet_feedback_delta_nll", "Measured ΔNLL (with the edit minus without) of matched edits.",
            ["action", "lod"], buckets=DELTA_NLL_EDGES, registry=r,
        )  # fmt: skip
        self.correlation = Gauge(
            "lensnet_policy_correlation",
            "Correlation of the driving score with the detail benefit of matched edits (healthy: > 0).",
            ["action", "method", "window"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.correlation_samples = Gauge(
            "lensnet_policy_correlation_samples", "Matched feedback items in the correlation window.",
            ["action", "window"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.decisions = Gauge(
            "lensnet_decisions_remembered", "Focus decisions held for feedback.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.trace_written = Counter(
            "lensnet_trace_records_written_total", "Deployment trace records written, by kind.", ["kind"], registry=r
        )
        self.trace_dropped = Counter(
            "lensnet_trace_records_dropped_total", "Deployment trace records dropped: queue_full or write_error.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.trace_files_deleted = Counter(
            "lensnet_trace_files_deleted_total", "Trace files deleted to stay under --trace-max-bytes.", registry=r
        )
        for kind in ("decisions", "feedback"):
            self.trace_written.labels(kind=kind)
        for reason in ("queue_full", "write_error"):
            self.trace_dropped.labels(reason=reason)
        self._feedback = {result: self.feedback_items.labels(result=result) for result in RESULTS}
        self._delta_edges = np.asarray(DELTA_NLL_EDGES, dtype=np.float64)
        self._delta_by = [
            self.delta_nll.labels(action=action, lod=str(level))
            for action in ("collapse", "expand")  # row = expand (0/1) * (max_lod + 1) + lod
            for level in range(self.max_lod + 1)
        ]

    def observe_feedback(self, results: dict[str, int], matched: Matched, delta_nll: np.ndarray) -> None:
        """Count a batch's results; bulk-observe the matched edits' ΔNLL by action and LOD (one C pass)."""
        for result, count in results.items():
            if count:
                self._feedback[result].inc(count)
        width = self._delta_edges.size + 1
        counts = np.zeros(len(self._delta_by) * width, dtype=np.int64)
        groups = matched.expand.astype(np.int64) * (self.max_lod + 1) + matched.lod
        _bulk.bucket_counts(delta_nll.astype(np.float32), groups, self._delta_edges, counts)
        slots = np.flatnonzero(counts)
        for slot, count in zip(slots.tolist(), counts[slots].tolist(), strict=True):
            self._delta_by[slot // width]._buckets[slot % width].inc(count)

    def set_correlations(self, correlations: list[Correlation], remembered: int) -> None:
        """Publish the windows' correlations and sample counts, and the decisions held."""
        for c in correlations:
            self.correlation.labels(action=c.action, method="pearson", window=c.window).set(c.pearson)
            self.correlation.labels(action=c.action, method="spearman", window=c.window).set(c.spearman)
            self.correlation_samples.labels(action=c.action, window=c.window).set(c.samples)
        self.decisions.set(remembered)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        child = self._requests.get((endpoint, status))
        if child is None:
            child = self._requests[endpoint, status] = self.requests.labels(endpoint=endpoint, status=str(status))
        child.observe(seconds)
        if seconds > self.budget_s and endpoint in SCORED:
            self._over_budget[endpoint].inc()

    def observe_stages(self, timings: dict[str, float], overhead: float, endpoint: str) -> None:
        """An answered scoring call's stages and its overhead beside the model (total − model)."""
        for stage, seconds in timings.items():
            self._stage[stage].observe(seconds)
        self._overhead[endpoint].observe(overhead)

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
            ProcessCollector(registry=registry)  # prometheus-client cannot sum these: the answering worker's
            return generate_latest(registry)
        return generate_latest(self.registry)
