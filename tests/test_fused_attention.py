"""The exported attention constructions compute `lensnet.attention`, causally, with linear memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model_export.artifact import load_manifest, sha256_file
from model_export.fused_attention import LEVELS, WRITTEN_OUT_MAX, attention_model, fused_attention, onnx_attention
from model_export.lensnet import LensNet, attention

from .live import REPO

BUNDLED = REPO / "models" / "default"


def _session(construction: str, heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> ort.InferenceSession:
    return ort.InferenceSession(
        attention_model(construction, heads, head_dim, dtype).SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _qkv(batch: int, n: int, heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """RMS-normalised q and k (as the model feeds them), standard normal v."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g) for _ in range(3))
    return _rms(q), _rms(k), v


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.size(-1),))


SIZES = [(1, 1), (1, 2), (1, 127), (1, 2**LEVELS), (1, 2**LEVELS + 1), (3, 300), (1, 2049)]
AROUND_THE_BRANCH = [(1, 1), (2, 77), (1, WRITTEN_OUT_MAX), (1, WRITTEN_OUT_MAX + 1), (2, 1500)]


@pytest.mark.parametrize("heads,head_dim", [(4, 16), (2, 128)])
def test_block_causal_pieces_equal_causal_sdpa(heads: int, head_dim: int) -> None:
    """Every length class: shorter than one leaf, exactly a multiple of 2^LEVELS, one past it, batched."""
    session = _session("pieces", heads, head_dim)
    for seed, (batch, n) in enumerate(SIZES):
        q, k, v = _qkv(batch, n, heads, head_dim, seed)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        expected = attention(q, k, v, causal=True).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 2e-6, (batch, n)


def test_block_causal_graph_takes_either_branch_exactly() -> None:
    """The `If` writes attention out up to WRITTEN_OUT_MAX entries and takes the pieces past it."""
    session = _session("block-causal", 4, 32)
    for seed, (batch, n) in enumerate(AROUND_THE_BRANCH):
        q, k, v = _qkv(batch, n, 4, 32, seed)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        assert np.abs(got - attention(q, k, v, causal=True).numpy()).max() <= 2e-6, (batch, n)


def test_block_causal_is_causal_and_exact_at_extreme_scores() -> None:
    """A later entry never changes an earlier output; scores at both ends of [-sqrt(hd), sqrt(hd)]
    (keys equal to, or opposite of, the query) stay exact: the sentinel weights cannot overflow."""
    heads, head_dim, n = 2, 64, 700
    session = _session("pieces", heads, head_dim)
    q, k, v = _qkv(1, n, heads, head_dim, 7)
    k[:, 1::2] = -q[:, 1::2]  # the lowest possible scores on the diagonal
    k[:, ::3] = q[:, ::3]  # the highest
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    got = session.run(None, feed)[0]
    assert np.abs(got - attention(q, k, v, causal=True).numpy()).max() <= 2e-6
    changed = {name: value.copy() for name, value in feed.items()}
    changed["k"][:, 400:] = -changed["k"][:, 400:]
    changed["v"][:, 400:] = 100.0
    again = session.run(None, changed)[0]
    assert np.array_equal(again[:, :400], got[:, :400])
    assert not np.allclose(again[:, 400:], got[:, 400:])


@pytest.mark.parametrize("causal,construction", [(True, "causal-mha"), (False, "mha")])
def test_mha_constructions_equal_sdpa(causal: bool, construction: str) -> None:
    session = _session(construction, 4, 16, torch.float16)
    q, k, v = _qkv(2, 257, 4, 16, 3)
    feed = {name: t.half().numpy() for name, t in zip("qkv", (q, k, v), strict=True)}
    got = session.run(None, feed)[0].astype(np.float32)
    expected = attention(q.half(), k.half(), v.half(), causal).float().numpy()
    assert np.abs(got - expected).max() <= 4e-3


def test_a_construction_that_contradicts_the_model_is_refused() -> None:
    """A non-causal attention asked for a causal construction fails the export, loudly."""
    q = torch.zeros(1, 3, 2, 16)
    with pytest.raises(ValueError, match="does not fit causal=False"):
        onnx_attention(q, q, q, False, "block-causal")


def _ops(graph: onnx.GraphProto, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if node.op_type == op_type]


def test_bundled_graphs_use_the_fused_constructions() -> None:
    """fp32: per layer an If whose large-N branch is non-causal MHA pieces (flash on the CPU) with
    no softmax over N x N, and whose small-N branch writes scores out; fp16: causal MHA."""
    manifest = load_manifest(BUNDLED)
    layers = manifest.config.layers
    fp32 = onnx.load(str(BUNDLED / manifest.graphs["fp32"].file)).graph
    assert manifest.graphs["fp32"].attention == "block-causal"
    branches = [{a.name: a.g for a in node.attribute} for node in _ops(fp32, "If")]
    assert len(branches) == layers and not _ops(fp32, "MultiHeadAttention") and not _ops(fp32, "Softmax")
    for branch in branches:
        pieces = _ops(branch["else_branch"], "MultiHeadAttention")
        assert len(pieces) == LEVELS and not _ops(branch["else_branch"], "Softmax")
        assert all("unidirectional" not in {a.name for a in node.attribute} for node in pieces)
        assert len(_ops(branch["then_branch"], "Softmax")) == 1
    fp16 = onnx.load(str(BUNDLED / manifest.graphs["fp16"].file)).graph
    assert manifest.graphs["fp16"].attention == "causal-mha" and not _ops(fp16, "Softmax")
    mha = _ops(fp16, "MultiHeadAttention")
    assert len(mha) == layers and all({a.name: a.i for a in node.attribute}["unidirectional"] == 1 for node in mha)


def test_export_is_reproducible_from_any_checkout(tmp_path: Path) -> None:
    """The graphs carry no checkout-specific bytes: exporting the demo model from a copy of the
    source elsewhere gives the sha256 recorded in the committed manifest."""
    elsewhere = tmp_path / "another" / "checkout"
    for package in ("model_export", "clients/lensnet_client"):
        shutil.copytree(REPO / package, elsewhere / Path(package).name, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = load_manifest(BUNDLED)
    script = (
        "import json, sys; from pathlib import Path\n"
        "import model_export\n"
        "assert Path(model_export.__file__).resolve().is_relative_to(Path.cwd()), model_export.__file__\n"
        "from model_export.config import LensNetConfig\n"
        "from model_export.lensnet import LensNet, init_random\n"
        "from model_export.onnx_graphs import export_graph\n"
        "model = init_random(LensNet(LensNetConfig(**json.loads(sys.argv[1]))), int(sys.argv[2])).eval()\n"
        "for precision in ('fp32', 'fp16'): export_graph(model, precision, Path(sys.argv[3]) / precision)\n"
    )
    config = json.dumps(manifest.config.to_dict())
    run = [sys.executable, "-c", script, config, str(manifest.source.seed), str(tmp_path)]
    subprocess.run(run, cwd=elsewhere, env={"PYTHONPATH": str(elsewhere), "PATH": "/usr/bin:/bin"}, check=True)
    for precision, spec in manifest.graphs.items():
        exported = (tmp_path / precision).read_bytes()
        assert str(REPO).encode() not in exported and str(elsewhere).encode() not in exported
        assert sha256_file(tmp_path / precision) == manifest.files[spec.file].sha256, precision


def test_fp32_graph_memory_is_linear_at_8k() -> None:
    """One N = 8,192 run of the bundled CPU graph (with the service's session options) adds well
    under 1 GiB to the process; the written-out attention it replaced added ~4.4 GiB."""
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from lensnet_client.layout import synthetic_layout\n"
        "from service.runtime import CPU, create_session\n"
        "def hwm(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024\n"
        "session = create_session(Path(sys.argv[1]), [CPU], 0, False)\n"
        "lod, positions = synthetic_layout(8192, 32, 2, np.random.default_rng(0))\n"
        "embeddings = np.random.default_rng(1).standard_normal((1, 8192, 256)).astype(np.float32)\n"
        "before = hwm()\n"
        "session.run(None, {'embeddings': embeddings, 'lod': lod[None], 'positions': positions[None]})\n"
        "print(hwm() - before)\n"
    )
    graph = BUNDLED / load_manifest(BUNDLED).graphs["fp32"].file
    grown = int(
        subprocess.run([sys.executable, "-c", script, str(graph)], capture_output=True, text=True, check=True).stdout
    )
    assert 0 < grown < 1 << 30


def test_module_attention_is_what_the_export_replaces(small_model: LensNet) -> None:
    """Swapping the fused op into the module changes nothing in eager mode (it is the reference there)."""
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, small_model.config.embed_dim, generator=rng)
    lod, positions = torch.zeros(1, 50, dtype=torch.int64), torch.arange(50)[None]
    with torch.no_grad():
        expected = small_model(x, lod, positions)
        for block in small_model.blocks:
            block.attn.attend = lambda q, k, v, causal: fused_attention(q, k, v, causal, "block-causal")
        assert torch.equal(small_model(x, lod, positions), expected)
