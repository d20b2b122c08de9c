"""The pure policy-health pieces: exact rolling correlations and the bounded decision memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from scipy import stats

from lensnet_client.layout import Edit
from service.core.correlation import PolicyCorrelation, RollingWindow, average_ranks, benefit, pearson, spearman
from service.core.decisions import CAUSES, DecisionMemory
from service.metrics import DELTA_NLL_EDGES, Metrics


def edits(*specs: tuple[str, int, float, str]) -> tuple[Edit, ...]:
    """Edits as the allocator returns them: (action, LOD acted on, driving score, cause)."""
    made = []
    for k, (action, lod, score, cause) in enumerate(specs):
        expand = action == "expand"
        made.append(Edit(action, k * 32, 1 if expand else 32, 32 if expand else 1, lod, lod - 1 if expand else lod + 1,
                         k * 1024, 32**lod, score, cause))  # fmt: skip
    return tuple(made)


# --- correlations -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.8, -0.8, 0.05])
def test_correlations_match_numpy_and_scipy(k: float) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 5000)
    y = k * x + rng.normal(0, 0.3, x.size)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.copysign(1, spearman(x, y)) == math.copysign(1, k)


def test_ranks_and_spearman_with_ties_match_scipy() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 7, 400).astype(float)  # heavy ties, as float32 block scores give
    y = np.round(x * 0.5 + rng.normal(0, 1, x.size), 1)
    np.testing.assert_array_equal(average_ranks(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_undefined_correlations_are_nan() -> None:
    assert math.isnan(pearson(np.array([0.3]), np.array([1.0])))
    assert math.isnan(pearson(np.ones(10), np.arange(10.0)))
    assert math.isnan(spearman(np.arange(10.0), np.full(10, 2.0)))


def test_count_window_keeps_the_newest_samples_in_order() -> None:
    window = RollingWindow(5)
    window.add(np.arange(3.0), -np.arange(3.0), now=0)
    window.add(np.arange(3.0, 7.0), -np.arange(3.0, 7.0), now=1)
    x, y = window.samples(now=1e9)  # no age limit
    np.testing.assert_array_equal(x, [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(y, -x)
    window.add(np.arange(10.0, 20.0), np.zeros(10), now=2)  # a batch larger than the window
    np.testing.assert_array_equal(window.samples(2)[0], [15, 16, 17, 18, 19])


def test_time_window_forgets_old_samples_and_stays_bounded() -> None:
    window = RollingWindow(4, max_age_s=10)
    window.add(np.array([1.0, 2.0]), np.zeros(2), now=0)
    window.add(np.array([3.0]), np.zeros(1), now=5)
    np.testing.assert_array_equal(window.samples(now=9)[0], [1, 2, 3])
    np.testing.assert_array_equal(window.samples(now=12)[0], [3])  # the first two are 12 s old
    assert window.samples(now=16)[0].size == 0
    window.add(np.arange(6.0), np.zeros(6), now=20)
    np.testing.assert_array_equal(window.samples(now=20)[0], [2, 3, 4, 5])  # capacity 4


def test_policy_windows_split_by_action_and_match_scipy_on_the_window() -> None:
    """y = k·x + noise fed in batches; every window's figures equal numpy/scipy on exactly its samples."""
    rng = np.random.default_rng(5)
    windows = PolicyCorrelation(count=300, seconds=50, time_capacity=10_000)
    xs, ys, expands, times = [], [], [], []
    for step in range(20):
        expand = rng.random(80) < 0.4
        x = rng.uniform(-1, 1, 80)
        delta = -np.where(expand, 1, -1) * (0.5 * x + rng.normal(0, 0.2, 80))  # benefit = 0.5 x + noise
        y = benefit(expand, delta)
        windows.add(expand, x, y, now=step * 10.0)
        for kept, value in zip((xs, ys, expands, times), (x, y, expand, np.full(80, step * 10.0)), strict=True):
            kept.append(value)
    x, y, expand, t = (np.concatenate(a) for a in (xs, ys, expands, times))
    now = 195.0
    for c in windows.compute(now):
        chosen = np.ones(x.size, bool) if c.action == "all" else expand == (c.action == "expand")
        xa, ya, ta = x[chosen], y[chosen], t[chosen]
        if c.window == "count":
            xa, ya = xa[-300:], ya[-300:]
        else:
            xa, ya = xa[ta > now - 50], ya[ta > now - 50]
        assert c.samples == xa.size > 50
        assert c.pearson == pytest.approx(stats.pearsonr(xa, ya).statistic, abs=1e-6)
        assert c.spearman == pytest.approx(stats.spearmanr(xa, ya).statistic, abs=1e-6)
        assert c.pearson > 0.5


def test_benefit_sign_per_action() -> None:
    """Expanding helped when NLL fell; collapsing lost something when NLL rose."""
    np.testing.assert_array_equal(benefit(np.array([True, False]), np.array([-0.2, 0.2])), [0.2, 0.2])


# --- the decision memory ------------------------------------------------------------------------


def test_decisions_match_each_edit_once_with_what_feedback_needs() -> None:
    memory = DecisionMemory(capacity=10, max_age_s=60, tag="abcd")
    made = edits(("expand", 2, 0.75, "threshold"), ("collapse", 0, -0.5, "budget"), ("collapse", 1, 0.25, "make_room"))
    first = memory.remember(made, now=0)
    empty = memory.remember((), now=0)
    assert first == "abcd-0" and empty == "abcd-1"
    results, matched = memory.match(
        [(first, 2), (first, 0), (first, 3), (first, -1), (empty, 0), (first, 0), ("abcd-2", 0), ("zzzz-0", 0),
         ("abcd-xyz", 0), ("", 0), ("abcd-00", 0), ("abcd- 1", 0), ("abcd-+1", 0), ("abcd-0_1", 0)], now=1,
    )  # fmt: skip
    assert results == ["matched", "matched", "bad_index", "bad_index", "bad_index", "duplicate",
                       "unknown_decision", "unknown_decision", "unknown_decision", "unknown_decision",
                       "unknown_decision", "unknown_decision", "unknown_decision", "unknown_decision"]  # fmt: skip
    np.testing.assert_array_equal(matched.item, [0, 1])
    np.testing.assert_array_equal(matched.expand, [False, True])
    np.testing.assert_array_equal(matched.lod, [1, 2])
    np.testing.assert_array_equal(matched.score, [0.25, 0.75])
    assert [CAUSES[c] for c in matched.cause] == ["make_room", "threshold"]
    assert memory.match([(first, 1)], now=2)[0] == ["matched"]


def test_decisions_are_bounded_by_count_and_age() -> None:
    memory = DecisionMemory(capacity=3, max_age_s=10, tag="7")
    ids = [memory.remember(edits(("expand", 1, 0.9, "threshold")), now=float(k)) for k in range(5)]
    assert len(memory) == 3
    assert memory.match([(i, 0) for i in ids], now=5)[0] == [
        "expired_decision", "expired_decision", "matched", "matched", "matched"
    ]  # fmt: skip
    late = memory.remember(edits(("expand", 1, 0.9, "threshold")), now=13.5)  # drops the decisions of t < 3.5
    assert len(memory) == 2 and memory.match([(ids[3], 0), (late, 0)], now=13.5)[0] == ["expired_decision", "matched"]
    assert memory.match([(late, 0)], now=30)[0] == ["expired_decision"] and len(memory) == 0


# --- metrics ------------------------------------------------------------------------------------


def test_bulk_delta_nll_observation_matches_one_by_one_observe() -> None:
    rng = np.random.default_rng(6)
    metrics = Metrics(budget_s=0.003, max_lod=2)
    memory = DecisionMemory(1000, 60)
    specs = [(("expand", int(lod), 0.6, "threshold") if lod else ("collapse", 0, -0.6, "threshold"))
             for lod in rng.integers(0, 3, 600)]  # fmt: skip
    ids = [memory.remember(edits(spec), now=0) for spec in specs]
    results, matched = memory.match([(i, 0) for i in ids], now=0)
    delta = rng.normal(0, 0.2, matched.item.size)
    metrics.observe_feedback({"matched": len(results)}, matched, delta)

    registry = CollectorRegistry()
    reference = Histogram("lensnet_feedback_delta_nll", "x", ["action", "lod"], buckets=DELTA_NLL_EDGES,
                          registry=registry)  # fmt: skip
    for value, expand, lod in zip(delta.tolist(), matched.expand.tolist(), matched.lod.tolist(), strict=True):
        reference.labels(action="expand" if expand else "collapse", lod=str(lod)).observe(value)

    def samples(text: bytes) -> dict[str, float]:
        lines = [line for line in text.decode().splitlines() if line.startswith("lensnet_feedback_delta_nll_")]
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines) if float(value)}

    assert samples(metrics.render()) == samples(generate_latest(registry))
    assert 'lensnet_feedback_items_total{result="matched"} 600.0' in metrics.render().decode()
