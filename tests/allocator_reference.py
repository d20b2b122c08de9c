"""The allocator rules (service/core/allocator.py's docstring) written out literally: plain Python
loops, sets and full sorts, no shortcuts. Slow, and the oracle the C core is checked against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.core.allocator import REJECT_REASONS, AllocatorOptions, HistoryItem


def reference_allocate(
    lod: Sequence[int], positions: Sequence[int], scores: Sequence[float], o: AllocatorOptions,
    history: Sequence[HistoryItem] = (),
) -> dict[str, Any]:  # fmt: skip
    """Edits as (action, index, cause, score) by index, the length after, and every counter."""
    b, top, n = o.block_size, o.max_lod, len(lod)
    lod, pos = [int(x) for x in lod], [int(x) for x in positions]

    # 2. Clamp (on the float32 scores).
    clamped, clamped_expand, clamped_collapse = [], 0, 0
    for level, raw in zip(lod, np.asarray(scores, dtype=np.float32).tolist(), strict=True):
        if level == 0 and raw > 0:
            clamped_expand, raw = clamped_expand + 1, 0.0
        elif level == top and raw < 0:
            clamped_collapse, raw = clamped_collapse + 1, 0.0
        clamped.append(raw + 0.0)

    # 3. Candidates, protection, hysteresis.
    recent = [(h.action, h.lod, h.position) for h in history if h.age <= o.cooldown_steps]
    no_expand = {(level, p) for action, level, p in recent if action == "collapse"}
    no_collapse = {(level, p) for action, level, p in recent if action == "expand"}
    groups = [
        (i, lod[i])
        for i in range(n - b + 1)
        if lod[i] < top and pos[i] % b ** (lod[i] + 1) == 0 and all(lod[k] == lod[i] for k in range(i, i + b))
    ]
    group_of = {k: g for g, (i, _) in enumerate(groups) for k in range(i, i + b)}
    block = []
    for i, _ in groups:
        children = clamped[i : i + b]
        if o.aggregation == "mean":
            total = 0.0
            for child in children:
                total += child
            block.append(total / b)
        else:
            block.append(max(children) if o.aggregation == "max" else min(children))
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    end_token = pos[-1] + b ** lod[-1]
    legal = []
    cooling = 0
    for g, (i, level) in enumerate(groups):
        if pos[i] + b ** (level + 1) > end_token - o.protect_recent:
            rejected["protected"] += 1
        elif (level + 1, pos[i]) in no_collapse:
            rejected["cooldown"] += 1
            cooling += 1
        else:
            legal.append(g)
    least_useful = sorted(legal, key=lambda g: (block[g], g))
    wants = []
    for i in range(n):
        if lod[i] >= 1:
            if (lod[i], pos[i]) in no_expand:
                rejected["cooldown"] += 1
            elif clamped[i] >= o.tau_expand:
                wants.append(i)
            else:
                rejected["threshold"] += 1

    length, edits_left, chosen = n, o.max_edits, []
    collapsed: set[int] = set()
    expanded_in: set[int] = set()

    def collapse(g: int, cause: str) -> None:
        nonlocal length, edits_left
        collapsed.add(g)
        chosen.append(("collapse", groups[g][0], cause, block[g]))
        length, edits_left = length - (b - 1), edits_left - 1

    def expand(i: int) -> None:
        nonlocal length, edits_left
        if i in group_of:
            expanded_in.add(group_of[i])
        chosen.append(("expand", i, "threshold", clamped[i]))
        length, edits_left = length + (b - 1), edits_left - 1

    def offer_collapse(g: int) -> None:
        if g in collapsed:
            return
        if g in expanded_in:
            rejected["overlap"] += 1
        else:
            collapse(g, "threshold")

    # 4. Budget.
    need = max(0, -(-(n - o.w_max) // (b - 1)))
    for g in least_useful[: min(need, o.max_edits)]:
        collapse(g, "budget")
    budget_short = length > o.w_max
    remaining = least_useful[min(need, o.max_edits) :]

    # 5. Voluntary edits, strongest first; ties: lower index, then collapse first.
    queue = sorted(
        [(-clamped[i], 2 * i + 1, "expand", i) for i in wants]
        + [(block[g], 2 * groups[g][0], "collapse", g) for g in remaining if block[g] <= -o.tau_collapse]
    )
    limit = o.w_max - (b - 1)
    reached = 0
    for _, _, action, x in queue:
        if edits_left == 0 or (action == "expand" and edits_left == 1 and length > limit):
            break
        reached += 1
        own = group_of.get(x) if action == "expand" else None
        if action == "collapse":
            offer_collapse(x)
        elif own is not None and own in collapsed:
            rejected["overlap"] += 1
        elif length <= limit:
            expand(x)
        else:
            room = [
                g for g in least_useful
                if block[g] < clamped[x] and g != own and g not in collapsed and g not in expanded_in
            ]  # fmt: skip
            if room:
                collapse(room[0], "make_room")
                expand(x)
            else:
                rejected["budget"] += 1

    # 6. What was never reached: expansions first (by the state at the stop), then collapses in order.
    unreached = queue[reached:]
    for _, _, action, x in unreached:
        if action == "expand":
            rejected["overlap" if group_of.get(x) in collapsed else "max_edits"] += 1
    for _, _, action, g in unreached:
        if action == "collapse":
            if edits_left:
                offer_collapse(g)
            elif g in expanded_in:
                rejected["overlap"] += 1
            elif g not in collapsed:
                rejected["max_edits"] += 1
    rejected["threshold"] += sum(1 for g in remaining if block[g] > -o.tau_collapse and g not in collapsed)

    return {
        "edits": sorted(chosen, key=lambda edit: edit[1]),
        "length_after": length,
        "budget_short_after_budget_step": budget_short,
        "need": need,
        "legal": len(legal),
        "cooling": cooling,
        "candidates": (sum(1 for level in lod if level >= 1), len(groups)),
        "clamped": (clamped_expand, clamped_collapse),
        "rejected": rejected,
    }
