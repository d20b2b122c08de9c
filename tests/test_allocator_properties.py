"""Allocator properties over thousands of random valid snapshots (hypothesis).

Checked against brute-force oracles written from the rules (here, and the literal reference
implementation in allocator_reference.py), not against the allocator's own helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensnet_client.layout import SnapshotError, apply_edits, synthetic_layout, validate_layout
from service.core.allocator import AllocatorOptions, HistoryItem, allocate, check_layout

from .allocator_reference import reference_allocate

PROPERTY_SETTINGS = settings(
    max_examples=1500, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass
class Case:
    lod: np.ndarray
    positions: np.ndarray
    scores: np.ndarray
    options: AllocatorOptions
    history: tuple[HistoryItem, ...]


def brute_force_groups(lod: np.ndarray, positions: np.ndarray, b: int, top: int) -> list[tuple[int, int]]:
    """(start, level) of every run of B same-level entries below the top, parent-aligned."""
    return [
        (i, int(lod[i]))
        for i in range(lod.size - b + 1)
        if lod[i] < top and (lod[i : i + b] == lod[i]).all() and positions[i] % b ** (lod[i] + 1) == 0
    ]


def score_vector(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    draws = {
        "uniform": lambda: rng.uniform(-1, 1, n),
        "polar": lambda: rng.choice([-1, 1], n) * rng.uniform(0.8, 1, n),
        "ties": lambda: rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], n),
        "negative": lambda: rng.uniform(-1, 0.2, n),
        "positive": lambda: rng.uniform(-0.2, 1, n),
    }
    return draws[kind]().astype(np.float32)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    b = draw(st.sampled_from([2, 3, 4, 32]))  # 3: the non-power-of-two alignment path
    top = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, 3000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lod, positions = synthetic_layout(n, b, top, rng)
    scores = score_vector(draw(st.sampled_from(["uniform", "polar", "ties", "negative", "positive"])), n, rng)
    options = AllocatorOptions(
        block_size=b,
        max_lod=top,
        w_max=max(1, n + draw(st.integers(-n, 3 * b))),
        tau_expand=draw(st.floats(0.05, 1.0)),
        tau_collapse=draw(st.floats(0.05, 1.0)),
        max_edits=draw(st.integers(1, 64)),
        aggregation=draw(st.sampled_from(["mean", "max", "min"])),
        protect_recent=draw(st.integers(0, 2 * b * b)),
        cooldown_steps=draw(st.integers(0, 3)),
    )
    # History over real nodes: existing gists "created by a collapse", parents of complete
    # groups "expanded" — exactly the nodes whose edits hysteresis must block.
    gists = np.flatnonzero(lod >= 1)
    groups = brute_force_groups(lod, positions, b, top)
    history = []
    for _ in range(draw(st.integers(0, 6))):
        age = draw(st.integers(1, 4))
        if gists.size and draw(st.booleans()):
            i = int(rng.choice(gists))
            history.append(HistoryItem("collapse", int(lod[i]), int(positions[i]), age))
        elif groups:
            start, level = groups[int(rng.integers(len(groups)))]
            history.append(HistoryItem("expand", level + 1, int(positions[start]), age))
    return Case(lod, positions, scores, options, tuple(history))


@PROPERTY_SETTINGS
@given(cases())
def test_every_allocation_is_legal_disjoint_budgeted_and_deterministic(case: Case) -> None:
    o, lod, pos = case.options, case.lod, case.positions
    b = o.block_size
    result = allocate(validate_layout(lod, pos, b, o.max_lod), case.scores, o, case.history)

    # Applying the edits yields a valid snapshot covering the same tokens.
    new_lod, new_pos = apply_edits(lod, pos, result.edits, b)
    validate_layout(new_lod, new_pos, b, o.max_lod)
    assert new_lod.size == result.length_after
    assert new_pos[0] == pos[0] and new_pos[-1] + b ** new_lod[-1] == pos[-1] + b ** lod[-1]

    # Disjoint, at most max_edits, ordered.
    touched = [range(e.index, e.index + e.removed) for e in result.edits]
    flat = [i for r in touched for i in r]
    assert len(flat) == len(set(flat))
    assert len(result.edits) <= o.max_edits
    assert [e.index for e in result.edits] == sorted(e.index for e in result.edits)

    # Only legal actions, each for a reason the rules allow.
    end_token = int(pos[-1] + b ** lod[-1])
    groups = set(brute_force_groups(lod, pos, b, o.max_lod))
    recent = {(h.action, h.lod, h.position) for h in case.history if h.age <= o.cooldown_steps}
    expand_scores = [e.score for e in result.edits if e.action == "expand"]
    for e in result.edits:
        if e.action == "expand":
            assert lod[e.index] >= 1 and e.score >= o.tau_expand
            assert ("collapse", int(lod[e.index]), int(pos[e.index])) not in recent
        else:
            assert (e.index, int(lod[e.index])) in groups
            assert e.position + e.span_tokens <= end_token - o.protect_recent
            assert ("expand", e.lod_after, e.position) not in recent
            assert {
                "threshold": e.score <= -o.tau_collapse,
                "budget": lod.size > o.w_max,
                "make_room": any(s > e.score for s in expand_scores),
            }[e.cause]

    # Budget: met whenever enough legal collapses existed and max_edits allowed them.
    legal = [
        (i, level)
        for i, level in groups
        if int(pos[i]) + b ** (level + 1) <= end_token - o.protect_recent
        and ("expand", level + 1, int(pos[i])) not in recent
    ]
    need = max(0, -(-(lod.size - o.w_max) // (b - 1)))
    if len(legal) >= need and o.max_edits >= need:
        assert result.budget_met and result.length_after <= o.w_max
    if lod.size <= o.w_max:
        assert result.length_after <= o.w_max

    # Every candidate is either taken or counted under exactly one rejection reason.
    c = result.counters
    assert c.candidates_expand == int((lod >= 1).sum()) and c.candidates_collapse == len(groups)
    assert c.candidates_expand + c.candidates_collapse == len(result.edits) + sum(c.rejected.values())

    # Deterministic: same input (copies), same output.
    again = allocate(validate_layout(lod.copy(), pos.copy(), b, o.max_lod), case.scores.copy(), o, case.history)
    assert again.edits == result.edits and again.counters == result.counters


@PROPERTY_SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_a_clamp_never_flips_a_legal_decision(case: Case, seed: int) -> None:
    """Illegal requests (LOD0 > 0, LOD max < 0) carry no weight: clamping them up front, or
    changing their magnitude, leaves every decision unchanged."""
    o, lod = case.options, case.lod
    layout = validate_layout(lod, case.positions, o.block_size, o.max_lod)
    result = allocate(layout, case.scores, o, case.history)
    assert np.all(result.scores * case.scores >= 0)  # the clamp moves toward 0, never across
    assert np.all(np.abs(result.scores) <= np.abs(case.scores))
    up, down = (lod == 0) & (case.scores > 0), (lod == o.max_lod) & (case.scores < 0)
    assert (result.counters.clamped_expand, result.counters.clamped_collapse) == (int(up.sum()), int(down.sum()))

    pre_clamped = np.where(up | down, 0, case.scores).astype(np.float32)
    rng = np.random.default_rng(seed)
    other = case.scores.copy()
    other[up] = rng.uniform(1e-3, 1, int(up.sum()))
    other[down] = -rng.uniform(1e-3, 1, int(down.sum()))
    for variant in (pre_clamped, other):
        alt = allocate(layout, variant, o, case.history)
        assert alt.edits == result.edits and alt.length_after == result.length_after
        assert alt.counters.rejected == result.counters.rejected


@PROPERTY_SETTINGS
@given(cases())
def test_every_decision_and_counter_equals_the_literal_reference(case: Case) -> None:
    """Same edits (action, index, cause, score), length, rejection reasons and budget note as the
    rules written out as plain loops and full sorts (tests/allocator_reference.py)."""
    o = case.options
    result = allocate(validate_layout(case.lod, case.positions, o.block_size, o.max_lod), case.scores, o, case.history)
    expected = reference_allocate(case.lod, case.positions, case.scores, o, case.history)
    assert [(e.action, e.index, e.cause, e.score) for e in result.edits] == expected["edits"]
    assert result.length_after == expected["length_after"]
    c = result.counters
    assert c.rejected == expected["rejected"]
    assert (c.candidates_expand, c.candidates_collapse) == expected["candidates"]
    assert (c.clamped_expand, c.clamped_collapse) == expected["clamped"]
    assert (result.budget_note is not None) == expected["budget_short_after_budget_step"]
    if result.budget_note:
        assert f"{expected['need']} collapses needed" in result.budget_note
        assert (f"{expected['legal']} legal" in result.budget_note) == (expected["legal"] < expected["need"])


@st.composite
def damaged_layouts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Valid snapshots, sometimes with one entry's level or position broken (every layout rule)."""
    b = draw(st.sampled_from([2, 3, 4, 32]))
    top = draw(st.sampled_from([1, 2, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lod, positions = synthetic_layout(draw(st.integers(1, 600)), b, top, rng)
    i = int(rng.integers(lod.size))
    damage = draw(st.sampled_from(["none", "lod", "position", "negative", "huge", "swap"]))
    if damage == "lod":
        lod[i] = draw(st.integers(-2, top + 2))
    elif damage == "position":
        positions[i] += draw(st.integers(-3 * b, 3 * b))
    elif damage == "negative":
        positions[i] = -draw(st.integers(1, 10))
    elif damage == "huge":
        positions[i] = 2**48 + draw(st.integers(-2, 2))
    elif damage == "swap" and lod.size > 1:
        j = int(rng.integers(lod.size))
        positions[[i, j]] = positions[[j, i]]
    return lod, positions, b, top


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(damaged_layouts())
def test_the_c_layout_check_agrees_with_validate_layout(case: tuple[np.ndarray, np.ndarray, int, int]) -> None:
    """check_layout (C) accepts exactly what lensnet_client's validate_layout accepts, and refuses
    with validate_layout's own error (rule and index)."""
    lod, positions, b, top = case
    try:
        expected = validate_layout(lod, positions, b, top)
    except SnapshotError as error:
        with pytest.raises(SnapshotError) as refused:
            check_layout(lod, positions, b, top)
        assert (refused.value.rule, refused.value.index) == (error.rule, error.index)
    else:
        layout = check_layout(lod.astype(np.int32), positions, b, top)
        assert np.array_equal(layout.lod, expected.lod) and np.array_equal(layout.positions, expected.positions)
        assert layout.lod.dtype == layout.positions.dtype == np.int64
