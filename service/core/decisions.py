"""The bounded memory of recent focus decisions, so measured ΔNLL feedback can find its edit.

Every focus answer gets a `decision_id` (`<process tag>-<sequence, hex>`); the memory keeps, per
decision, what feedback needs of each edit: action, the LOD acted on, the score that drove it and
its cause. It holds at most `capacity` decisions, none older than `max_age_s`: the oldest go
first. Because sequence numbers only grow, a forgotten decision is told apart from one this
process never made ("expired" vs "unknown"), and each (decision, edit) is accepted once
("duplicate" after, within a batch too).

Columnar, so a feedback batch is matched with a few numpy operations, not Python per item (at
10,000 items/s, per-item Python would hold the GIL that focus requests need): decisions sit in
ring arrays indexed by sequence % capacity, their edits in one ring of edit columns indexed by
the edit's global number, which grows (doubling) to hold the edits of the decisions kept and
shrinks back when they are few. Thread-safe: decisions are made in inference threads, feedback is
matched in the policy thread.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lensnet_client.layout import Edit

Result = Literal["matched", "unknown_decision", "expired_decision", "bad_index", "duplicate"]
RESULTS: tuple[Result, ...] = ("matched", "unknown_decision", "expired_decision", "bad_index", "duplicate")
MATCHED, UNKNOWN, EXPIRED, BAD_INDEX, DUPLICATE = range(len(RESULTS))  # result codes: indices into RESULTS
CAUSES = ("threshold", "budget", "make_room")
_CAUSE_CODES = {cause: code for code, cause in enumerate(CAUSES)}
_MIN_EDIT_SLOTS = 4096


def sequence_of(decision_id: str, tag: str) -> int:
    """The sequence number of an id this process's memory (`tag`) wrote, else -1: only the exact
    form `remember` writes counts (lowercase hex, no sign, spaces, underscores or leading zeros)."""
    prefix, dash, digits = decision_id.partition("-")
    if prefix != tag or not dash or not 0 < len(digits) <= 16:
        return -1
    try:
        sequence = int(digits, 16)
    except ValueError:
        return -1
    return sequence if f"{sequence:x}" == digits else -1


@dataclass(frozen=True, slots=True)
class Matched:
    """The matched items of a feedback batch, as arrays (one element per matched item)."""

    item: np.ndarray  # index of the item in the batch
    expand: np.ndarray  # bool: an expansion (else a collapse)
    lod: np.ndarray  # the level acted on (the expanded gist's, or the collapsed children's)
    score: np.ndarray  # the score that drove the edit (expand: entry score; collapse: block score)
    cause: np.ndarray  # index into CAUSES
    traced: np.ndarray  # bool: the decision was written to the deployment trace


class _EditRing:
    """Edit columns indexed by global edit number modulo a power-of-two size."""

    def __init__(self, size: int) -> None:
        self.mask = size - 1
        self.expand = np.zeros(size, dtype=bool)
        self.lod = np.zeros(size, dtype=np.int8)
        self.cause = np.zeros(size, dtype=np.int8)
        self.score = np.zeros(size, dtype=np.float32)
        self.seen = np.zeros(size, dtype=bool)

    def columns(self) -> tuple[np.ndarray, ...]:
        return self.expand, self.lod, self.cause, self.score, self.seen

    def resized(self, size: int, first: int, end: int) -> _EditRing:
        """A ring of `size` slots holding edits `first` … `end - 1` of this one."""
        ring = _EditRing(size)
        numbers = np.arange(first, end)
        for new, old in zip(ring.columns(), self.columns(), strict=True):
            new[numbers & ring.mask] = old[numbers & self.mask]
        return ring


class DecisionMemory:
    """Recent decisions by id, bounded by count and age (see the module docstring)."""

    def __init__(self, capacity: int, max_age_s: float, tag: str | None = None) -> None:
        tag = tag or os.urandom(4).hex()  # tells this process's ids from another replica's
        if capacity < 1 or not max_age_s > 0 or not re.fullmatch(r"[0-9a-f]{1,16}", tag):
            raise ValueError(f"capacity >= 1, max_age_s > 0, a hex tag expected, got {capacity}, {max_age_s}, {tag!r}")
        self.capacity, self.max_age_s, self.tag = capacity, max_age_s, tag
        # Per decision, at slot sequence % capacity: when, its first edit's number, how many, traced.
        self._created = np.zeros(capacity)
        self._first = np.zeros(capacity, dtype=np.int64)
        self._count = np.zeros(capacity, dtype=np.int64)
        self._traced = np.zeros(capacity, dtype=bool)
        self._edits = _EditRing(_MIN_EDIT_SLOTS)
        self._oldest = self._next = 0  # decisions _oldest … _next - 1 are held
        self._edits_next = 0  # edits ever stored
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._next - self._oldest

    def remember(self, edits: Sequence[Edit], now: float, traced: bool = False) -> str:
        """Store a decision's edits (made at time `now`, seconds) and return its id."""
        expand = [e.action == "expand" for e in edits]
        columns = (expand, [e.lod_before for e in edits], [_CAUSE_CODES[e.cause] for e in edits],
                   [e.score for e in edits], [False] * len(edits))  # fmt: skip
        with self._lock:
            sequence = self._next
            self._next += 1
            self._evict(now, keep=1)
            first = self._edits_next
            self._fit(first + len(edits))
            if edits:
                numbers = np.arange(first, first + len(edits)) & self._edits.mask
                for column, values in zip(self._edits.columns(), columns, strict=True):
                    column[numbers] = values
            slot = sequence % self.capacity
            self._created[slot], self._first[slot], self._count[slot] = now, first, len(edits)
            self._traced[slot] = traced
            self._edits_next = first + len(edits)
        return f"{self.tag}-{sequence:x}"

    def _evict(self, now: float, keep: int = 0) -> None:
        """Forget decisions beyond the capacity or older than max_age_s (the newest `keep` are
        being written: they stay)."""
        oldest = max(self._oldest, self._next - self.capacity)
        allowed, end = now - self.max_age_s, self._next - keep
        while oldest < end and self._created[oldest % self.capacity] < allowed:
            oldest += 1
        self._oldest = oldest

    def _fit(self, end: int) -> None:
        """Size the edit ring for the edits of the decisions held, up to edit number `end`."""
        first = int(self._first[self._oldest % self.capacity]) if self._oldest < self._next - 1 else self._edits_next
        size = self._edits.mask + 1
        while end - first > size:
            size *= 2
        while size > _MIN_EDIT_SLOTS and end - first <= size // 8:
            size //= 2
        if size != self._edits.mask + 1:
            self._edits = self._edits.resized(size, first, self._edits_next)

    def match(self, decision_ids: Sequence[str], edit: np.ndarray, now: float) -> tuple[np.ndarray, Matched]:
        """Look up (decision_id, edit index) pairs at time `now`: a result code (index into
        RESULTS) per item, and the matched edits. A matched edit is marked, so the same pair later
        (in this batch or another) counts as a duplicate. `edit` is int64 and >= 0."""
        parsed = {i: sequence_of(i, self.tag) for i in dict.fromkeys(decision_ids)}  # each distinct id once
        sequence = np.fromiter(map(parsed.__getitem__, decision_ids), dtype=np.int64, count=len(decision_ids))
        with self._lock:
            self._evict(now)
            oldest = self._oldest
            held = (sequence >= oldest) & (sequence < self._next)
            slot = np.where(held, sequence, 0) % self.capacity
            valid = held & (edit < np.where(held, self._count[slot], 0))
            number = self._first[slot] + np.where(valid, edit, 0)
            ring = number & self._edits.mask
            fresh = np.flatnonzero(valid & ~self._edits.seen[ring])
            _, first_seen = np.unique(number[fresh], return_index=True)  # a pair twice in one batch: the first
            item = fresh[np.sort(first_seen)]
            at = ring[item]
            self._edits.seen[at] = True
            matched = Matched(
                item=item,
                expand=self._edits.expand[at],
                lod=self._edits.lod[at].astype(np.int64),
                score=self._edits.score[at].astype(np.float64),
                cause=self._edits.cause[at].astype(np.int64),
                traced=self._traced[slot[item]],
            )
        codes = np.full(sequence.size, UNKNOWN, dtype=np.int8)
        codes[(sequence >= 0) & (sequence < oldest)] = EXPIRED
        codes[held] = BAD_INDEX
        codes[valid] = DUPLICATE
        codes[item] = MATCHED
        return codes, matched
