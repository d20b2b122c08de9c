"""The ONNX Runtime backend: which graph `auto` serves, and the CPU arena's memory after big runs."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lensnet_client.layout import synthetic_layout
from model_export.artifact import load_manifest
from service import runtime
from service.runtime import CPU, CUDA, Scorer

from .live import REPO, LiveService

BUNDLED = REPO / "models" / "default"


def test_auto_on_the_cpu_serves_the_graph_built_for_it_without_a_probe() -> None:
    manifest = load_manifest(BUNDLED)
    scorer = Scorer(BUNDLED, manifest, "auto", intra_op_threads=2, device="cpu")
    assert [p for p, g in manifest.graphs.items() if CPU in g.providers] == ["fp32"]
    assert (scorer.precision, scorer.provider, scorer.probe_ms) == ("fp32", CPU, None)


class FakeCuda:
    """This machine's onnxruntime claims CUDA. Sessions asked for CUDA start on it (`starts`), or
    on the CPU as ONNX Runtime does when CUDA cannot start; `asked`: (graph file, providers)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []
        self.starts = True

    def create_session(self, graph: Path, providers: list[str], *_: object) -> FakeCuda.Session:
        self.asked.append((graph.name, providers))
        return FakeCuda.Session(providers[0] if self.starts else CPU)

    class Session:
        def __init__(self, provider: str) -> None:
            self.provider = provider

        def get_providers(self) -> list[str]:
            return [self.provider, CPU]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    cuda = FakeCuda()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(runtime, "create_session", cuda.create_session)
    return cuda


def test_the_block_causal_graph_never_runs_on_cuda_even_where_an_artifact_lists_it(fake_cuda: FakeCuda) -> None:
    """Artifacts exported before the H200 fault list CUDA for the fp32 (block-causal) graph; the
    runtime keeps it on the CPU whatever the manifest says, and gives CUDA to the graphs built for it."""
    manifest = load_manifest(BUNDLED)
    old = manifest.graphs["fp32"].model_copy(update={"providers": [CPU, CUDA]})
    legacy = manifest.model_copy(update={"graphs": {**manifest.graphs, "fp32": old}})
    assert not old.runs_on(CUDA) and old.runs_on(CPU) and manifest.graphs["fp16"].runs_on(CUDA)
    scorer = Scorer(BUNDLED, legacy, "auto", 2)
    assert (scorer.precision, scorer.provider, scorer.probe_ms) == ("fp16", CUDA, None)
    assert fake_cuda.asked == [("lensnet.fp16.onnx", [CUDA, CPU])]  # auto on CUDA: the fp16 graph only
    assert Scorer(BUNDLED, legacy, "fp32", 2).provider == CPU
    assert fake_cuda.asked[-1] == ("lensnet.fp32.onnx", [CPU])
    with pytest.raises(RuntimeError, match=r"no graph of precision fp32 runs on CUDA \(these do: \['fp16'\]\)"):
        Scorer(BUNDLED, legacy, "fp32", 2, device="cuda")


def test_device_cpu_keeps_to_the_cpu_where_cuda_runs(fake_cuda: FakeCuda) -> None:
    scorer = Scorer(BUNDLED, load_manifest(BUNDLED), "auto", 2, device="cpu")
    assert (scorer.precision, scorer.provider) == ("fp32", CPU)
    assert fake_cuda.asked == [("lensnet.fp32.onnx", [CPU])]


def test_auto_on_cuda_takes_the_cpus_graphs_when_none_runs_on_cuda(fake_cuda: FakeCuda) -> None:
    """Not every graph: the fp16 graph here is built for no provider this machine runs it on."""
    manifest = load_manifest(BUNDLED)
    elsewhere = manifest.graphs["fp16"].model_copy(update={"providers": ["TensorrtExecutionProvider"]})
    artifact = manifest.model_copy(update={"graphs": {**manifest.graphs, "fp16": elsewhere}})
    scorer = Scorer(BUNDLED, artifact, "auto", 2)
    assert (scorer.precision, scorer.provider, scorer.probe_ms) == ("fp32", CPU, None)
    assert fake_cuda.asked == [("lensnet.fp32.onnx", [CPU])]


def test_device_cuda_on_a_machine_without_it_never_becomes_ready_and_says_why() -> None:
    """The setting reaches the model's loading: the process stays up but answers 503 on both probes
    (a liveness probe restarts it), and its log says why."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    service = LiveService("--device", "cuda")
    try:
        deadline = time.monotonic() + 60
        while "model failed to load" not in service.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "device cuda: this onnxruntime has no CUDA execution provider" in service.log()
        assert service.http.get("/healthz").status_code == 503
        assert service.http.get("/readyz").status_code == 503
        assert service.process.poll() is None
    finally:
        assert service.stop() == 0


def test_cuda_that_does_not_start_falls_back_under_auto_and_fails_under_device_cuda(fake_cuda: FakeCuda) -> None:
    fake_cuda.starts = False
    manifest = load_manifest(BUNDLED)
    scorer = Scorer(BUNDLED, manifest, "auto", 2)
    assert (scorer.precision, scorer.provider) == ("fp32", CPU)  # then the CPU's graph
    assert fake_cuda.asked[-1] == ("lensnet.fp32.onnx", [CPU])
    with pytest.raises(RuntimeError, match="device cuda: the CUDA execution provider did not start"):
        Scorer(BUNDLED, manifest, "auto", 2, device="cuda")


def test_auto_times_every_candidate_and_serves_the_fastest() -> None:
    """With both graphs declared for the CPU, both are timed, and the faster one is served."""
    manifest = load_manifest(BUNDLED)
    graphs = {p: g.model_copy(update={"providers": [CPU]}) for p, g in manifest.graphs.items()}
    scorer = Scorer(BUNDLED, manifest.model_copy(update={"graphs": graphs}), "auto", 2, probe_entries=256, device="cpu")
    assert scorer.probe_ms is not None and set(scorer.probe_ms) == {"fp32", "fp16"}
    assert all(ms > 0 for ms in scorer.probe_ms.values())
    assert scorer.precision == min(scorer.probe_ms, key=scorer.probe_ms.__getitem__)
    assert scorer.input_dtype == np.dtype("float16" if scorer.precision == "fp16" else "float32")


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_device_cuda_without_cuda_fails_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="device cuda: this onnxruntime has no CUDA execution provider"):
        Scorer(BUNDLED, load_manifest(BUNDLED), "auto", 2, device="cuda")


def test_a_forced_precision_is_served_as_asked() -> None:
    scorer = Scorer(BUNDLED, load_manifest(BUNDLED), "fp16", intra_op_threads=2, device="cpu")
    assert (scorer.precision, scorer.probe_ms, scorer.input_dtype) == ("fp16", None, np.dtype("float16"))
    lod, positions = synthetic_layout(300, 32, 2, np.random.default_rng(0))
    scores, non_finite = scorer.score(np.zeros((300, 256), np.float16), lod, positions)
    assert scores.shape == (300,) and not non_finite.any()


SHRINK_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from lensnet_client.layout import synthetic_layout
from model_export.artifact import load_manifest
from service.runtime import Scorer
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
model = Path(sys.argv[1])
scorer = Scorer(model, load_manifest(model), 'fp32', 2, shrink_entries=int(sys.argv[2]), device='cpu')
lod, positions = synthetic_layout(8192, 32, 2, np.random.default_rng(0))
before = rss()
scorer.score(np.ones((8192, 256), np.float32), lod, positions)
print(rss() - before)
"""


def _rss_growth_after_8k(shrink_entries: int) -> int:
    run = [sys.executable, "-c", SHRINK_SCRIPT, str(BUNDLED), str(shrink_entries)]
    return int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)


def test_big_runs_hand_the_arena_back_and_smaller_ones_keep_it() -> None:
    """After an 8,192-entry run the arena keeps its ~400 MiB peak unless that run reached
    `shrink_entries`; then the process is back within 100 MiB of where it started."""
    kept, shrunk = _rss_growth_after_8k(8193), _rss_growth_after_8k(8192)
    assert kept > 200 << 20
    assert shrunk < 100 << 20


def test_a_forced_fp16_graph_on_the_cpu_warns_that_it_writes_out_attention(caplog: pytest.LogCaptureFixture) -> None:
    manifest = load_manifest(BUNDLED)
    with caplog.at_level(logging.WARNING, logger="lensnet.runtime"):
        assert Scorer(BUNDLED, manifest, "auto", 2, device="cpu").precision == "fp32"
        assert not caplog.records  # auto on the CPU: the memory-linear graph, nothing to say
        assert Scorer(BUNDLED, manifest, "fp16", 2, device="cpu").provider == CPU
    (record,) = caplog.records
    assert "writes out N x N scores on the CPU" in record.getMessage()
