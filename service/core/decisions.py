"""The bounded memory of recent focus decisions, so measured ΔNLL feedback can find its edit.

Every focus answer gets a `decision_id` (`<process tag>-<sequence, hex>`); the memory keeps, per
decision, what feedback needs of each edit: action, the LOD acted on, the score that drove it and
its cause, packed into 7 bytes an edit. It holds at most `capacity` decisions, none older than
`max_age_s`: the oldest go first. Because sequence numbers only grow, a forgotten decision is
told apart from one this process never made ("expired" vs "unknown"), and each (decision, edit)
is accepted once ("duplicate" after). Thread-safe: decisions are made in inference threads,
feedback arrives on the event loop.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lensnet_client.layout import Edit

Result = Literal["matched", "unknown_decision", "expired_decision", "bad_index", "duplicate"]
RESULTS: tuple[Result, ...] = ("matched", "unknown_decision", "expired_decision", "bad_index", "duplicate")
CAUSES = ("threshold", "budget", "make_room")
_EDIT = struct.Struct("<BBBf")  # expand?, LOD acted on, cause, driving score
_CAUSE_CODES = {cause: code for code, cause in enumerate(CAUSES)}
_ID = re.compile(r"([0-9a-f]{1,16})-(0|[1-9a-f][0-9a-f]{0,15})")


class _Decision:
    __slots__ = ("created", "edits", "seen", "traced")

    def __init__(self, created: float, edits: bytes, traced: bool) -> None:
        self.created, self.edits, self.seen, self.traced = created, edits, 0, traced


@dataclass(frozen=True, slots=True)
class Matched:
    """The matched items of a feedback batch, as arrays (one element per matched item)."""

    item: np.ndarray  # index of the item in the batch
    expand: np.ndarray  # bool: an expansion (else a collapse)
    lod: np.ndarray  # the level acted on (the expanded gist's, or the collapsed children's)
    score: np.ndarray  # the score that drove the edit (expand: entry score; collapse: block score)
    cause: np.ndarray  # index into CAUSES
    traced: np.ndarray  # bool: the decision was written to the deployment trace


class DecisionMemory:
    """Recent decisions by id, bounded by count and age (see the module docstring)."""

    def __init__(self, capacity: int, max_age_s: float, tag: str | None = None) -> None:
        tag = tag or os.urandom(4).hex()  # tells this process's ids from another replica's
        if capacity < 1 or not max_age_s > 0 or not re.fullmatch(r"[0-9a-f]{1,16}", tag):
            raise ValueError(f"capacity >= 1, max_age_s > 0, a hex tag expected, got {capacity}, {max_age_s}, {tag!r}")
        self.capacity, self.max_age_s, self.tag = capacity, max_age_s, tag
        self._decisions: dict[int, _Decision] = {}  # sequence numbers _oldest … _next - 1, in order
        self._oldest = self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._decisions)

    def remember(self, edits: Sequence[Edit], now: float, traced: bool = False) -> str:
        """Store a decision's edits (made at time `now`, seconds) and return its id."""
        packed = b"".join(_EDIT.pack(e.action == "expand", e.lod_before, _CAUSE_CODES[e.cause], e.score) for e in edits)
        with self._lock:
            sequence = self._next
            self._next += 1
            self._decisions[sequence] = _Decision(now, packed, traced)
            self._evict(now)
        return f"{self.tag}-{sequence:x}"

    def _evict(self, now: float) -> None:
        decisions, oldest_allowed = self._decisions, now - self.max_age_s
        while decisions and (len(decisions) > self.capacity or decisions[self._oldest].created < oldest_allowed):
            del decisions[self._oldest]
            self._oldest += 1

    def match(self, items: Sequence[tuple[str, int]], now: float) -> tuple[list[Result], Matched]:
        """Look up (decision_id, edit index) pairs at time `now`: one result per item, and the
        matched edits. A matched edit is marked, so the same pair later counts as a duplicate."""
        results: list[Result] = []
        found: list[tuple[int, int, int, int, float, bool]] = []
        tag, size, unpack = self.tag, _EDIT.size, _EDIT.unpack_from
        with self._lock:
            self._evict(now)
            decisions, oldest = self._decisions, self._oldest
            for k, (decision_id, index) in enumerate(items):
                form = _ID.fullmatch(decision_id)  # exactly as `remember` writes them (no leading zeros …)
                sequence = int(form[2], 16) if form and form[1] == tag else -1
                decision = decisions.get(sequence)
                if decision is None:
                    results.append("expired_decision" if 0 <= sequence < oldest else "unknown_decision")
                elif not 0 <= index < len(decision.edits) // size:
                    results.append("bad_index")
                elif decision.seen >> index & 1:
                    results.append("duplicate")
                else:
                    decision.seen |= 1 << index
                    found.append((k, *unpack(decision.edits, index * size), decision.traced))
                    results.append("matched")
        columns = list(zip(*found, strict=True)) or [()] * 6
        item, expand, lod, cause, score, traced = columns
        matched = Matched(
            item=np.array(item, dtype=np.int64),
            expand=np.array(expand, dtype=bool),
            lod=np.array(lod, dtype=np.int64),
            score=np.array(score, dtype=np.float64),
            cause=np.array(cause, dtype=np.int64),
            traced=np.array(traced, dtype=bool),
        )
        return results, matched
