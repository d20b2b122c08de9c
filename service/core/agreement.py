"""Live vs shadow model on the same snapshot: do they score alike, and would they edit alike?

A candidate artifact (`--shadow-model-dir`) is vetted on real traffic before it takes it: for a
sampled focus request it scores the same snapshot, runs the same allocator with the same options
and history, and is compared with the live model here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lensnet_client.layout import Edit

from .correlation import pearson


@dataclass(frozen=True, slots=True)
class Agreement:
    correlation: float  # Pearson's r of the two models' per-entry scores (NaN if either is constant)
    sign_agreement: float  # share of entries whose scores have the same sign (0 counts as its own sign)
    live_edits: int  # edits the live model's scores led to
    shared_edits: int  # of those, how many the shadow's scores led to as well (same action, same index)


def compare(
    live: np.ndarray, shadow: np.ndarray, live_edits: Sequence[Edit], shadow_edits: Sequence[Edit]
) -> Agreement:
    """Compare two models' raw scores on one snapshot and the edits the allocator made from each."""
    live64, shadow64 = live.astype(np.float64), shadow.astype(np.float64)
    same_sign = float(np.mean(np.sign(live64) == np.sign(shadow64)))
    shadow_keys = {(edit.action, edit.index) for edit in shadow_edits}
    shared = sum((edit.action, edit.index) in shadow_keys for edit in live_edits)
    return Agreement(pearson(live64, shadow64), same_sign, len(live_edits), shared)
