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


def test_fp16_graph_on_cuda_matches_fp32_on_cpu() -> None:
    """The CUDA graph (causal flash/memory-efficient MHA, fp16) against the fp32 graph on the CPU,
    from one entry to N = 8,192."""
    from model_export.lensnet import LensNet, init_random

    manifest = load_manifest(BUNDLED)
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed or 0)
    fp16, fp32 = cuda_session(BUNDLED / "lensnet.fp16.onnx"), cpu_session(BUNDLED / "lensnet.fp32.onnx")
    rng = np.random.default_rng(7)
    for n in (1, 101, 512, 2048, 8192):
        feed = parity_inputs(model, 1, n, rng)
        reference = fp32.run(None, feed)[0]
        got = fp16.run(None, {**feed, "embeddings": feed["embeddings"].astype(np.float16)})[0]
        assert np.abs(got - reference).max() <= 2e-2, (n, float(np.abs(got - reference).max()))
        assert sign_agreement(reference, got, 0.05)[0] >= 0.99


def test_auto_on_cuda_serves_the_graph_that_runs_there() -> None:
    """Only the fp16 graph runs on CUDA (the block-causal fp32 graph faulted there), so `auto`
    serves it without a probe; forced fp32 runs on the CPU, and `--device cuda` refuses it."""
    manifest = load_manifest(BUNDLED)
    scorer = Scorer(BUNDLED, manifest, "auto", device="cuda")
    assert (scorer.precision, scorer.provider, scorer.probe_ms) == ("fp16", "CUDAExecutionProvider", None)
    assert Scorer(BUNDLED, manifest, "fp32").provider == "CPUExecutionProvider"
    with pytest.raises(RuntimeError, match="no graph of precision fp32 runs on CUDA"):
        Scorer(BUNDLED, manifest, "fp32", device="cuda")
