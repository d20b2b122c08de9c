"""The request's stage clock: consecutive named stages from one arrival, so that they add up.

Each stage runs from the end of the previous one, so the stages' sum is the time since arrival
by construction: no gap between two stages goes unnamed. A stage named twice (the hand-off to
the worker thread and back) accumulates.
"""

from __future__ import annotations

import time

# In request order. `handoff` is the event loop ↔ inference thread hand-off (both ways);
# `respond` (building and writing the response) is known only after the last byte is sent, so it
# reaches the metrics but not the Server-Timing header, which leaves before the body.
STAGES = (
    "admit", "receive", "queue", "handoff", "decode", "apply", "model", "allocate", "telemetry", "encode", "respond",
)  # fmt: skip


class StageClock:
    """Times consecutive stages (seconds) of one request, from its arrival (a perf_counter time)."""

    __slots__ = ("arrival", "last", "timings")

    def __init__(self, arrival: float) -> None:
        self.arrival = self.last = arrival
        self.timings: dict[str, float] = {}

    def done(self, stage: str) -> float:
        """End `stage` now (adding to its time if it ran before); returns the time (perf_counter)."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + (now - self.last)
        self.last = now
        return now

    @property
    def elapsed(self) -> float:
        """Arrival to the end of the last stage: the stages' sum."""
        return self.last - self.arrival

    def overhead(self) -> float:
        """The time beside the model: the stages' sum minus the model stage."""
        return self.elapsed - self.timings.get("model", 0.0)
