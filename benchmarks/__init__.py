"""Benchmarks: each prints one JSON report on stdout (see the README for the commands).

Shared by them: `percentiles`, which quotes only the percentiles its sample count supports,
`p50_ratio_interval`, the interval of a ratio measured side by side, and `provenance`, what every
report records about the run (commit, dirty checkout, command, machine).
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUANTILES = (50, 90, 95, 99)


def min_samples(q: float) -> int:
    """Samples needed to quote the q-th percentile: enough that one is expected beyond it,
    n × (1 - q/100) >= 1 (p50: 2, p90: 10, p95: 20, p99: 100); with fewer it would be the max."""
    return math.ceil(round(100 / (100 - q), 9))


def percentiles(values: Sequence[float], digits: int = 4) -> dict[str, float | int]:
    """`samples`, each percentile of QUANTILES that many samples support (`min_samples`), and `max`."""
    v = np.asarray(values, dtype=np.float64)
    summary: dict[str, float | int] = {"samples": int(v.size)}
    if v.size:
        quoted = [q for q in QUANTILES if v.size >= min_samples(q)]
        summary |= {f"p{q}": round(float(np.percentile(v, q)), digits) + 0.0 for q in quoted}  # + 0.0: no -0.0
        summary["max"] = round(float(v.max()), digits) + 0.0
    return summary


def p50_ratio_interval(top: Sequence[Sequence[float]], bottom: Sequence[Sequence[float]], seed: int = 1) -> list[float]:
    """95 % bootstrap interval of p50(top) / p50(bottom) over paired groups: `top[k]` and
    `bottom[k]` ran side by side (interleaved or back to back), so whole pairs, not single samples,
    are resampled and noise shared by a pair moves both medians together (conservative where the
    two medians fall in different pairs)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(2000):
        chosen = rng.integers(0, len(top), len(top))
        ratios.append(np.median(np.concatenate([top[k] for k in chosen]))
                      / np.median(np.concatenate([bottom[k] for k in chosen])))  # fmt: skip
    return [float(v) for v in np.percentile(ratios, [2.5, 97.5])]


def git_commit() -> str:
    """The checkout's commit (`git rev-parse HEAD`), for a report's provenance."""
    return _git("rev-parse", "HEAD") or "unknown"


CHANGED_CODE = ("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/reports")
"""Tracked files that differ from the commit, reports aside: a rerun rewrites the reports of the
folder it writes to, and a report is no code it measures."""


def provenance(**versions: str) -> dict[str, Any]:
    """What a report must record to be reproduced: the commit and whether tracked files differ
    from it, the exact command line, and the machine (`versions`: libraries the benchmark measures).
    Call it before the runs: it names the code that was measured."""
    carried = os.environ.get("LENSNET_SOURCE_COMMIT")  # a copy without .git (benchmarks/device/run.sh)
    return {
        "commit": carried.removesuffix("+dirty") if carried else git_commit(),
        "dirty": carried.endswith("+dirty") if carried else bool(_git(*CHANGED_CODE)),
        "command": shlex.join(sys.orig_argv),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            **versions,
        },
    }


def _git(*args: str) -> str:
    found = subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=REPO)
    return found.stdout.strip()


def _cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor())
