"""GPU checks (CUDA execution provider): skipped cleanly on machines without one, like CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_export.artifact import load_manifest
from model_export.parity import cpu_session, parity_inputs, sign_agreement
from service.runtime import Scorer

from .live import REPO

BUNDLED = REPO / "models" / "default"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider here"
    ),
]


def cuda_session(path: Path) -> ort.InferenceSession:
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    return session


@pytest.mark.parametrize(("precision", "bound"), [("fp16", 2e-2), ("fp32", 5e-3)])
def test_graphs_on_cuda_match_fp32_on_cpu(precision: str, bound: float) -> None:
    """Each graph on CUDA (fp16: causal flash/memory-efficient MHA; fp32: the block-causal pieces,
    TF32 matmuls allowed) against the fp32 graph on the CPU, from one entry to N = 8,192."""
    from model_export.lensnet import LensNet, init_random

    manifest = load_manifest(BUNDLED)
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed or 0)
    graph = cuda_session(BUNDLED / manifest.graphs[precision].file)  # type: ignore[index]
    reference_graph = cpu_session(BUNDLED / manifest.graphs["fp32"].file)
    rng = np.random.default_rng(7)
    for n in (1, 101, 2048, 8192):
        feed = parity_inputs(model, 1, n, rng)
        reference = reference_graph.run(None, feed)[0]
        embeddings = feed["embeddings"].astype(np.float16 if precision == "fp16" else np.float32)
        got = graph.run(None, {**feed, "embeddings": embeddings})[0]
        assert np.abs(got - reference).max() <= bound, (n, float(np.abs(got - reference).max()))
        assert sign_agreement(reference, got, 0.05)[0] >= 0.99


def test_auto_precision_measures_both_graphs_on_cuda_and_keeps_the_faster() -> None:
    """Both graphs are built for CUDA, so `auto` times each at startup instead of assuming one."""
    scorer = Scorer(BUNDLED, load_manifest(BUNDLED), "auto", device="cuda")
    assert scorer.provider == "CUDAExecutionProvider"
    assert scorer.probe_ms is not None and set(scorer.probe_ms) == {"fp16", "fp32"}
    assert scorer.precision == min(scorer.probe_ms, key=lambda p: scorer.probe_ms[p])  # type: ignore[index]
