"""The ONNX Runtime backend: one session over the artifact graph, plus its embedding adapter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lensnet_client.layout import synthetic_layout
from service.artifact import GRAPH_DTYPES, Manifest, Precision, adapter_file

log = logging.getLogger("lensnet.runtime")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def choose(precision: str, available: list[str]) -> tuple[Precision, list[str]]:
    """`auto` = the fp16 graph on CUDA when ONNX Runtime has it, else fp32 on CPU."""
    cuda = CUDA in available
    chosen: Precision = ("fp16" if cuda else "fp32") if precision == "auto" else precision  # type: ignore[assignment]
    return chosen, [CUDA, CPU] if cuda else [CPU]


class Scorer:
    """Scores one snapshot per call. Thread-safe: ONNX Runtime sessions allow concurrent `run`."""

    def __init__(self, model_dir: Path, manifest: Manifest, precision: str, intra_op_threads: int = 0) -> None:
        self.precision, providers = choose(precision, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        graph = model_dir / manifest.graphs[self.precision].file
        self.session = ort.InferenceSession(str(graph), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_dtype = np.dtype(GRAPH_DTYPES[self.precision])
        other = "float32" if self.input_dtype == np.float16 else "float16"
        # Conversion runs on the CPU provider: the input is on the host either way.
        self.adapter = ort.InferenceSession(
            str(model_dir / adapter_file(other, self.input_dtype.name)), providers=[CPU]
        )
        self.config = manifest.config
        log.info("loaded %s (%s) on %s", graph.name, self.precision, self.provider)

    def prepare(self, embeddings: np.ndarray) -> np.ndarray:
        """`[N, D]` float16/float32 → `[1, N, D]` in the graph's dtype, converted at most once."""
        batch = embeddings[None]
        if batch.dtype != self.input_dtype:
            batch = self.adapter.run(None, {"x": batch})[0]
        return batch

    def score(self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared embeddings `[1, N, D]`, int64 `lod`/`positions` `[N]` → float32 scores `[N]`
        and, per entry, whether its embedding holds NaN/inf (checked inside the graph)."""
        feed = {"embeddings": embeddings, "lod": lod[None], "positions": positions[None]}
        scores, non_finite = self.session.run(["scores", "non_finite"], feed)
        return scores[0], non_finite[0]

    def warmup(self, sizes: list[int]) -> None:
        """Run each size once so the first real requests do not pay for allocation and tuning."""
        rng = np.random.default_rng(0)
        cfg = self.config
        for n in sizes:
            lod, positions = synthetic_layout(n, cfg.block_size, cfg.max_lod, rng)
            x = rng.standard_normal((1, n, cfg.embed_dim)).astype(self.input_dtype)
            self.score(x, lod, positions)
