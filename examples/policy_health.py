"""Worked example: feedback whose benefit is a known function of the scores, and the gauges' answer.

Against a running service (README, "Policy health"):

    .venv/bin/python -m examples.policy_health --url http://127.0.0.1:8000

It makes focus steps on random WCs until it holds `--edits` edits, then sends, for each, the
ΔNLL a serving stack would have measured if the detail benefit were y = k·x + noise (x: the
edit's driving score; expand: ΔNLL = −y, collapse: ΔNLL = +y). First a healthy policy (k > 0),
then a polarity-flipped one (k < 0, the review's bug); after each it prints the service's
correlation gauges next to numpy/scipy's on the same samples.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np

from lensnet_client import FocusClient, synthetic_layout


@dataclass(frozen=True)
class Sent:
    """The matched feedback of one run, as the service's windows saw it (in order)."""

    expand: np.ndarray
    x: np.ndarray
    y: np.ndarray


def collect_edits(client: FocusClient, wanted: int, rng: np.random.Generator, n: int = 384) -> tuple[list[tuple], int]:
    """Focus steps over random WCs of `n` entries until `wanted` edits: (decision_id, index, edit)
    each, and how many focus requests it took."""
    model = client.model()
    found: list[tuple] = []
    steps = 0
    while len(found) < wanted:
        lod, positions = synthetic_layout(n, model["block_size"], model["max_lod"], rng)
        embeddings = rng.standard_normal((n, model["embed_dim"])).astype(np.float16)
        result = client.focus(embeddings, lod, positions, w_max=n // 4, max_edits=64)
        found += [(result.decision_id, k, edit) for k, edit in enumerate(result.edits)]
        steps += 1
    return found[:wanted], steps


def send_feedback(client: FocusClient, edits: list[tuple], k: float, noise: float, rng: np.random.Generator,
                  batch: int = 100) -> Sent:  # fmt: skip
    """Send ΔNLL for every edit with benefit y = k·x + N(0, noise²); every item must match."""
    expand = np.array([edit.action == "expand" for _, _, edit in edits])
    x = np.array([edit.score for _, _, edit in edits], dtype=np.float64)
    y = k * x + rng.normal(0.0, noise, x.size)
    delta_nll = np.where(expand, -y, y)  # expanding helps when NLL falls; collapsing hurts when it rises
    items = [(decision_id, index, d) for (decision_id, index, _), d in zip(edits, delta_nll.tolist(), strict=True)]
    for start in range(0, len(items), batch):
        results = client.feedback(items[start : start + batch])
        assert set(results) == {"matched"}, results
    return Sent(expand, x, y)


def gauges(client: FocusClient) -> dict[str, float]:
    """The service's lensnet_policy_correlation* samples, by their exposition name."""
    text = client.http.get("/metrics").text
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name.startswith("lensnet_policy_correlation")
    }


def main() -> None:
    from scipy import stats  # the reference the gauges are compared with

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--edits", type=int, default=1000, help="edits per run, >= the service's count window")
    parser.add_argument("--noise", type=float, default=0.3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with FocusClient(args.url, timeout=60) as client:
        for label, k in (("healthy", 1.0), ("flipped", -1.0)):
            sent = send_feedback(client, collect_edits(client, args.edits, rng)[0], k, args.noise, rng)
            shown = gauges(client)
            window = int(shown['lensnet_policy_correlation_samples{action="all",window="count"}'])
            assert window <= len(sent.x), "--edits must be at least --correlation-window-count"
            reference = stats.spearmanr(sent.x[-window:], sent.y[-window:]).statistic
            print(json.dumps({
                "run": label, "k": k, "edits": len(sent.x),
                "service": {"spearman_all_count": shown['lensnet_policy_correlation{action="all",method="spearman",'
                                                         'window="count"}'], "samples": window},
                "scipy_same_window": reference,
                "gauges": shown,
            }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
