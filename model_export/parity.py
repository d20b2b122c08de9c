"""Parity of exported graphs against the PyTorch module, measured at export time.

On random valid WCs (mixed LODs; N = 1, a length that is no multiple of B, large N up to 8,192,
and one batched case): fp32 ONNX vs PyTorch fp32, and fp16 ONNX vs fp32 ONNX (max |Δ| and score
sign agreement on entries the fp32 graph scores with |s| > 0.05). ONNX Runtime CPU EP. A graph
whose attention writes out N x N scores there (the causal fp16 graph, built for CUDA) is run
only where they stay within WRITTEN_OUT_MAX_BYTES, so the export's memory does not grow with N².
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lensnet_client.layout import synthetic_layout
from model_export.artifact import CPU_PROVIDER, ParityBounds, ParityCase, ParityReport, Precision

from .config import PARITY_SIZES
from .lensnet import LensNet

BATCHED_CASE = (3, 300)  # (batch, n): checks the dynamic batch axis
WRITTEN_OUT_MAX_BYTES = 256 << 20
"""Largest batch x heads x N² fp32 scores a written-out graph may need in a parity run (demo model,
4 heads: up to N = 4,096)."""


def parity_inputs(model: LensNet, batch: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of random valid snapshots with N(0, 1) fp32 embeddings."""
    cfg = model.config
    layouts = [synthetic_layout(n, cfg.block_size, cfg.max_lod, rng) for _ in range(batch)]
    return {
        "embeddings": rng.standard_normal((batch, n, cfg.embed_dim), dtype=np.float32),
        "lod": np.stack([lod for lod, _ in layouts]),
        "positions": np.stack([pos for _, pos in layouts]),
    }


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=[CPU_PROVIDER])


def sign_agreement(reference: np.ndarray, candidate: np.ndarray, min_abs: float) -> tuple[float, int]:
    """Share of entries with |reference| > min_abs where both scores have the same sign."""
    mask = np.abs(reference) > min_abs
    count = int(mask.sum())
    if count == 0:
        return 1.0, 0
    return float((np.sign(reference[mask]) == np.sign(candidate[mask])).mean()), count


def measure_parity(
    model: LensNet,
    graphs: dict[Precision, Path],
    sizes: Sequence[int] = PARITY_SIZES,
    seed: int = 0,
    bounds: ParityBounds | None = None,
    fp16_written_out: bool = False,
) -> ParityReport:
    """`fp16_written_out`: the fp16 graph's attention writes out N x N scores on the CPU EP."""
    bounds = bounds or ParityBounds()
    rng = np.random.default_rng(seed)
    sessions = {precision: cpu_session(path) for precision, path in graphs.items()}
    cases = []
    shapes = [(1, n) for n in sizes] + [BATCHED_CASE]
    smallest = min(shapes, key=lambda shape: shape[0] * shape[1] ** 2)  # run whatever the bound: one row at least
    for batch, n in shapes:
        feed = parity_inputs(model, batch, n, rng)
        with torch.no_grad():
            expected = model(*(torch.from_numpy(feed[k]) for k in ("embeddings", "lod", "positions"))).numpy()
        fp32 = sessions["fp32"].run(None, feed)[0]
        case = ParityCase(n=n, batch=batch, fp32_vs_torch_max_abs=float(np.abs(fp32 - expected).max()),
                          fp16_vs_fp32_max_abs=None, fp16_sign_agreement=None, fp16_sign_entries=None)  # fmt: skip
        scores_bytes = batch * model.config.num_heads * n * n * 4
        if not fp16_written_out or scores_bytes <= WRITTEN_OUT_MAX_BYTES or (batch, n) == smallest:
            fp16 = sessions["fp16"].run(None, {**feed, "embeddings": feed["embeddings"].astype(np.float16)})[0]
            agreement, entries = sign_agreement(fp32, fp16, bounds.sign_min_abs_score)
            case = case.model_copy(update={"fp16_vs_fp32_max_abs": float(np.abs(fp16 - fp32).max()),
                                           "fp16_sign_agreement": agreement, "fp16_sign_entries": entries})  # fmt: skip
        cases.append(case)
    measured = [c for c in cases if c.fp16_vs_fp32_max_abs is not None]  # the smallest case always is
    worst32 = max(c.fp32_vs_torch_max_abs for c in cases)
    worst16 = max(c.fp16_vs_fp32_max_abs for c in measured)  # type: ignore[type-var]
    sign = min(c.fp16_sign_agreement for c in measured)  # type: ignore[type-var]
    passed = (
        worst32 <= bounds.fp32_vs_torch_max_abs
        and worst16 <= bounds.fp16_vs_fp32_max_abs
        and sign >= bounds.fp16_sign_agreement
    )
    return ParityReport(
        bounds=bounds,
        cases=cases,
        fp32_vs_torch_max_abs=worst32,
        fp16_vs_fp32_max_abs=worst16,
        fp16_sign_agreement=sign,
        passed=passed,
    )
