"""The export of the bundled demo model, measured: wall time, peak resident memory, and whether
the graphs it writes are byte for byte the ones in git (the export is reproducible).

    python -m benchmarks.export [--out report.json]

Runs the README's rebuild command for `models/default` into a temporary directory, as a child
process, so that its peak RSS is the child's own (`getrusage(RUSAGE_CHILDREN)`).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model_export.artifact import load_manifest

from . import REPO, provenance

BUNDLED = REPO / "models" / "default"
# The README's rebuild command for the bundled model (its --out aside).
REBUILD = "--random-init --seed 0 --embed-dim 256 --name lensnet-demo --model-version 0.1.0-untrained --force"
FLAGS = shlex.split(REBUILD)
TARGET_PEAK_GIB = 4.0  # the export must not need ~10 GB (issue: "the export's peak memory bounded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = {"benchmark": "export", **provenance()}
    committed = load_manifest(BUNDLED)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "model"
        command = [sys.executable, "-m", "model_export", *FLAGS, "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"export failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        rebuilt = load_manifest(out)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    graphs = {
        name: {"sha256": rebuilt.files[name].sha256, "committed": entry.sha256,
               "identical": rebuilt.files[name].sha256 == entry.sha256}
        for name, entry in committed.files.items()
    }  # fmt: skip
    report |= {
        "export_command": " ".join(["lensnet-export", *FLAGS, "--out", "DIR"]),
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 2),
        "graphs": graphs,
        "parity": rebuilt.parity.model_dump(mode="json"),
        "log": done.stdout.strip().splitlines()[-1:],
        "targets": {"peak_rss_gib": TARGET_PEAK_GIB, "reproducible": True},
        "met": {
            "peak_rss_gib": peak / 2**30 <= TARGET_PEAK_GIB,
            "reproducible": all(graph["identical"] for graph in graphs.values()),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
