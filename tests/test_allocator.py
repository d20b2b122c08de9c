"""Hand-built allocator cases, one per rule; expectations are written out from the rules.

All cases use B = 4, max LOD = 2 (spans 1, 4, 16 tokens) unless they say otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

from lensnet_client.layout import Edit, SnapshotError, apply_edits, validate_layout
from service.core.allocator import AllocatorOptions, HistoryItem, OptionsError, allocate

B, L = 4, 2


def wc(*lods: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A contiguous snapshot with these levels, starting at token `start`."""
    lod = np.array(lods, dtype=np.int64)
    spans = B**lod
    return lod, start + np.concatenate([[0], np.cumsum(spans)[:-1]])


def opts(**fields: object) -> AllocatorOptions:
    return AllocatorOptions(**{"block_size": B, "max_lod": L, "w_max": 1000, **fields})  # type: ignore[arg-type]


def run(lods: tuple[int, ...], scores: list[float], start: int = 0, history: tuple = (), **fields: object):
    lod, pos = wc(*lods, start=start)
    return allocate(validate_layout(lod, pos, B, L), np.array(scores, dtype=np.float32), opts(**fields), history)


def expand(i: int, level: int, position: int, score: float, cause: str = "threshold") -> Edit:
    return Edit("expand", i, 1, B, level, level - 1, position, B**level, pytest.approx(score), cause)


def collapse(i: int, level: int, position: int, score: float, cause: str) -> Edit:
    return Edit("collapse", i, B, 1, level, level + 1, position, B ** (level + 1), pytest.approx(score), cause)


def test_legality_clamp() -> None:
    # LOD2 @0 | LOD1 @16,20,24,28 (a group) | LOD0 @32..35 (a group) | LOD0 @36,37 (partial)
    lods = (2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    scores = [-0.8, 0.1, 0.1, 0.1, 0.1, 0.9, -0.2, 0.6, -0.1, 0.7, 0.3]
    result = run(lods, scores)
    assert result.scores.tolist() == pytest.approx([0, 0.1, 0.1, 0.1, 0.1, 0, -0.2, 0, -0.1, 0, 0])
    c = result.counters
    assert (c.clamped_expand, c.clamped_collapse) == (4, 1)  # four LOD0 positives, one LOD2 negative
    assert (c.candidates_expand, c.candidates_collapse) == (5, 2)
    assert result.edits == ()  # a 0.9 on a token never expands it; -0.8 on the root never collapses
    assert c.rejected["threshold"] == 7


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [("mean", [collapse(0, 1, 0, -0.6, "threshold")]), ("max", []), ("min", [collapse(0, 1, 0, -0.9, "threshold")])],
)
def test_block_aggregation(aggregation: str, expected: list[Edit]) -> None:
    # LOD1 @0,4,8,12 → parent (2, 0); LOD0 @16..19 at -0.1 never reaches the threshold.
    scores = [-0.9, -0.9, -0.9, 0.3, -0.1, -0.1, -0.1, -0.1]
    assert list(run((1, 1, 1, 1, 0, 0, 0, 0), scores, aggregation=aggregation).edits) == expected


def test_budget_restoration_collapses_least_useful_first() -> None:
    lods, scores = (0,) * 12, [-0.1] * 4 + [-0.3] * 4 + [-0.2] * 4  # block scores -0.1, -0.3, -0.2
    one = run(lods, scores, w_max=9)
    assert list(one.edits) == [collapse(4, 0, 4, -0.3, "budget")]
    assert (one.length_after, one.budget_met, one.budget_note) == (9, True, None)
    three = run(lods, scores, w_max=5)
    assert list(three.edits) == [
        collapse(0, 0, 0, -0.1, "budget"),
        collapse(4, 0, 4, -0.3, "budget"),
        collapse(8, 0, 8, -0.2, "budget"),
    ]
    assert three.length_after == 3


def test_budget_limited_by_max_edits_is_reported() -> None:
    result = run((0,) * 12, [-0.1] * 4 + [-0.3] * 4 + [-0.2] * 4, w_max=5, max_edits=2)
    assert [e.index for e in result.edits] == [4, 8]
    assert (result.length_after, result.budget_met) == (6, False)
    assert "max_edits (2)" in result.budget_note


def test_over_budget_without_legal_collapse_is_a_result_not_an_error() -> None:
    result = run((2, 2, 2), [0.0, 0.0, 0.0], w_max=2)
    assert result.edits == () and not result.budget_met and result.length_after == 3
    assert result.budget_note == "1 collapses needed, 0 legal (0 groups protected, 0 in cooldown)"


def test_make_room_trade() -> None:
    # LOD1 @0 wants to expand (+3 entries) but the WC is full: the LOD0 group @4 makes room.
    result = run((1, 0, 0, 0, 0), [0.8, -0.1, -0.1, -0.1, -0.1], w_max=5)
    assert list(result.edits) == [expand(0, 1, 0, 0.8), collapse(1, 0, 4, -0.1, "make_room")]
    assert result.length_after == 5


@pytest.mark.parametrize(("root", "traded"), [(0.8, True), (0.7, False), (0.6, False)])
def test_make_room_only_when_the_expansion_outweighs_the_block(root: float, traded: bool) -> None:
    # LOD2 @0 (score `root`) and a LOD1 group @16 whose block score is 0.7 (each child wants to
    # expand too, but its only room would be its own group).
    result = run((2, 1, 1, 1, 1), [root, 0.7, 0.7, 0.7, 0.7], w_max=5)
    if traded:
        assert list(result.edits) == [expand(0, 2, 0, 0.8), collapse(1, 1, 16, 0.7, "make_room")]
        assert result.counters.rejected["overlap"] == 4  # the children's group is gone
    else:  # strictly outweighs: 0.7 does not beat 0.7
        assert result.edits == ()
        assert result.counters.rejected["budget"] == 5


def test_cooldown_blocks_undoing_a_recent_collapse() -> None:
    lods, scores = (1, 1, 0), [0.6, 0.9, -0.1]  # LOD1 @0, @4; LOD0 @8
    recent = (HistoryItem("collapse", 1, 4, age=1),)  # node (1, 4) was created by a collapse
    blocked = run(lods, scores, history=recent)
    assert list(blocked.edits) == [expand(0, 1, 0, 0.6)]
    assert blocked.counters.rejected["cooldown"] == 1
    old = (HistoryItem("collapse", 1, 4, age=3),)  # older than cooldown_steps = 2
    assert [e.index for e in run(lods, scores, history=old).edits] == [0, 1]
    assert [e.index for e in run(lods, scores, history=recent, cooldown_steps=0).edits] == [0, 1]


def test_cooldown_blocks_undoing_a_recent_expand() -> None:
    recent = (HistoryItem("expand", 1, 0, age=2),)  # node (1, 0) was expanded two steps ago
    result = run((0, 0, 0, 0), [-0.9] * 4, history=recent, w_max=1)
    assert result.edits == () and not result.budget_met  # not even the budget may undo it
    assert result.counters.rejected["cooldown"] == 1
    assert "1 in cooldown" in result.budget_note


def test_protected_recent_tokens_never_collapse() -> None:
    lods, scores = (0,) * 8, [-0.9] * 8  # groups @0..3 and @4..7
    assert [e.index for e in run(lods, scores, protect_recent=4).edits] == [0]
    result = run(lods, scores, protect_recent=5, w_max=2)  # token 3 is within the last 5 too
    assert result.edits == () and result.counters.rejected["protected"] == 2 and not result.budget_met


def test_budget_and_protection_beyond_any_wc_are_accepted() -> None:
    """Values past int64 (the C core's range) mean the same as "larger than any WC"."""
    lods, scores = (0,) * 8, [-0.9] * 8
    unbounded = run(lods, scores, w_max=10**30, protect_recent=10**30)
    assert unbounded.edits == () and unbounded.counters.rejected["protected"] == 2 and unbounded.budget_met
    voluntary = run(lods, scores, w_max=10**30)
    assert [e.cause for e in voluntary.edits] == ["threshold", "threshold"]


def test_partial_blocks_cannot_collapse() -> None:
    newest = run((0,) * 7, [-0.9] * 7)  # tokens 0..6: 4..6 are a partial newest block
    assert newest.counters.candidates_collapse == 1 and [e.index for e in newest.edits] == [0]
    trimmed = run((0,) * 6, [-0.9] * 6, start=2)  # tokens 2..7: 2, 3 belong to a trimmed block
    assert trimmed.counters.candidates_collapse == 1 and [e.index for e in trimmed.edits] == [2]


def test_ties_break_toward_the_lower_index() -> None:
    expansions = run((1, 1), [0.7, 0.7], w_max=5)  # room for one expansion only
    assert list(expansions.edits) == [expand(0, 1, 0, 0.7)]
    assert expansions.counters.rejected["budget"] == 1
    budget = run((0,) * 8, [-0.2] * 8, w_max=5)
    assert list(budget.edits) == [collapse(0, 0, 0, -0.2, "budget")]


def test_max_edits() -> None:
    result = run((1, 1, 1), [0.9, 0.9, 0.9], max_edits=2)
    assert [e.index for e in result.edits] == [0, 1]
    assert result.counters.rejected["max_edits"] == 1


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([-0.9, -0.9, -0.9, 0.6], [expand(3, 1, 12, 0.6)]),  # 0.6 beats the block's 0.525
        ([-1.0, -1.0, -1.0, 0.55], [collapse(0, 1, 0, -0.6125, "threshold")]),  # 0.6125 beats 0.55
    ],
)
def test_stronger_edit_wins_an_overlap(scores: list[float], expected: list[Edit]) -> None:
    result = run((1, 1, 1, 1), scores)
    assert list(result.edits) == expected
    assert result.counters.rejected["overlap"] == 1


def test_overlap_is_the_reason_even_when_edits_ran_out() -> None:
    # The expansion (0.9) beats its own group's collapse (strength 0.525) and takes the only edit;
    # the collapse is then rejected for overlapping it, not for max_edits.
    result = run((1, 1, 1, 1), [-1.0, -1.0, -1.0, 0.9], max_edits=1)
    assert list(result.edits) == [expand(3, 1, 12, 0.9)]
    assert (result.counters.rejected["overlap"], result.counters.rejected["max_edits"]) == (1, 0)


def test_edits_apply_to_a_valid_snapshot_and_are_deterministic() -> None:
    lods = (2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    scores = [0.9, 0.6, -0.2, 0.1, 0.3, -0.9, -0.8, -0.7, -0.9, -0.1, -0.2, -0.3, -0.1, -0.5]
    first, second = run(lods, scores, w_max=14), run(lods, scores, w_max=14)
    assert first.edits == second.edits and first.counters == second.counters
    lod, pos = wc(*lods)
    new_lod, new_pos = apply_edits(lod, pos, first.edits, B)
    assert new_lod.size == first.length_after <= 14
    assert new_pos[0] == 0 and new_pos[-1] + B ** new_lod[-1] == pos[-1] + 1  # same token range


@pytest.mark.parametrize(
    ("lods", "positions", "rule", "index"),
    [
        ([0, 3], [0, 1], "lod_range", 1),
        ([0, -1], [0, 1], "lod_range", 1),
        ([0, 1, 0], [3, 4, 9], "contiguity", 2),
        ([0, 1], [0, 1], "alignment", 1),
        ([1, 0], [4, 7], "contiguity", 1),  # a gap
        ([0, 0, 0], [5, 6, 6], "contiguity", 2),  # an overlap
        ([0, 0], [-1, 0], "position_range", 0),
        ([], [], "length", None),
    ],
)
def test_invalid_layouts_are_rejected(lods: list, positions: list, rule: str, index: int | None) -> None:
    with pytest.raises(SnapshotError) as info:
        validate_layout(np.array(lods, dtype=np.int64), np.array(positions, dtype=np.int64), B, L)
    assert (info.value.rule, info.value.index) == (rule, index)


@pytest.mark.parametrize(
    ("lods", "positions", "field", "rule"),
    [
        ([0, 0], [0, 1, 2], "positions", "length"),
        ([[0, 0]], [[0, 1]], "lod", "shape"),
        ([0.0, 1.0], [0, 1], "lod", "dtype"),
    ],
)
def test_malformed_metadata_is_rejected(lods: list, positions: list, field: str, rule: str) -> None:
    with pytest.raises(SnapshotError) as info:
        validate_layout(np.array(lods), np.array(positions), B, L)
    assert (info.value.field, info.value.rule) == (field, rule)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.1, np.nan], r"scores\[1\]: expected a finite value in \[-1, 1\], got nan"),
        ([np.inf, 0.1], r"scores\[0\]"),
        ([0.1, 1.5], r"scores\[1\]"),
        ([0.1], r"scores: expected shape \[2\], got \[1\]"),
        (np.array([0, 1]), "expected floats"),
    ],
)
def test_invalid_scores_are_rejected(scores: list, message: str) -> None:
    layout = validate_layout(*wc(0, 0), B, L)
    with pytest.raises(SnapshotError, match=message):
        allocate(layout, np.asarray(scores), opts())


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (HistoryItem("merge", 1, 0, 1), r"history\[0\]\.action: expected 'expand' or 'collapse'"),  # type: ignore[arg-type]
        (HistoryItem("expand", 0, 0, 1), r"history\[0\]\.lod: expected a gist level 1…2"),
        (HistoryItem("expand", 1, 6, 1), r"history\[0\]\.position: expected a multiple of 4 in \[0, 2\*\*48\)"),
        (HistoryItem("collapse", 1, 2**62, 1), r"history\[0\]\.position"),  # would wrap the int64 node key
        (HistoryItem("collapse", 1, -4, 1), r"history\[0\]\.position"),
        (HistoryItem("collapse", 1, 4, 0), r"history\[0\]\.age: expected >= 1"),
    ],
)
def test_invalid_history_is_rejected(item: HistoryItem, message: str) -> None:
    layout = validate_layout(*wc(0, 0), B, L)
    with pytest.raises(SnapshotError, match=message):
        allocate(layout, np.zeros(2), opts(), (item,))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"w_max": 0}, "w_max"),
        ({"tau_expand": 0.0}, "tau_expand"),
        ({"tau_expand": 1.5}, "tau_expand"),
        ({"tau_collapse": -0.1}, "tau_collapse"),
        ({"max_edits": 0}, "max_edits"),
        ({"max_edits": 5000}, "max_edits"),
        ({"aggregation": "median"}, "aggregation"),
        ({"protect_recent": -1}, "protect_recent"),
        ({"cooldown_steps": -1}, "cooldown_steps"),
        ({"block_size": 1}, "block_size"),
        ({"max_lod": 4}, "max_lod"),
    ],
)
def test_invalid_options_are_rejected(fields: dict, field: str) -> None:
    with pytest.raises(OptionsError) as info:
        opts(**fields)
    assert info.value.field == field


def test_layout_must_match_the_options_tree() -> None:
    layout = validate_layout(*wc(0, 0), block_size=2, max_lod=L)
    with pytest.raises(ValueError, match="layout validated for B=2"):
        allocate(layout, np.zeros(2), opts())


def test_apply_edits_refuses_stale_or_overlapping_edits() -> None:
    lod, pos = wc(1, 0, 0, 0, 0)
    stale = Edit("expand", 1, 1, B, 1, 0, 4, 4, 0.9, "threshold")  # entry 1 is LOD0, not LOD1
    with pytest.raises(ValueError, match="does not match the snapshot"):
        apply_edits(lod, pos, [stale], B)
    a = Edit("collapse", 1, B, 1, 0, 1, 4, 4, -0.9, "threshold")
    b = Edit("expand", 0, 1, B, 1, 0, 0, 4, 0.9, "threshold")
    assert apply_edits(lod, pos, [a, b], B)[0].tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="overlaps"):
        apply_edits(lod, pos, [a, Edit("collapse", 2, B, 1, 0, 1, 5, 4, -0.9, "threshold")], B)


# --- exactly on each threshold, and one float32 ulp (or one step) beyond ---------------------------

BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))  # the float32 just under 0.5


@pytest.mark.parametrize(("score", "taken"), [(0.5, True), (BELOW_HALF, False)])
def test_expand_threshold_is_inclusive(score: float, taken: bool) -> None:
    result = run((1, 0), [score, 0.0], tau_expand=0.5)
    assert list(result.edits) == ([expand(0, 1, 0, score)] if taken else [])
    assert result.counters.rejected["threshold"] == (0 if taken else 1)


@pytest.mark.parametrize(("score", "taken"), [(-0.5, True), (-BELOW_HALF, False)])
def test_collapse_threshold_is_inclusive(score: float, taken: bool) -> None:
    result = run((0, 0, 0, 0), [score] * 4, tau_collapse=0.5)  # block score (mean) = score
    assert list(result.edits) == ([collapse(0, 0, 0, score, "threshold")] if taken else [])
    assert result.counters.rejected["threshold"] == (0 if taken else 1)


@pytest.mark.parametrize(("w_max", "edits"), [(8, 0), (7, 1)])
def test_budget_collapses_only_beyond_w_max(w_max: int, edits: int) -> None:
    """Length 8 with w_max 8 is within budget: no collapse; w_max 7 needs exactly one."""
    result = run((0,) * 8, [-0.1] * 8, w_max=w_max)
    assert [e.cause for e in result.edits] == ["budget"] * edits
    assert (result.length_after, result.budget_met, result.budget_note) == (8 - 3 * edits, True, None)


@pytest.mark.parametrize(("w_max", "met"), [(5, True), (4, False)])
def test_budget_is_met_at_exactly_w_max(w_max: int, met: bool) -> None:
    """One collapse (max_edits 1) takes 8 entries to 5: met for w_max 5, not for 4."""
    result = run((0,) * 8, [-0.1] * 8, w_max=w_max, max_edits=1)
    assert (result.length_after, result.budget_met) == (5, met)
    assert (result.budget_note is None) == met


@pytest.mark.parametrize(("w_max", "taken"), [(5, True), (4, False)])
def test_an_expansion_fits_up_to_exactly_w_max(w_max: int, taken: bool) -> None:
    """A LOD1 expansion turns 2 entries into 5: taken at w_max 5, not at 4 (no group to make room)."""
    result = run((1, 1), [0.9, 0.0], w_max=w_max)
    assert [e.index for e in result.edits] == ([0] if taken else [])
    assert result.counters.rejected["budget"] == (0 if taken else 1)


@pytest.mark.parametrize(("age", "blocked"), [(2, True), (3, False)])
def test_cooldown_window_includes_its_last_step(age: int, blocked: bool) -> None:
    """cooldown_steps 2: an edit 2 steps ago is still within the window, 3 steps ago is not."""
    result = run((1, 0), [0.9, 0.0], history=(HistoryItem("collapse", 1, 0, age=age),), cooldown_steps=2)
    assert [e.index for e in result.edits] == ([] if blocked else [0])
    assert result.counters.rejected["cooldown"] == (1 if blocked else 0)


@pytest.mark.parametrize(("max_edits", "rejected"), [(3, 0), (2, 1)])
def test_max_edits_edge(max_edits: int, rejected: int) -> None:
    result = run((1, 1, 1), [0.9, 0.8, 0.7], max_edits=max_edits)
    assert [e.index for e in result.edits] == [0, 1, 2][:max_edits]
    assert result.counters.rejected["max_edits"] == rejected


ABOVE_07 = float(np.nextafter(np.float32(0.7), np.float32(1)))  # the float32 just over 0.7


@pytest.mark.parametrize(("root", "traded"), [(0.7, False), (ABOVE_07, True)])
def test_make_room_needs_a_block_strictly_below_the_expansion(root: float, traded: bool) -> None:
    """The LOD2 root's expansion against its only room, a LOD1 group of block score 0.7 (as in
    test_make_room_only_when_the_expansion_outweighs_the_block): equal, no trade; one ulp above, a trade."""
    result = run((2, 1, 1, 1, 1), [root, 0.7, 0.7, 0.7, 0.7], w_max=5)
    expected = [expand(0, 2, 0, root), collapse(1, 1, 16, 0.7, "make_room")] if traded else []
    assert list(result.edits) == expected
    assert result.scores[0] == np.float32(root)  # the strict comparison is on float32 values


@pytest.mark.parametrize(("score", "clamped"), [(0.0, 0), (float(np.nextafter(np.float32(0), np.float32(1))), 1)])
def test_clamp_counts_only_scores_beyond_zero(score: float, clamped: int) -> None:
    """A LOD0 score of exactly 0 asks for nothing; the smallest positive float32 asks to expand."""
    result = run((0, 0), [score, -score])
    assert result.counters.clamped_expand == clamped


@pytest.mark.parametrize(("score", "valid"), [(1.0, True), (float(np.nextafter(np.float32(1), np.float32(2))), False)])
def test_scores_may_reach_exactly_one(score: float, valid: bool) -> None:
    layout = validate_layout(*wc(1, 0), B, L)
    scores = np.array([score, -score], dtype=np.float32)
    if valid:
        assert [e.index for e in allocate(layout, scores, opts()).edits] == [0]
    else:
        with pytest.raises(SnapshotError, match=r"scores\[0\]"):
            allocate(layout, scores, opts())
