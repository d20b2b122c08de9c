"""Memory of the serving process per WC length: the real service, one fresh process per (D, N).

Each process starts with the service's defaults (`--warmup-sizes [64]`, so the warm-up adds
nothing large), is sent two /v1/focus requests of N entries (binary, float16) by the Python
client, and reports from /proc/<pid>/status: RSS when ready, peak RSS (VmHWM) and RSS after each
request. The second request shows whether memory is reused (RSS stays) or grows. Runs at or
above `--arena-shrink-entries` (default 8,192) hand the arena's free memory back afterwards.

    python -m benchmarks.memory [--dims 256 1280] [--sizes 512 2048 8192 16384 32768] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lensnet_client import FocusClient, synthetic_layout

from . import provenance
from .latency import REPO, free_port, model_dir

SIZES = (512, 2048, 8192, 16384, 32768)
DIMS = (256, 1280)
TARGET_PEAK_MIB_8K = 1024  # D = 256: peak RSS of the serving process after one N = 8,192 request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    about = provenance()  # the code measured: read before the runs, not after
    results = [measure(d, n) for d in args.dims for n in args.sizes]
    row = next((r for r in results if (r["d"], r["n"]) == (256, 8192)), None)
    report: dict[str, Any] = {
        "benchmark": "memory",
        **about,
        "results": results,
    }
    if row:
        report["targets"] = {"peak_rss_mib_8k_d256": {"target": TARGET_PEAK_MIB_8K, "measured": row["peak_mib"],
                                                      "met": row["peak_mib"] <= TARGET_PEAK_MIB_8K}}  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def measure(d: int, n: int) -> dict[str, Any]:
    """One fresh service process on the D model: RSS ready, peak and after each of two N requests."""
    path = model_dir(d)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "--port", str(port), "--model-dir", str(path),
               "--warmup-sizes", "[64]", "--max-entries", str(max(n, 32768)),
               "--max-body-bytes", str(4 * n * d + (1 << 20)), "--log-level", "warning"]  # fmt: skip
    rng = np.random.default_rng(n)
    lod, positions = synthetic_layout(n, 32, 2, rng)
    embeddings = rng.standard_normal((n, d)).astype(np.float16)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO)
        try:
            _wait_ready(url, process)
            ready = _status(process.pid)
            after = []
            with FocusClient(url, timeout=600) as client:
                for _ in range(2):
                    started = time.perf_counter()
                    client.focus(embeddings, lod, positions, w_max=n)
                    after.append((_status(process.pid), time.perf_counter() - started))
        finally:
            process.terminate()
            process.wait(timeout=60)
    mib = 1 / 2**20
    return {
        "d": d,
        "n": n,
        "ready_mib": round(ready["VmRSS"] * mib, 1),
        "peak_mib": round(after[-1][0]["VmHWM"] * mib, 1),
        "peak_growth_mib": round((after[-1][0]["VmHWM"] - ready["VmRSS"]) * mib, 1),
        "after_first_mib": round(after[0][0]["VmRSS"] * mib, 1),
        "after_second_mib": round(after[1][0]["VmRSS"] * mib, 1),
        "request_s": [round(seconds, 3) for _, seconds in after],
    }


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the service exited before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not become ready")


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


if __name__ == "__main__":
    main()
