"""Raw `session.run` latency of the artifact graphs, per execution provider and precision.

N = 512, 2,048, 8,192 for the bundled model (D = 256) and a D = 512 random-init export; fp32 on
the CPU provider always, fp16 and fp32 on CUDA when ONNX Runtime has it (the GPU check of the
export issue). With `--profile`, each configuration at the largest N is also run under ONNX
Runtime's profiler and the report lists where its time goes, by operator type (host⇄device
copies included). Prints JSON.

    python -m benchmarks.model_latency [--runs 20] [--sizes 8192] [--profile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lensnet_client import synthetic_layout
from model_export.artifact import load_manifest

from .latency import model_dir, percentiles

SIZES = (512, 2048, 8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per configuration (after 2 warm-ups)")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="WC lengths N")
    parser.add_argument("--profile", action="store_true", help="per-operator time at the largest N")
    args = parser.parse_args()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    targets = [("CPUExecutionProvider", "fp32")] + (
        [("CUDAExecutionProvider", p) for p in ("fp16", "fp32")] if cuda else []
    )
    results = []
    for d in (256, 512):
        path = model_dir(d)
        manifest = load_manifest(path)
        for provider, precision in targets:
            providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
            session = ort.InferenceSession(str(path / manifest.graphs[precision].file), providers=providers)
            dtype = np.float16 if precision == "fp16" else np.float32
            for n in args.sizes:
                rng = np.random.default_rng(n)
                lod, positions = synthetic_layout(n, manifest.config.block_size, manifest.config.max_lod, rng)
                feed = {
                    "embeddings": rng.standard_normal((1, n, d)).astype(dtype),
                    "lod": lod[None],
                    "positions": positions[None],
                }
                runs = args.runs if provider != "CPUExecutionProvider" or n < 8192 else max(3, args.runs // 4)
                for _ in range(2):
                    session.run(None, feed)
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times.append((time.perf_counter() - start) * 1e3)
                results.append({"d": d, "n": n, "provider": provider, "precision": precision, "runs": runs,
                                "session_run_ms": percentiles(times)})  # fmt: skip
                if args.profile and n == max(args.sizes):
                    graph = path / manifest.graphs[precision].file
                    results[-1]["profile"] = profile(graph, providers, feed, max(3, runs // 4))
    print(json.dumps({"benchmark": "model_latency", "onnxruntime": ort.__version__, "results": results}, indent=2))


def profile(graph: Path, providers: list[str], feed: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    """Mean ms per run by operator type under ONNX Runtime's profiler, largest first."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as directory:
        options.profile_file_prefix = str(Path(directory) / "lensnet")
        session = ort.InferenceSession(str(graph), options, providers=providers)
        session.run(None, feed)  # warm-up (its events are skipped below)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_timed = runs_seen[1]["ts"] if len(runs_seen) > 1 else 0
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= first_timed:
            by_op[event["args"].get("op_name", "?")] += event["dur"] / 1e3 / runs
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda item: -item[1])
    return {
        "runs": runs,
        "kernel_ms_per_run": round(total, 3),
        "by_op_ms": {op: round(ms, 3) for op, ms in ranked[:12]},
        "model_run_ms": percentiles([e["dur"] / 1e3 for e in runs_seen[1:]]),
    }


if __name__ == "__main__":
    main()
