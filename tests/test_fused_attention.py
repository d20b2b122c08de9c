"""The exported attention constructions compute `lensnet.attention`, causally, with linear memory."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model_export.artifact import load_manifest, sha256_file
from model_export.fused_attention import LEVELS, TRANSLATIONS, fused_attention
from model_export.lensnet import LensNet, attention
from model_export.parity import cpu_session

from .live import REPO

BUNDLED = REPO / "models" / "default"


class _Attend(torch.nn.Module):
    def __init__(self, causal: bool, construction: str) -> None:
        super().__init__()
        self.causal, self.construction = causal, construction

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fused_attention(q, k, v, self.causal, self.construction)


def _export_op(tmp_path: Path, causal: bool, construction: str, heads: int, head_dim: int, dtype: torch.dtype) -> Path:
    path = tmp_path / f"{construction}.onnx"
    example = tuple(torch.randn(2, 5, heads, head_dim).to(dtype) for _ in range(3))
    axes = {0: torch.export.Dim("b"), 1: torch.export.Dim("n")}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Attend(causal, construction), example, str(path), dynamo=True, external_data=False, opset_version=18,
            input_names=["q", "k", "v"], dynamic_shapes={"q": axes, "k": axes, "v": axes},
            custom_translation_table=TRANSLATIONS,
        )  # fmt: skip
    return path


def _qkv(batch: int, n: int, heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """RMS-normalised q and k (as the model feeds them), standard normal v."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g) for _ in range(3))
    return _rms(q), _rms(k), v


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.size(-1),))


SIZES = [(1, 1), (1, 2), (1, 127), (1, 2**LEVELS), (1, 2**LEVELS + 1), (3, 300), (1, 2049)]


@pytest.mark.parametrize("heads,head_dim", [(4, 16), (2, 128)])
def test_block_causal_graph_equals_causal_sdpa(tmp_path: Path, heads: int, head_dim: int) -> None:
    """Every length class: shorter than one leaf, exactly a multiple of 2^LEVELS, one past it, batched."""
    session = cpu_session(_export_op(tmp_path, True, "block-causal", heads, head_dim, torch.float32))
    for seed, (batch, n) in enumerate(SIZES):
        q, k, v = _qkv(batch, n, heads, head_dim, seed)
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]
        expected = attention(q, k, v, causal=True).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 2e-6, (batch, n)


def test_block_causal_is_causal_and_exact_at_extreme_scores(tmp_path: Path) -> None:
    """A later entry never changes an earlier output; scores at both ends of [-sqrt(hd), sqrt(hd)]
    (keys equal to, or opposite of, the query) stay exact: the sentinel weights cannot overflow."""
    heads, head_dim, n = 2, 64, 700
    session = cpu_session(_export_op(tmp_path, True, "block-causal", heads, head_dim, torch.float32))
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
def test_mha_constructions_equal_sdpa(tmp_path: Path, causal: bool, construction: str) -> None:
    session = cpu_session(_export_op(tmp_path, causal, construction, 4, 16, torch.float16))
    q, k, v = _qkv(2, 257, 4, 16, 3)
    feed = {name: t.half().numpy() for name, t in zip("qkv", (q, k, v), strict=True)}
    got = session.run(None, feed)[0].astype(np.float32)
    expected = attention(q.half(), k.half(), v.half(), causal).float().numpy()
    assert np.abs(got - expected).max() <= 4e-3


def test_a_construction_that_contradicts_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not fit causal=False"):
        _export_op(tmp_path, False, "block-causal", 2, 16, torch.float32)


def test_bundled_graphs_use_the_fused_constructions() -> None:
    """fp32: non-causal MHA pieces (flash on the CPU) and no softmax over N x N; fp16: causal MHA."""
    manifest = load_manifest(BUNDLED)
    layers = manifest.config.layers
    expected = {"fp32": ("block-causal", 0, LEVELS * layers), "fp16": ("causal-mha", 1, layers)}
    for precision, (attention_kind, unidirectional, count) in expected.items():
        spec = manifest.graphs[precision]
        assert spec.attention == attention_kind
        graph = onnx.load(str(BUNDLED / spec.file)).graph
        mha = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
        assert len(mha) == count, precision
        assert all({a.name: a.i for a in node.attribute}.get("unidirectional", 0) == unidirectional for node in mha), (
            precision
        )
        assert not [node for node in graph.node if node.op_type == "Softmax"], precision


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
