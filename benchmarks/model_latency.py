"""The model stage: `session.run` of the artifact graphs beside torch eager, with peak memory.

For each D (256: the bundled model; 1,280: a random-init export of the training repo's depth-20
width, 10 heads, cached in .bench/) and N it times, in one process and interleaved run by run:
- each graph ONNX Runtime can run here, with the service's own session options
  (`service.runtime.create_session`): fp32 on the CPU; fp16 and fp32 on CUDA when available;
- torch eager of the same module and weights (`model_export.lensnet`, attention by
  `scaled_dot_product_attention`), fp32 on the CPU, the same thread count (one per core, stated
  in the report's `threads`);
and reports p50/p90/p99/max, the ratio torch p50 / ORT p50 (> 1: ORT is faster), and how much
each run raised the process's peak RSS (VmHWM, reset before each run through
/proc/self/clear_refs). With `--profile` the largest N is also profiled by operator type.

    python -m benchmarks.model_latency [--dims 256 1280] [--sizes 512 2048 8192 16384]
                                       [--runs 10] [--profile] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from lensnet_client import synthetic_layout
from model_export.artifact import Manifest, load_manifest
from model_export.lensnet import LensNet, init_random
from service.runtime import CPU, CUDA, create_session

from . import provenance
from .latency import model_dir, percentiles

SIZES = (512, 2048, 8192, 16384)
DIMS = (256, 1280)
TARGET_CPU_SPEEDUP = 1.0  # at N = 8,192, D = 256: at least as fast as torch eager (aim: 1.5)
TARGET_CPU_PEAK_MIB = 1024  # peak RSS after one N = 8,192, D = 256 request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="model widths D")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="WC lengths N")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per configuration below N = 8,192")
    parser.add_argument("--profile", action="store_true", help="per-operator time at the largest N")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    about = provenance(onnxruntime=ort.__version__, torch=torch.__version__)  # read before the runs, not after
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    results = [row for d in args.dims for row in measure_dim(d, args.sizes, args.runs, args.profile, threads)]
    report = {
        "benchmark": "model_latency",
        **about,
        "threads": {"onnxruntime_intra_op": threads, "torch": torch.get_num_threads()},
        "results": results,
        "targets": targets(results),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def measure_dim(d: int, sizes: list[int], runs: int, profile: bool, threads: int) -> list[dict[str, Any]]:
    """Rows for width `d`; ONNX Runtime gets `threads` intra-op threads, as torch does (set in main)."""
    path = model_dir(d)
    manifest = load_manifest(path)
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed or 0).eval()
    cuda = CUDA in ort.get_available_providers()
    engines: dict[str, tuple[Callable[[dict[str, np.ndarray]], Any], str]] = {}
    for provider, precision in [(CPU, "fp32")] + ([(CUDA, "fp16"), (CUDA, "fp32")] if cuda else []):
        providers = [provider] if provider == CPU else [provider, CPU]
        session = create_session(path / manifest.graphs[precision].file, providers, threads, False)
        engines[f"ort-{precision}-{provider.removesuffix('ExecutionProvider').lower()}"] = (
            _ort_run(session),
            precision,
        )
    engines["torch-eager-fp32-cpu"] = (_torch_run(model), "fp32")
    rows = []
    for n in sizes:
        feed = _feed(manifest, n)
        count = runs if n < 8192 else max(3, runs // 3)
        times: dict[str, list[float]] = defaultdict(list)
        peaks: dict[str, int] = defaultdict(int)
        for run, precision in engines.values():
            run(_cast(feed, precision))  # warm-up: allocations, kernel choice
        for _ in range(count):  # interleaved: every engine sees the same machine state
            for name, (run, precision) in engines.items():
                ms, grown = _timed(run, _cast(feed, precision))
                times[name].append(ms)
                peaks[name] = max(peaks[name], grown)
        torch_p50 = float(np.median(times["torch-eager-fp32-cpu"]))
        for name, (_, precision) in engines.items():
            row: dict[str, Any] = {"d": d, "n": n, "engine": name, "attention": _attention(manifest, name, precision)}
            row |= {"runs": count, "ms": percentiles(times[name]), "peak_rss_growth_mib": round(peaks[name] / 2**20, 1)}
            if name.startswith("ort"):
                row["torch_over_ort_p50"] = round(torch_p50 / float(np.median(times[name])), 3)
                if profile and n == max(sizes):
                    providers = [CPU] if name.endswith("cpu") else [CUDA, CPU]
                    row["profile"] = profile_ops(
                        path / manifest.graphs[precision].file, providers, _cast(feed, precision)
                    )
            rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The CPU targets of the fused-attention issue, at N = 8,192 and D = 256, when measured."""
    row = next((r for r in rows if (r["d"], r["n"], r["engine"]) == (256, 8192, "ort-fp32-cpu")), None)
    if row is None:
        return {}
    return {
        "cpu_speedup_vs_torch_8k": {"target": TARGET_CPU_SPEEDUP, "measured": row["torch_over_ort_p50"],
                                    "met": row["torch_over_ort_p50"] >= TARGET_CPU_SPEEDUP},
        "cpu_peak_rss_growth_mib_8k": {"target": TARGET_CPU_PEAK_MIB, "measured": row["peak_rss_growth_mib"],
                                       "met": row["peak_rss_growth_mib"] <= TARGET_CPU_PEAK_MIB},
    }  # fmt: skip


def _ort_run(session: ort.InferenceSession) -> Callable[[dict[str, np.ndarray]], Any]:
    return lambda feed: session.run(None, feed)


def _torch_run(model: LensNet) -> Callable[[dict[str, np.ndarray]], Any]:
    def run(feed: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            return model(*(torch.from_numpy(feed[k]) for k in ("embeddings", "lod", "positions")))

    return run


def _feed(manifest: Manifest, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    lod, positions = synthetic_layout(n, manifest.config.block_size, manifest.config.max_lod, rng)
    embeddings = rng.standard_normal((1, n, manifest.config.embed_dim)).astype(np.float32)
    return {"embeddings": embeddings, "lod": lod[None], "positions": positions[None]}


def _cast(feed: dict[str, np.ndarray], precision: str) -> dict[str, np.ndarray]:
    return feed if precision == "fp32" else {**feed, "embeddings": feed["embeddings"].astype(np.float16)}


def _attention(manifest: Manifest, engine: str, precision: str) -> str:
    return manifest.graphs[precision].attention if engine.startswith("ort") else "torch-sdpa"  # type: ignore[index]


def _timed(run: Callable[[dict[str, np.ndarray]], Any], feed: dict[str, np.ndarray]) -> tuple[float, int]:
    """Milliseconds of one run, and how far it raised the peak RSS above the RSS before it."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    run(feed)
    ms = (time.perf_counter() - start) * 1e3
    return ms, _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def profile_ops(graph: Path, providers: list[str], feed: dict[str, np.ndarray], runs: int = 2) -> dict[str, Any]:
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
    ranked = sorted(by_op.items(), key=lambda item: -item[1])
    return {"runs": runs, "kernel_ms_per_run": round(sum(by_op.values()), 3),
            "by_op_ms": {op: round(ms, 3) for op, ms in ranked[:12]}}  # fmt: skip


if __name__ == "__main__":
    main()
