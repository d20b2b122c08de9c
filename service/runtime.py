"""The ONNX Runtime backend: one session over the artifact graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_export.artifact import GRAPH_DTYPES, Manifest, Precision

log = logging.getLogger("lensnet.runtime")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def choose(precision: str, available: list[str]) -> tuple[Precision, list[str]]:
    """`auto` = the fp16 graph on CUDA when ONNX Runtime has it, else fp32 on CPU."""
    cuda = CUDA in available
    chosen: Precision = ("fp16" if cuda else "fp32") if precision == "auto" else precision  # type: ignore[assignment]
    return chosen, [CUDA, CPU] if cuda else [CPU]


class Scorer:
    """Scores one snapshot per call. Thread-safe: ONNX Runtime sessions allow concurrent `run`."""

    def __init__(
        self, model_dir: Path, manifest: Manifest, precision: str, intra_op_threads: int = 0, spinning: bool = False
    ) -> None:
        available = ort.get_available_providers()
        if CUDA in available and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed that way
        self.precision, providers = choose(precision, available)
        threads = (intra_op_threads, spinning)
        self.session = self._session(model_dir / manifest.graphs[self.precision].file, providers, *threads)
        if precision == "auto" and providers[0] == CUDA and self.session.get_providers()[0] != CUDA:
            # ONNX Runtime lists CUDA but could not start it (driver, libraries): the fp16 graph
            # would run on the CPU, slowly; auto means the CPU's graph there.
            log.warning("the CUDA execution provider did not start; running fp32 on the CPU")
            self.precision = "fp32"
            self.session = self._session(model_dir / manifest.graphs["fp32"].file, [CPU], *threads)
        self.provider = self.session.get_providers()[0]
        self.input_dtype = np.dtype(GRAPH_DTYPES[self.precision])
        self.config = manifest.config
        log.info("loaded %s (%s) on %s", manifest.graphs[self.precision].file, self.precision, self.provider)

    @staticmethod
    def _session(graph: Path, providers: list[str], intra_op_threads: int, spinning: bool) -> ort.InferenceSession:
        """Idle intra-op threads spin-wait for work by default; between requests that keeps a core
        busy that the event loop needs (on 2 cores: receiving the next body took ~2x as long)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(graph), options, providers=providers)

    def score(self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings `[N, D]` in `input_dtype`, int64 `lod`/`positions` `[N]` → float32 scores `[N]`
        and, per entry, whether its embedding holds NaN/inf (checked inside the graph)."""
        feed = {"embeddings": embeddings[None], "lod": lod[None], "positions": positions[None]}
        scores, non_finite = self.session.run(["scores", "non_finite"], feed)
        return scores[0], non_finite[0]
