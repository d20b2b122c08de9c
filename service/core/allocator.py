"""The legality-clamped block allocator: per-entry scores → a few legal, budgeted edits.

Pure and deterministic. One focus step:

1. **Validate** the layout (`check_layout`, done by the caller: `lensnet_client.layout`'s
   rules), the scores (length, finite, in [-1, 1]) and the edit history.
2. **Clamp**: LOD0 scores to ≤ 0 (cannot expand), LOD `max_lod` scores to ≥ 0 (cannot collapse);
   both counted. Every step below uses clamped scores, so an illegal request's magnitude never
   influences a decision.
3. **Candidates**. *expand i*: every entry with `lod ≥ 1`, driven by its score `s_i`.
   *collapse g*: every complete, aligned group of `B` siblings at a level `l < max_lod` (entries
   `i … i+B-1` at `l`, `positions[i] % B**(l+1) == 0`), driven by its block score `b_g` =
   `mean`/`max`/`min` of the children's scores. A partial block cannot collapse. Groups reaching
   into the last `protect_recent` tokens are *protected*. *Hysteresis*: with `cooldown_steps > 0`,
   a node `(lod, position)` expanded within the last `cooldown_steps` steps may not be re-created
   by a collapse, and one created by a collapse may not be expanded.
4. **Budget**: while the length exceeds `w_max`, collapse the legal group with the lowest `b`
   (least useful first), whatever its score.
5. **Voluntary edits**, strongest first (expand strength `s ≥ tau_expand`, collapse strength
   `-b` for `b ≤ -tau_collapse`; ties: lower index, then collapse first). A collapse is taken unless
   it overlaps a taken edit. An expansion is taken if the length stays ≤ `w_max`; otherwise it may
   *make room*: the least useful remaining legal group not containing it is collapsed with it
   (two edits), only if its `b` is strictly below the expansion's `s`.
6. At most `max_edits` edits. Every candidate not taken is counted once, under the first reason
   that excluded it: protected, cooldown, threshold, overlap, budget, max_edits.

Edits never overlap, so applying them all (highest index first, as `apply_edits` does) yields a
valid snapshot. Over budget with no legal collapse left is a result, not an error.

Steps 2-6 run in C (`service/core/_allocator.c`): the same work as numpy code took ~100 array calls
per request, slow whenever the CPU caches are cold (as they are after every inference). This
module keeps the rules, the option and history checks, and the result types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

from lensnet_client.layout import (
    POSITION_LIMIT,
    Action,
    Edit,
    Layout,
    SnapshotError,
    node_keys,
    span_table,
    validate_layout,
)

from . import _allocator

Aggregation = Literal["mean", "max", "min"]
RejectReason = Literal["protected", "cooldown", "threshold", "overlap", "budget", "max_edits"]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
MAX_EDITS_LIMIT = 1024
DEFAULT_TAU_EXPAND = 0.5
DEFAULT_TAU_COLLAPSE = 0.5
MAX_COOLDOWN_STEPS = 1024
_NO_KEYS = np.empty(0, dtype=np.int64)


class OptionsError(ValueError):
    """An allocator option is out of range: `field`, what was `expected`, what was `got`."""

    def __init__(self, field: str, expected: str, got: object) -> None:
        super().__init__(f"{field}: expected {expected}, got {got!r}")
        self.field, self.expected, self.got = field, expected, got


@dataclass(frozen=True, slots=True)
class AllocatorOptions:
    """Per-step allocator settings. `block_size`/`max_lod` come from the model's manifest."""

    block_size: int
    max_lod: int
    w_max: int
    tau_expand: float = DEFAULT_TAU_EXPAND
    tau_collapse: float = DEFAULT_TAU_COLLAPSE
    max_edits: int = 8
    aggregation: Aggregation = "mean"
    protect_recent: int = 0
    cooldown_steps: int = 2

    def __post_init__(self) -> None:
        for name, (ok, expected) in _OPTION_RULES.items():
            if not ok(getattr(self, name)):
                raise OptionsError(name, expected, getattr(self, name))


_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "block_size": (lambda v: v >= 2, ">= 2"),
    "max_lod": (lambda v: 1 <= v <= 3, "1…3"),
    "w_max": (lambda v: v >= 1, ">= 1"),
    "tau_expand": (lambda v: 0 < v <= 1, "0 < tau_expand <= 1"),
    "tau_collapse": (lambda v: 0 < v <= 1, "0 < tau_collapse <= 1"),
    "max_edits": (lambda v: 1 <= v <= MAX_EDITS_LIMIT, f"1…{MAX_EDITS_LIMIT}"),
    "aggregation": (lambda v: v in get_args(Aggregation), " | ".join(get_args(Aggregation))),
    "protect_recent": (lambda v: v >= 0, ">= 0"),
    "cooldown_steps": (lambda v: 0 <= v <= MAX_COOLDOWN_STEPS, f"0…{MAX_COOLDOWN_STEPS}"),
}


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """An edit the caller applied in an earlier step: the node it touched and how long ago.

    `lod`/`position` identify the gist node the edit removed (expand) or created (collapse), i.e.
    `Edit.node_lod` and `Edit.position`; `age` is in focus steps (1 = the previous step).
    """

    action: Action
    lod: int
    position: int
    age: int


@dataclass(frozen=True, slots=True)
class Counters:
    candidates_expand: int
    candidates_collapse: int
    clamped_expand: int
    """LOD0 entries whose positive score (an illegal expand) was clamped to 0."""
    clamped_collapse: int
    """LOD `max_lod` entries whose negative score (an illegal collapse) was clamped to 0."""
    rejected: dict[RejectReason, int]


@dataclass(frozen=True, slots=True)
class Allocation:
    edits: tuple[Edit, ...]
    """Ordered by `index`; disjoint."""
    length_before: int
    length_after: int
    budget_met: bool
    budget_note: str | None
    """Why the length is still over `w_max`, when it is."""
    counters: Counters
    scores: np.ndarray = field(repr=False)
    """The clamped scores the decisions were made from."""


def check_layout(lod: np.ndarray, positions: np.ndarray, block_size: int, max_lod: int) -> Layout:
    """`validate_layout` with the check in C (one pass over int64 copies of the arrays, when they
    are not int64 already). `lensnet_client.layout` stays the single statement of the rules: on a
    violation, `validate_layout` finds and words it."""
    integers = lod.dtype.kind in "iu" and positions.dtype.kind in "iu"
    if integers and lod.ndim == positions.ndim == 1 and lod.size == positions.size >= 1:
        lod64 = np.ascontiguousarray(lod, dtype=np.int64)
        pos64 = np.ascontiguousarray(positions, dtype=np.int64)
        if _allocator.layout_is_valid(lod64, pos64, block_size, max_lod):
            return Layout(lod64, pos64, block_size, max_lod)
    validate_layout(lod, positions, block_size, max_lod)  # raises SnapshotError naming the rule
    raise AssertionError("check_layout: the C check refused a layout that validate_layout accepts")


class Cooldown(NamedTuple):
    """Node keys (`node_keys`, sorted, unique) that hysteresis blocks this step."""

    no_expand: np.ndarray  # created by a recent collapse
    no_collapse: np.ndarray  # recently expanded


def cooldown_keys(history: Sequence[HistoryItem], options: AllocatorOptions) -> Cooldown:
    """Validate the history and return the nodes it blocks (undoing an edit within `cooldown_steps`)."""
    if not history:
        return Cooldown(_NO_KEYS, _NO_KEYS)
    spans = span_table(options.block_size, options.max_lod).tolist()
    blocked: dict[Action, list[tuple[int, int]]] = {"expand": [], "collapse": []}
    for k, item in enumerate(history):
        problem = None
        if item.action not in ("expand", "collapse"):
            problem = ("action", "'expand' or 'collapse'", repr(item.action))
        elif not 1 <= item.lod <= options.max_lod:
            problem = ("lod", f"a gist level 1…{options.max_lod}", item.lod)
        elif not 0 <= item.position < POSITION_LIMIT or item.position % spans[item.lod]:
            problem = ("position", f"a multiple of {spans[item.lod]} in [0, 2**48)", item.position)
        elif item.age < 1:
            problem = ("age", ">= 1 (1 = the previous step)", item.age)
        if problem:
            name, expected, got = problem
            raise SnapshotError("history", f"history[{k}].{name}", expected, got, k)
        if item.age <= options.cooldown_steps:
            # Undoing an expand is a collapse, and vice versa.
            blocked["collapse" if item.action == "expand" else "expand"].append((item.lod, item.position))

    def keys(nodes: list[tuple[int, int]]) -> np.ndarray:
        if not nodes:
            return _NO_KEYS
        unique = sorted(set(node_keys([lod for lod, _ in nodes], [pos for _, pos in nodes]).tolist()))
        return np.array(unique, dtype=np.int64)  # sorted: C bisects (np.unique costs ~15 µs on a few keys)

    return Cooldown(keys(blocked["expand"]), keys(blocked["collapse"]))


_AGGREGATIONS: dict[Aggregation, int] = {"mean": 0, "max": 1, "min": 2}
_CAUSES = ("threshold", "budget", "make_room")
_UNBOUNDED = 1 << 62  # w_max / protect_recent beyond any WC (N < 2**31, positions < 2**48)


def allocate(
    layout: Layout,
    scores: object,
    options: AllocatorOptions,
    history: Sequence[HistoryItem] | Cooldown = (),
) -> Allocation:
    """Decide this step's edits (see the module docstring for the exact rules).

    `layout` comes from `check_layout` (or `validate_layout`), and `history` may be given as its `cooldown_keys`:
    parts of step 1 are split out so a caller that validated its input before scoring it does
    not pay for it twice. Scores are rounded to float32 (the model's output dtype) before the
    range check.
    """
    b, top = options.block_size, options.max_lod
    if (layout.block_size, layout.max_lod) != (b, top):
        raise ValueError(
            f"layout validated for B={layout.block_size}, max LOD {layout.max_lod}; options say B={b}, {top}"
        )
    n = layout.lod.size
    raw = np.asarray(scores)
    if raw.shape != (n,):
        raise SnapshotError("length", "scores", f"shape [{n}]", list(raw.shape))
    if raw.dtype.kind != "f":
        raise SnapshotError("dtype", "scores", "floats", f"dtype {raw.dtype}")
    no_expand, no_collapse = history if isinstance(history, Cooldown) else cooldown_keys(history, options)
    clamped = np.empty(n, dtype=np.float32)
    bad, chosen, length_after, counts = _allocator.allocate(
        lod=np.ascontiguousarray(layout.lod, dtype=np.int64),
        positions=np.ascontiguousarray(layout.positions, dtype=np.int64),
        scores=np.ascontiguousarray(raw, dtype=np.float32),
        clamped=clamped,
        no_expand=no_expand,
        no_collapse=no_collapse,
        block_size=b,
        max_lod=top,
        w_max=min(options.w_max, _UNBOUNDED),
        tau_expand=options.tau_expand,
        tau_collapse=options.tau_collapse,
        max_edits=options.max_edits,
        aggregation=_AGGREGATIONS[options.aggregation],
        protect_recent=min(options.protect_recent, _UNBOUNDED),
    )
    if bad >= 0:
        raise SnapshotError("score_range", f"scores[{bad}]", "a finite value in [-1, 1]", raw[bad], bad)
    cand_expand, cand_collapse, clamped_expand, clamped_collapse, *rejected, need, legal, cooling = counts
    edits = tuple(
        Edit("expand", i, 1, b, level, level - 1, pos, b**level, score, _CAUSES[cause])
        if expand
        else Edit("collapse", i, b, 1, level, level + 1, pos, b ** (level + 1), score, _CAUSES[cause])
        for expand, i, level, pos, score, cause in chosen
    )
    budget_note = None
    if length_after > options.w_max:  # only the budget step can leave it there (module docstring)
        budget_note = (
            f"max_edits ({options.max_edits}) reached before the {need} collapses needed"
            if legal >= need
            else f"{need} collapses needed, {legal} legal ({rejected[0]} groups protected, {cooling} in cooldown)"
        )
    return Allocation(
        edits=edits,
        length_before=n,
        length_after=length_after,
        budget_met=length_after <= options.w_max,
        budget_note=budget_note,
        counters=Counters(
            candidates_expand=cand_expand,
            candidates_collapse=cand_collapse,
            clamped_expand=clamped_expand,
            clamped_collapse=clamped_collapse,
            rejected=dict(zip(REJECT_REASONS, rejected, strict=True)),
        ),
        scores=clamped,
    )
