"""Telemetry internals: the bulk score histogram equals prometheus-client's own observe(); the
allocation and over-budget counters move by exactly what was observed."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lensnet_client.layout import validate_layout
from service.core.allocator import REJECT_REASONS, Allocation, AllocatorOptions, HistoryItem, allocate
from service.metrics import EDIT_CAUSES, LATENCY_BUCKETS, SCORED, Metrics, score_buckets


def test_bulk_score_observation_matches_one_by_one_observe() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(-1, 1, 5000), [-1.0, -0.5, 0.0, 0.5, 0.9, 1.0]]).astype(np.float32)
    lod = rng.integers(0, 3, scores.size)
    metrics = Metrics(budget_s=0.003, max_lod=2)
    metrics.observe_scores(scores, lod)

    registry = CollectorRegistry()
    reference = Histogram("lensnet_entry_score", "x", ["lod"], buckets=score_buckets(), registry=registry)
    for value, level in zip(scores.tolist(), lod.tolist(), strict=True):
        reference.labels(lod=str(level)).observe(value)

    def samples(text: bytes) -> dict[str, float]:
        lines = [line for line in text.decode().splitlines() if line.startswith("lensnet_entry_score_")]
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines)}

    ours = {k: v for k, v in samples(metrics.render()).items()}
    theirs = samples(generate_latest(registry))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert np.isclose(ours[key], value, rtol=1e-9, atol=1e-6), key


def test_buckets_resolve_sub_millisecond_latency_and_thresholds() -> None:
    assert 0.003 in LATENCY_BUCKETS and min(LATENCY_BUCKETS) < 0.001
    assert sum(edge < 0.001 for edge in LATENCY_BUCKETS) >= 3
    assert 0.0025 in Metrics(budget_s=0.0025, max_lod=2).requests._upper_bounds  # the configured budget is an edge
    assert {-1.0, -0.5, 0.5, 0.9, 1.0} <= set(score_buckets())


def test_allocation_counters_count_exactly_what_the_allocations_report() -> None:
    """Hand-built allocations (B = 4, max LOD 2) that between them produce every edit cause,
    both clamps, every rejection reason and an unmet budget: each counter moves by exactly that."""
    b, top = 4, 2

    def allocation(lods: tuple[int, ...], scores: list[float], history: tuple = (), **options: object) -> Allocation:
        lod = np.array(lods, dtype=np.int64)
        positions = np.concatenate([[0], np.cumsum(b**lod)[:-1]])
        chosen = {"w_max": 1000, **options}
        layout = validate_layout(lod, positions, b, top)
        return allocate(layout, np.array(scores, np.float32), AllocatorOptions(b, top, **chosen), history)  # type: ignore[arg-type]

    allocations = [
        allocation((0, 0, 0, 0), [-0.9] * 4),  # a threshold collapse
        allocation((1, 0, 0, 0, 0), [0.8, -0.1, -0.1, -0.1, -0.1], w_max=5),  # an expansion making room
        allocation((0,) * 8, [-0.1] * 8, w_max=5),  # a budget collapse
        allocation((2, 2, 2), [0.0] * 3, w_max=2),  # over budget, no legal collapse: unmet
        allocation((2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0), [-0.8, 0.1, 0.1, 0.1, 0.1, 0.9, -0.2, 0.6, -0.1, 0.7, 0.3]),
        allocation((0,) * 8, [-0.9] * 8, protect_recent=5),  # protected
        allocation((1, 1, 0), [0.6, 0.9, -0.1], (HistoryItem("collapse", 1, 4, age=1),)),  # cooldown
        allocation((1, 1, 1, 1), [-1.0, -1.0, -1.0, 0.9], max_edits=1),  # overlap
        allocation((1, 1), [0.7, 0.7], w_max=5),  # budget (no room)
        allocation((1, 1, 1), [0.9, 0.9, 0.9], max_edits=2),  # max_edits
    ]
    edits = Counter((e.action, e.cause, str(e.lod_before)) for a in allocations for e in a.edits)
    rejected: Counter[str] = Counter()
    for a in allocations:
        rejected.update(a.counters.rejected)
    clamped = {
        "expand": sum(a.counters.clamped_expand for a in allocations),
        "collapse": sum(a.counters.clamped_collapse for a in allocations),
    }
    unmet = sum(not a.budget_met for a in allocations)
    assert {(action, cause) for action, cause, _ in edits} == {
        ("expand", "threshold"), ("collapse", "threshold"), ("collapse", "budget"), ("collapse", "make_room")
    }  # fmt: skip
    assert all(rejected[reason] for reason in REJECT_REASONS) and all(clamped.values()) and unmet == 1

    metrics = Metrics(0.003, top)
    for a in allocations:
        metrics.observe_allocation(a)
    value = metrics.registry.get_sample_value
    for action, cause, lod in edit_series(top):
        assert value("lensnet_edits_total", {"action": action, "cause": cause, "lod": lod}) == edits[action, cause, lod]
    for reason in REJECT_REASONS:
        assert value("lensnet_allocator_rejections_total", {"reason": reason}) == rejected[reason]
    for action, count in clamped.items():
        assert value("lensnet_clamps_total", {"action": action}) == count
    assert value("lensnet_budget_unmet_total") == unmet


def edit_series(top: int) -> list[tuple[str, str, str]]:
    """Every (action, cause, lod) series the service exposes for a model of max LOD `top`."""
    return [
        (action, cause, str(level))
        for action, causes in EDIT_CAUSES.items()
        for cause in causes
        for level in (range(1, top + 1) if action == "expand" else range(top))
    ]


@pytest.mark.parametrize(("seconds", "over"), [(0.003, 0), (float(np.nextafter(0.003, 1)), 1)])
def test_over_budget_counts_requests_strictly_slower_than_the_budget(seconds: float, over: int) -> None:
    metrics = Metrics(0.003, 2)
    for endpoint in SCORED:
        metrics.observe_request(endpoint, 200, seconds)
    metrics.observe_request("/v1/model", 200, 1.0)  # not a scoring request: never counted
    value = metrics.registry.get_sample_value
    for endpoint in SCORED:
        assert value("lensnet_requests_over_budget_total", {"endpoint": endpoint}) == over
    assert value("lensnet_requests_over_budget_total", {"endpoint": "/v1/model"}) is None
