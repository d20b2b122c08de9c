"""Rolling score↔benefit correlations: is the policy's score still pointing the right way?

Each matched feedback item gives x = the score that drove the edit, in the expand direction (an
expansion's entry score, a collapse's block score) and y = the detail benefit measured by the
serving stack (expand: −ΔNLL, collapse: +ΔNLL). A healthy policy has corr(x, y) > 0. Samples go
into bounded ring buffers, one by count (the last K samples) and one by time (the samples of the
last T seconds, at most C of them), per action and overall; Pearson and Spearman are computed
exactly over what a window holds, on demand (at scrape time), never per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["pearson", "spearman"]
WindowKind = Literal["count", "time"]
ACTIONS = ("expand", "collapse", "all")
METHODS: tuple[Method, ...] = ("pearson", "spearman")
WINDOWS: tuple[WindowKind, ...] = ("count", "time")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r in float64 (centred sums); NaN with fewer than 2 samples or a constant side."""
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()  # sums, not BLAS dot: no thread pool woken for a few µs of work
    denominator = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy)) / denominator if denominator > 0 else math.nan


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1…n, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    sorter = np.argsort(a)  # any order of ties gives them the same average
    inverse = np.empty(sorter.size, dtype=np.intp)
    inverse[sorter] = np.arange(sorter.size)
    ordered = a[sorter]
    first = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    dense = np.cumsum(first)[inverse]
    bounds = np.concatenate((np.flatnonzero(first), [first.size]))
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties handled as scipy does)."""
    if x.size < 2:
        return math.nan
    return pearson(average_ranks(x), average_ranks(y))


class RollingWindow:
    """The newest `capacity` (x, y) samples, and when they arrived; with `max_age_s`, only those
    younger than that count. Fixed memory: three float64 ring buffers."""

    def __init__(self, capacity: int, max_age_s: float | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1, got {capacity}")
        self.capacity, self.max_age_s = capacity, max_age_s
        self._x = np.empty(capacity)
        self._y = np.empty(capacity)
        self._t = np.empty(capacity)
        self._next = 0  # samples ever added; the ring position is _next % capacity
        self._size = 0

    def add(self, x: np.ndarray, y: np.ndarray, now: float) -> None:
        """Append samples (equal-length float arrays) that arrived at time `now` (seconds)."""
        if x.size > self.capacity:  # only the newest fit
            x, y = x[-self.capacity :], y[-self.capacity :]
        start = self._next % self.capacity
        head = min(x.size, self.capacity - start)  # up to the end of the ring, the rest from its start
        for ring, values in ((self._x, x), (self._y, y)):
            ring[start : start + head], ring[: x.size - head] = values[:head], values[head:]
        self._t[start : start + head], self._t[: x.size - head] = now, now
        self._next += x.size
        self._size = min(self._size + x.size, self.capacity)

    @property
    def added(self) -> int:
        """Samples ever added."""
        return self._next

    def samples(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """The window's samples, oldest first (copies)."""
        order = (self._next - self._size + np.arange(self._size)) % self.capacity
        if self.max_age_s is not None:
            order = order[self._t[order] > now - self.max_age_s]
        return self._x[order], self._y[order]


@dataclass(frozen=True, slots=True)
class Correlation:
    """One window's figures: sample count and both coefficients (NaN when undefined)."""

    action: str
    window: WindowKind
    samples: int
    pearson: float
    spearman: float


class PolicyCorrelation:
    """Count and time windows for expand, collapse and all edits together."""

    def __init__(self, count: int, seconds: float, time_capacity: int) -> None:
        self.windows = {
            (action, kind): RollingWindow(count) if kind == "count" else RollingWindow(time_capacity, seconds)
            for action in ACTIONS
            for kind in WINDOWS
        }
        # The last figures per window, by (samples ever added, samples held): not recomputed until
        # a sample arrives or ages out (an idle service's refreshes cost nothing).
        self._last: dict[tuple[str, WindowKind], tuple[tuple[int, int], Correlation]] = {}

    def add(self, expand: np.ndarray, x: np.ndarray, y: np.ndarray, now: float) -> None:
        """Add matched samples; `expand` (bool) says which were expansions (the rest collapses)."""
        for action, chosen in (("expand", expand), ("collapse", ~expand), ("all", None)):
            xs, ys = (x, y) if chosen is None else (x[chosen], y[chosen])
            if xs.size:
                for kind in WINDOWS:
                    self.windows[action, kind].add(xs, ys, now)

    def compute(self, now: float) -> list[Correlation]:
        """Every window's correlation as of `now` (exact, over its samples)."""
        result = []
        for (action, kind), window in self.windows.items():
            x, y = window.samples(now)
            key = (window.added, x.size)
            last = self._last.get((action, kind))
            if last is None or last[0] != key:
                last = self._last[action, kind] = key, Correlation(action, kind, x.size, pearson(x, y), spearman(x, y))
            result.append(last[1])
        return result


def benefit(expand: np.ndarray, delta_nll: np.ndarray) -> np.ndarray:
    """The detail benefit y of each edit: −ΔNLL for an expansion, +ΔNLL for a collapse."""
    return np.where(expand, -delta_nll, delta_nll)
