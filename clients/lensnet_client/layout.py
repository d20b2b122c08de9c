"""Working-context layout rules: validation, edits and their application (numpy only).

This module is the single source of truth for what a valid WC snapshot is. The focus service
validates with it and the client applies the service's edits with it, so the two cannot disagree.

A snapshot is `lod[N]` and `positions[N]` (span starts, in tokens). Entry `i` covers tokens
`[positions[i], positions[i] + B**lod[i])`. Valid means: `N >= 1`, `0 <= lod <= max_lod`,
`positions[i] % B**lod[i] == 0` (alignment) and `positions[i] + B**lod[i] == positions[i+1]`
(contiguity and order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np

POSITION_LIMIT = 1 << 48
"""Largest accepted span start (exclusive): far beyond any real history, small enough that
position arithmetic can never overflow int64."""

Action = Literal["expand", "collapse"]


class SnapshotError(ValueError):
    """A snapshot input breaks a rule: `rule` names it, `field` the offending input (with the
    index of the first offending entry, when there is one), `expected`/`got` say what is wrong."""

    def __init__(self, rule: str, field: str, expected: str, got: object, index: int | None = None) -> None:
        self.rule, self.field, self.expected, self.got, self.index = rule, field, expected, got, index
        super().__init__(f"{field}: expected {expected}, got {got}")


def span_table(block_size: int, max_lod: int) -> np.ndarray:
    """Tokens covered by one entry at each level: `B ** l` for `l = 0 … max_lod` (int64)."""
    return np.asarray([block_size**level for level in range(max_lod + 1)], dtype=np.int64)


def multiple_of(values: np.ndarray, divisors: np.ndarray | int) -> np.ndarray:
    """`values % divisors == 0` for 0 <= values < 2**48, about twice as fast as integer modulo.

    Exact: a float64 quotient q = v / d of such values needs < 48 significant bits to show its
    fractional part (>= 1/d), and float64 keeps 53, so a non-multiple never rounds to an integer.
    """
    quotient = values / divisors
    return quotient == np.floor(quotient)


def _as_int_vector(values: object, field: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise SnapshotError("shape", field, "a 1-D array", f"shape {list(array.shape)}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise SnapshotError("dtype", field, "integers", f"dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


class Layout(NamedTuple):
    """A snapshot's metadata that passed `validate_layout` (int64 arrays), with the tree it is valid for."""

    lod: np.ndarray
    positions: np.ndarray
    block_size: int
    max_lod: int


def validate_layout(lod: object, positions: object, block_size: int, max_lod: int) -> Layout:
    """Check every layout rule; raise `SnapshotError` naming the rule and the first offending index."""
    lod_arr = _as_int_vector(lod, "lod")
    pos_arr = _as_int_vector(positions, "positions")
    n = lod_arr.size
    if n == 0:
        raise SnapshotError("length", "lod", "at least 1 entry", "0")
    if pos_arr.size != n:
        raise SnapshotError("length", "positions", f"{n} entries (the length of lod)", pos_arr.size)
    # Cheap reductions on the happy path; the offending index is only searched for on error.
    if lod_arr.min() < 0 or lod_arr.max() > max_lod:
        i = _first((lod_arr < 0) | (lod_arr > max_lod))
        raise SnapshotError("lod_range", f"lod[{i}]", f"a level in 0…{max_lod}", lod_arr[i], i)
    if pos_arr.min() < 0 or pos_arr.max() >= POSITION_LIMIT:
        i = _first((pos_arr < 0) | (pos_arr >= POSITION_LIMIT))
        raise SnapshotError("position_range", f"positions[{i}]", "0 <= position < 2**48", pos_arr[i], i)
    spans = span_table(block_size, max_lod)[lod_arr]
    aligned = multiple_of(pos_arr, spans)
    if not aligned.all():
        i = _first(~aligned)
        expected = f"a multiple of its span {spans[i]} (lod[{i}] = {lod_arr[i]})"
        raise SnapshotError("alignment", f"positions[{i}]", expected, pos_arr[i], i)
    ends = pos_arr[:-1] + spans[:-1]
    if not np.array_equal(ends, pos_arr[1:]):
        i = _first(ends != pos_arr[1:]) + 1
        what = "a gap" if pos_arr[i] > ends[i - 1] else "an overlap or out-of-order entry"
        expected = f"{ends[i - 1]} (the end of entry {i - 1})"
        raise SnapshotError("contiguity", f"positions[{i}]", expected, f"{pos_arr[i]}: {what}", i)
    return Layout(lod_arr, pos_arr, block_size, max_lod)


class Edit(NamedTuple):
    """One allocator decision, indexed into the snapshot it was computed for.

    `index` is the first affected entry; an expansion removes 1 entry and adds `B`, a collapse
    removes `B` and adds 1. `position`/`span_tokens` give the token span the edit covers; `score`
    is the (clamped, or block-aggregated) score that drove it; `cause` is `threshold`, `budget`
    (collapse to get back under `w_max`) or `make_room` (collapse to fit an expansion).
    """

    action: Action
    index: int
    removed: int
    added: int
    lod_before: int
    lod_after: int
    position: int
    span_tokens: int
    score: float
    cause: str

    @property
    def node_lod(self) -> int:
        """Level of the gist node this edit removed (expand) or created (collapse)."""
        return max(self.lod_before, self.lod_after)


def apply_edits(
    lod: object, positions: object, edits: Iterable[Edit], block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Apply disjoint edits to a snapshot's metadata and return the new `(lod, positions)`.

    Each edit is checked against the snapshot (its entries must be where and what it says) so a
    stale or tampered edit list raises `ValueError` instead of producing a corrupt layout.
    """
    lod_arr = np.asarray(lod, dtype=np.int64)
    pos_arr = np.asarray(positions, dtype=np.int64)
    pieces_lod: list[np.ndarray] = []
    pieces_pos: list[np.ndarray] = []
    cursor = 0
    for edit in sorted(edits, key=lambda e: e.index):
        if edit.index < cursor:
            raise ValueError(f"edit at index {edit.index} overlaps the previous edit (ends at {cursor})")
        stop = edit.index + edit.removed
        if stop > lod_arr.size:
            raise ValueError(f"edit at index {edit.index} runs past the snapshot end ({lod_arr.size})")
        touched_lod = lod_arr[edit.index : stop]
        child_span = block_size ** min(edit.lod_before, edit.lod_after)
        if edit.action == "expand":
            valid = (
                edit.lod_before >= 1
                and edit.removed == 1
                and edit.added == block_size
                and edit.lod_after == edit.lod_before - 1
            )
        elif edit.action == "collapse":
            valid = (
                edit.removed == block_size
                and edit.added == 1
                and edit.lod_after == edit.lod_before + 1
                and edit.position % (child_span * block_size) == 0
            )
        else:
            raise ValueError(f"edit at index {edit.index}: unknown action {edit.action!r}")
        if not valid or (touched_lod != edit.lod_before).any() or pos_arr[edit.index] != edit.position:
            raise ValueError(f"edit at index {edit.index} does not match the snapshot: {edit}")
        pieces_lod += [lod_arr[cursor : edit.index], np.full(edit.added, edit.lod_after, dtype=np.int64)]
        step = child_span if edit.action == "expand" else 0
        pieces_pos += [pos_arr[cursor : edit.index], edit.position + step * np.arange(edit.added, dtype=np.int64)]
        cursor = stop
    pieces_lod.append(lod_arr[cursor:])
    pieces_pos.append(pos_arr[cursor:])
    return np.concatenate(pieces_lod), np.concatenate(pieces_pos)


def edit_rows(rows: np.ndarray, edits: Iterable[Edit], created: np.ndarray) -> np.ndarray:
    """Per-entry rows (the caller's embeddings) after `edits`, as `apply_edits` changes the metadata:
    each edit's `removed` rows give way to its `added` rows, taken from `created` in edit order."""
    pieces, cursor, at = [], 0, 0
    for edit in sorted(edits, key=lambda e: e.index):
        pieces += [rows[cursor : edit.index], created[at : at + edit.added]]
        cursor, at = edit.index + edit.removed, at + edit.added
    if at != len(created):
        raise ValueError(f"created: the edits create {at} rows, got {len(created)}")
    return np.concatenate([*pieces, rows[cursor:]])


def synthetic_layout(
    n: int,
    block_size: int,
    max_lod: int,
    rng: np.random.Generator,
    start_block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A random valid snapshot of exactly `n` entries shaped like a real WC.

    Old history is mostly coarse (high LOD), recent history mostly raw tokens, with some
    interleaving, and the newest tokens usually form a partial block. For tests, load tests,
    benchmarks and demos.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    spans = [block_size**level for level in range(max_lod + 1)]
    cursor = int(rng.integers(0, 1024) if start_block is None else start_block) * spans[-1]
    # Preferred level falls from max_lod to 0 across the snapshot, with ±1 level of noise;
    # alignment then caps it (a level-l entry must start on a multiple of B**l).
    preferred = np.clip(np.floor((1 - np.arange(n) / n) * (max_lod + 1) + rng.uniform(-1, 1, n)), 0, max_lod)
    lod = np.empty(n, dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    for i, level in enumerate(preferred.astype(np.int64).tolist()):
        while cursor % spans[level]:
            level -= 1
        lod[i], pos[i] = level, cursor
        cursor += spans[level]
    return lod, pos


def node_keys(lods: Sequence[int] | np.ndarray, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """A unique int64 key per tree node `(lod, position)`, for fast set membership."""
    return np.asarray(positions, dtype=np.int64) * 4 + np.asarray(lods, dtype=np.int64)


def apply_step(
    lod: np.ndarray,
    positions: np.ndarray,
    edits: Sequence[Edit],
    applied: Sequence[int] | None,
    trim_head: int,
    append_lod: object,
    append_positions: object,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One session step's metadata change, as the service and the client both apply it: the
    `applied` edits (indices into `edits`, the previous answer's; None = all), then `trim_head`
    entries dropped from the head, then the appended entries at the tail. The result is not
    validated (the caller checks it like a full snapshot); bad indices raise `SnapshotError`."""
    chosen = range(len(edits)) if applied is None else applied
    seen: set[int] = set()
    for k, index in enumerate(chosen):
        if not 0 <= index < len(edits) or index in seen:
            expected = f"distinct indices into the previous answer's {len(edits)} edits"
            raise SnapshotError("applied", f"applied[{k}]", expected, index, k)
        seen.add(index)
    new_lod, new_positions = apply_edits(lod, positions, [edits[i] for i in sorted(seen)], block_size)
    if not 0 <= trim_head <= new_lod.size:
        expected = f"0 <= trim_head <= {new_lod.size} (the entries left after the applied edits)"
        raise SnapshotError("trim_head", "trim_head", expected, trim_head)
    tail_lod = _as_int_vector(append_lod, "append_lod")
    tail_positions = _as_int_vector(append_positions, "append_positions")
    return (
        np.concatenate([new_lod[trim_head:], tail_lod]),
        np.concatenate([new_positions[trim_head:], tail_positions]),
    )
