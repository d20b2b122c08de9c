"""Telemetry internals: the bulk score histogram equals prometheus-client's own observe()."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.metrics import LATENCY_BUCKETS, Metrics, score_buckets


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
