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
    from model_export.lensnet import LensNet, init_random

    manifest = load_manifest(BUNDLED)
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed or 0)
    fp16, fp32 = cuda_session(BUNDLED / "lensnet.fp16.onnx"), cpu_session(BUNDLED / "lensnet.fp32.onnx")
    rng = np.random.default_rng(7)
    for n in (1, 101, 2048, 8192):
        feed = parity_inputs(model, 1, n, rng)
        reference = fp32.run(None, feed)[0]
        got = fp16.run(None, {**feed, "embeddings": feed["embeddings"].astype(np.float16)})[0]
        assert np.abs(got - reference).max() <= 2e-2
        assert sign_agreement(reference, got, 0.05)[0] >= 0.99


def test_auto_precision_picks_fp16_on_cuda() -> None:
    scorer = Scorer(BUNDLED, load_manifest(BUNDLED), "auto")
    assert (scorer.precision, scorer.provider) == ("fp16", "CUDAExecutionProvider")
