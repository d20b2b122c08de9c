"""The legality-clamped block allocator: per-entry scores → a few legal, budgeted edits.

Pure and deterministic (numpy only). One focus step:

1. **Validate** the layout (`lensnet_client.layout.validate_layout`, done by the caller), the
   scores (length, finite, in [-1, 1]) and the edit history.
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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

import numpy as np

from lensnet_client.layout import (
    POSITION_LIMIT,
    Action,
    Edit,
    Layout,
    SnapshotError,
    multiple_of,
    node_keys,
    span_table,
)

Aggregation = Literal["mean", "max", "min"]
RejectReason = Literal["protected", "cooldown", "threshold", "overlap", "budget", "max_edits"]
REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
MAX_EDITS_LIMIT = 1024
DEFAULT_TAU_EXPAND = 0.5
DEFAULT_TAU_COLLAPSE = 0.5
MAX_COOLDOWN_STEPS = 1024


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
        checks: list[tuple[str, bool, str]] = [
            ("block_size", self.block_size >= 2, ">= 2"),
            ("max_lod", 1 <= self.max_lod <= 3, "1…3"),
            ("w_max", self.w_max >= 1, ">= 1"),
            ("tau_expand", 0 < self.tau_expand <= 1, "0 < tau_expand <= 1"),
            ("tau_collapse", 0 < self.tau_collapse <= 1, "0 < tau_collapse <= 1"),
            ("max_edits", 1 <= self.max_edits <= MAX_EDITS_LIMIT, f"1…{MAX_EDITS_LIMIT}"),
            ("aggregation", self.aggregation in get_args(Aggregation), " | ".join(get_args(Aggregation))),
            ("protect_recent", self.protect_recent >= 0, ">= 0"),
            ("cooldown_steps", 0 <= self.cooldown_steps <= MAX_COOLDOWN_STEPS, f"0…{MAX_COOLDOWN_STEPS}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise OptionsError(name, expected, getattr(self, name))


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


def validate_scores(scores: object, n: int) -> np.ndarray:
    array = np.asarray(scores)
    if array.shape != (n,):
        raise SnapshotError("length", "scores", f"shape [{n}]", list(array.shape))
    if not np.issubdtype(array.dtype, np.floating):
        raise SnapshotError("dtype", "scores", "floats", f"dtype {array.dtype}")
    if not np.abs(array).max() <= 1:  # NaN fails this comparison too
        i = int(np.argmax(~np.isfinite(array) | (np.abs(array) > 1)))
        raise SnapshotError("score_range", f"scores[{i}]", "a finite value in [-1, 1]", array[i], i)
    return array


class Cooldown(NamedTuple):
    """Node keys (`node_keys`) that hysteresis blocks this step."""

    no_expand: np.ndarray  # created by a recent collapse
    no_collapse: np.ndarray  # recently expanded


def cooldown_keys(history: Sequence[HistoryItem], options: AllocatorOptions) -> Cooldown:
    """Validate the history and return the nodes it blocks (undoing an edit within `cooldown_steps`)."""
    spans = span_table(options.block_size, options.max_lod)
    blocked: dict[Action, list[tuple[int, int]]] = {"expand": [], "collapse": []}
    for k, item in enumerate(history):
        problem = None
        if item.action not in ("expand", "collapse"):
            problem = ("action", "'expand' or 'collapse'", repr(item.action))
        elif not 1 <= item.lod <= options.max_lod:
            problem = ("lod", f"a gist level 1…{options.max_lod}", item.lod)
        elif not 0 <= item.position < POSITION_LIMIT or item.position % int(spans[item.lod]):
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
        return node_keys([lod for lod, _ in nodes], [pos for _, pos in nodes])

    return Cooldown(keys(blocked["expand"]), keys(blocked["collapse"]))


def collapse_groups(
    lod: np.ndarray, positions: np.ndarray, block_size: int, max_lod: int
) -> tuple[np.ndarray, np.ndarray]:
    """Start index and level of every complete, aligned sibling group, ordered by start.

    A start is an entry below the top level that begins on a multiple of its parent's span. In a
    valid layout, entries `i` and `i+B-1` at level `l`, `B-1` spans apart, force every entry
    between them to level `l` too (B-2 powers of B summing to (B-2)·B**l are all B**l).
    """
    parent_span = span_table(block_size, max_lod + 1)[1:]
    last = lod.size - block_size  # the last index a complete group can start at
    head = slice(0, max(last + 1, 0))
    first = np.flatnonzero((lod[head] < max_lod) & multiple_of(positions[head], parent_span[lod[head]]))
    level = lod[first]
    end = first + block_size - 1
    complete = (lod[end] == level) & (
        positions[end] - positions[first] == (block_size - 1) * (parent_span[level] // block_size)
    )
    return first[complete], level[complete]


_AGGREGATE: dict[Aggregation, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda children: children.sum(axis=1, dtype=np.float64) / children.shape[1],
    "max": lambda children: children.max(axis=1),
    "min": lambda children: children.min(axis=1),
}


def _recent(lods: np.ndarray, positions: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which nodes `(lods[i], positions[i])` are among the cooldown `keys`."""
    if not keys.size:
        return np.zeros(lods.size, dtype=bool)
    return np.isin(node_keys(lods, positions), keys)


class _Selection:
    """Greedy selection state over candidate ids (plain Python containers: the loop is hot).

    Collapse group `g` is usable while it is neither collapsed nor holding an expanded entry; an
    expansion overlaps when its own group (`own`, or -1) has been collapsed.
    """

    def __init__(self, n: int, groups: int, options: AllocatorOptions) -> None:
        self.options = options
        self.length = n
        self.edits_left = options.max_edits
        self.collapsed = bytearray(groups)
        self.expanded_in = bytearray(groups)
        self.chosen: list[tuple[Action, int, str]] = []  # (action, candidate id, cause)

    def usable(self, g: int) -> bool:
        return not (self.collapsed[g] or self.expanded_in[g])

    def collapse(self, g: int, cause: str) -> None:
        self.collapsed[g] = 1
        self.chosen.append(("collapse", g, cause))
        self.length -= self.options.block_size - 1
        self.edits_left -= 1

    def expand(self, e: int, own: int) -> None:
        if own >= 0:
            self.expanded_in[own] = 1
        self.chosen.append(("expand", e, "threshold"))
        self.length += self.options.block_size - 1
        self.edits_left -= 1

    def offer_collapse(self, g: int, rejected: dict[RejectReason, int]) -> None:
        """A voluntary collapse reached in the queue: take it unless it overlaps a taken edit."""
        if self.collapsed[g]:
            return  # already collapsed to make room
        if self.expanded_in[g]:
            rejected["overlap"] += 1
        else:
            self.collapse(g, "threshold")


class _Queue:
    """Candidate positions in (primary, secondary) ascending order, sorted lazily: the first
    `head` (with every tie at the cut) at once, the rest only if iteration gets there."""

    def __init__(self, primary: np.ndarray, secondary: np.ndarray, head: int) -> None:
        self.primary, self.secondary = primary, secondary
        if primary.size <= head:
            first, self.rest = np.arange(primary.size), np.empty(0, dtype=np.int64)
        else:
            cut = np.partition(primary, head - 1)[head - 1]
            first, self.rest = np.flatnonzero(primary <= cut), np.flatnonzero(primary > cut)
        self.first = self.sort(first)
        self._rest_started = False

    def sort(self, positions: np.ndarray) -> np.ndarray:
        return positions[np.lexsort((self.secondary[positions], self.primary[positions]))]

    def batches(self) -> Iterator[np.ndarray]:
        yield self.first
        if self.rest.size:
            self._rest_started = True
            yield self.sort(self.rest)

    def pending(self) -> np.ndarray:
        """Positions of batches not yet handed out (unsorted)."""
        return np.empty(0, dtype=np.int64) if self._rest_started else self.rest


class _Room:
    """Collapse candidates for make-room trades, least useful first (the budget pool's order)."""

    def __init__(self, groups: list[int], scores: list[float]) -> None:
        self.groups, self.scores, self.first = groups, scores, 0

    def find(self, sel: _Selection, score: float, own: int) -> int | None:
        """The least useful usable group, other than `own`, whose score is strictly below `score`."""
        groups, scores = self.groups, self.scores
        while self.first < len(groups) and not sel.usable(groups[self.first]):
            self.first += 1  # never usable again: skip it for good
        for j in range(self.first, len(groups)):
            if scores[j] >= score:
                return None
            if groups[j] != own and sel.usable(groups[j]):
                return groups[j]
        return None


def _edits(
    chosen: list[tuple[Action, int, str]], exp_idx: np.ndarray, exp_score: np.ndarray, starts: np.ndarray,
    block: np.ndarray, lod: np.ndarray, positions: np.ndarray, b: int,
) -> tuple[Edit, ...]:  # fmt: skip
    """Materialise the chosen edits, ordered by index (values gathered in one numpy pass each)."""
    expand = np.array([action == "expand" for action, _, _ in chosen], dtype=bool)
    ids = np.array([k for _, k, _ in chosen], dtype=np.int64)
    index = np.empty(ids.size, dtype=np.int64)
    score = np.empty(ids.size, dtype=np.float64)
    index[expand], score[expand] = exp_idx[ids[expand]], exp_score[ids[expand]]
    index[~expand], score[~expand] = starts[ids[~expand]], block[ids[~expand]]
    order = np.argsort(index)
    index, score = index[order], score[order]
    edits = []
    for j, i, level, pos, value in zip(
        order.tolist(), index.tolist(), lod[index].tolist(), positions[index].tolist(), score.tolist(), strict=True
    ):
        action, _, cause = chosen[j]
        if action == "expand":
            edits.append(Edit(action, i, 1, b, level, level - 1, pos, b**level, value, cause))
        else:
            edits.append(Edit(action, i, b, 1, level, level + 1, pos, b ** (level + 1), value, cause))
    return tuple(edits)


def allocate(
    layout: Layout,
    scores: object,
    options: AllocatorOptions,
    history: Sequence[HistoryItem] | Cooldown = (),
) -> Allocation:
    """Decide this step's edits (see the module docstring for the exact rules).

    `layout` comes from `validate_layout`, and `history` may be given as its `cooldown_keys`:
    parts of step 1 are split out so a caller that validated its input before scoring it does
    not pay for it twice.
    """
    b, top = options.block_size, options.max_lod
    if (layout.block_size, layout.max_lod) != (b, top):
        raise ValueError(
            f"layout validated for B={layout.block_size}, max LOD {layout.max_lod}; options say B={b}, {top}"
        )
    lod, positions = layout.lod, layout.positions
    raw = validate_scores(scores, lod.size)
    no_expand, no_collapse = history if isinstance(history, Cooldown) else cooldown_keys(history, options)
    spans = span_table(b, top)

    # 2. Clamp.
    clamp_up, clamp_down = (lod == 0) & (raw > 0), (lod == top) & (raw < 0)
    # Multiply by the keep-mask (much faster than np.where here); + 0 turns -0.0 into 0.0.
    clamped = raw.astype(np.float32, copy=False) * ~(clamp_up | clamp_down) + np.float32(0)

    # 3. Candidates.
    exp_idx = np.flatnonzero(lod >= 1)
    exp_score = clamped[exp_idx]
    exp_cool = _recent(lod[exp_idx], positions[exp_idx], no_expand)
    starts, levels = collapse_groups(lod, positions, b, top)
    block = _AGGREGATE[options.aggregation](clamped[starts[:, None] + np.arange(b)])
    end_token = int(positions[-1] + spans[lod[-1]])
    protected = positions[starts] + b * spans[levels] > end_token - options.protect_recent
    group_cool = ~protected & _recent(levels + 1, positions[starts], no_collapse)
    rejected: dict[RejectReason, int] = dict.fromkeys(REJECT_REASONS, 0)
    rejected["protected"] = int(protected.sum())
    rejected["cooldown"] = int(group_cool.sum() + exp_cool.sum())
    sel = _Selection(lod.size, starts.size, options)

    # 4. Budget: least useful legal groups first (a stable sort keeps ties in index order).
    pool = np.flatnonzero(~protected & ~group_cool)
    pool = pool[np.argsort(block[pool], kind="stable")]
    need = max(0, -(-(lod.size - options.w_max) // (b - 1)))
    for g in pool[: min(need, options.max_edits)].tolist():
        sel.collapse(g, "budget")
    budget_note = None
    if sel.length > options.w_max:
        budget_note = (
            f"max_edits ({options.max_edits}) reached before the {need} collapses needed"
            if pool.size >= need
            else f"{need} collapses needed, {pool.size} legal ({rejected['protected']} groups protected, "
            f"{int(group_cool.sum())} in cooldown)"
        )

    # 5. Voluntary edits, strongest first; ties: lower index, then collapse before expand.
    wants = np.flatnonzero(~exp_cool & (exp_score >= options.tau_expand))
    rejected["threshold"] += int((~exp_cool).sum()) - wants.size
    remaining = pool[min(need, options.max_edits) :]
    voluntary = remaining[block[remaining] <= -options.tau_collapse]
    # The group holding each wanted expansion, if any: the last group starting at or before it.
    entry = exp_idx[wants]
    holder = np.maximum(np.searchsorted(starts, entry, side="right") - 1, 0)
    inside = np.zeros(entry.size, dtype=bool)
    if starts.size:
        inside = (starts[holder] <= entry) & (starts[holder] + b > entry) & (levels[holder] == lod[entry])
    is_expand = np.arange(wants.size + voluntary.size) < wants.size
    cand = np.concatenate([wants, voluntary])
    owner = np.concatenate([np.where(inside, holder, -1), np.full(voluntary.size, -1)])
    # Queue order: strength descending, then lower index, then collapse before expand. Usually
    # only the first few dozen entries are reached, so those are sorted first and the rest only
    # on demand.
    primary = -np.concatenate([exp_score[wants], -block[voluntary]])
    secondary = 2 * np.concatenate([entry, starts[voluntary]]) + is_expand
    queue = _Queue(primary, secondary, head=4 * options.max_edits + 16)
    room = _Room(pool.tolist(), block[pool].tolist())
    limit = options.w_max - (b - 1)  # an expansion fits while length <= limit
    unreached = np.empty(0, dtype=np.int64)
    for batch in queue.batches():
        stop = None
        items = zip(cand[batch].tolist(), is_expand[batch].tolist(), owner[batch].tolist(), strict=True)
        for j, (k, expands, own) in enumerate(items):
            if sel.edits_left == 0 or (expands and sel.edits_left == 1 and sel.length > limit):
                stop = j
                break
            if not expands:
                sel.offer_collapse(k, rejected)
            elif own >= 0 and sel.collapsed[own]:
                rejected["overlap"] += 1
            elif sel.length <= limit:
                sel.expand(k, own)
            elif (g := room.find(sel, float(exp_score[k]), own)) is not None:  # two edits are left
                sel.collapse(g, "make_room")
                sel.expand(k, own)
            else:
                rejected["budget"] += 1
        if stop is not None:
            unreached = np.concatenate([batch[stop:], queue.pending()])
            break
    # Unreached: out of edits, or one left and no room, so no expansion can be taken (a trade
    # needs two edits); a remaining collapse may still take the last edit, in queue order.
    # Overlap still takes precedence over max_edits as the reason.
    collapsed = np.frombuffer(sel.collapsed, dtype=np.uint8).astype(bool)
    mine = owner[unreached[is_expand[unreached]]]
    overlapping = int(collapsed[mine[mine >= 0]].sum())
    rejected["overlap"] += overlapping
    rejected["max_edits"] += mine.size - overlapping
    for g in cand[queue.sort(unreached[~is_expand[unreached]])].tolist():
        if sel.edits_left:
            sel.offer_collapse(g, rejected)
        elif sel.expanded_in[g]:
            rejected["overlap"] += 1
        elif not sel.collapsed[g]:
            rejected["max_edits"] += 1
    collapsed = np.frombuffer(sel.collapsed, dtype=np.uint8).astype(bool)  # the loop above may add some
    below = remaining[block[remaining] > -options.tau_collapse]
    rejected["threshold"] += int((~collapsed[below]).sum())

    return Allocation(
        edits=_edits(sel.chosen, exp_idx, exp_score, starts, block, lod, positions, b),
        length_before=int(lod.size),
        length_after=sel.length,
        budget_met=sel.length <= options.w_max,
        budget_note=budget_note,
        counters=Counters(
            candidates_expand=int(exp_idx.size),
            candidates_collapse=int(starts.size),
            clamped_expand=int(clamp_up.sum()),
            clamped_collapse=int(clamp_down.sum()),
            rejected=rejected,
        ),
        scores=clamped,
    )
