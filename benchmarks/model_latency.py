"""Raw `session.run` latency of the artifact graphs, per execution provider and precision.

N = 512, 2,048, 8,192 for the bundled model (D = 256) and a D = 512 random-init export; fp32 on
the CPU provider always, fp16 and fp32 on CUDA when ONNX Runtime has it (the GPU check of the
export issue). Prints JSON.

    python -m benchmarks.model_latency [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

from lensnet_client import synthetic_layout
from service.artifact import load_manifest

from .latency import model_dir, percentiles

SIZES = (512, 2048, 8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per configuration (after 2 warm-ups)")
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
            for n in SIZES:
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
    print(json.dumps({"benchmark": "model_latency", "onnxruntime": ort.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
