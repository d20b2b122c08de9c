"""ONNX export: the CLI end to end, the parity gate, manifests, checksums, determinism.

Expectations come from the PyTorch module on fresh inputs, never from stored export outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_export import build as build_module
from model_export import parity as parity_module
from model_export.artifact import ArtifactError, ModelInfo, Source, load_manifest, sha256_file
from model_export.cli import main as export_main
from model_export.config import LensNetConfig
from model_export.lensnet import LensNet, init_random
from model_export.parity import cpu_session, parity_inputs, sign_agreement

from .conftest import SMALL

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "default"
SMALL_FLAGS = ["--embed-dim", "64", "--num-heads", "4", "--block-size", "4", "--max-lod", "3"]


def _module_scores(model: LensNet, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feed[k]) for k in ("embeddings", "lod", "positions"))).numpy()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_export", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.fixture(scope="module")
def random_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "demo"
    result = _run_cli("--random-init", "--seed", "3", *SMALL_FLAGS, "--out", str(out), "--parity-sizes", "1,7,513")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    return out


def test_cli_random_init_artifact(random_artifact: Path) -> None:
    manifest = load_manifest(random_artifact)  # verifies every checksum
    assert manifest.model.trained is False and "UNTRAINED" in manifest.model.description
    assert manifest.source.kind == "random-init" and manifest.source.seed == 3
    assert manifest.config == LensNetConfig(embed_dim=64, num_heads=4, block_size=4, max_lod=3)
    assert [c.n for c in manifest.parity.cases] == [1, 7, 513, 300]
    assert manifest.parity.passed
    assert int(manifest.export["opset"]) >= 17
    for precision, dtype in (("fp32", "float32"), ("fp16", "float16")):
        spec = manifest.graphs[precision]
        assert [(t.name, t.dtype, t.shape) for t in spec.inputs] == [
            ("embeddings", dtype, ["batch", "n", 64]),
            ("lod", "int64", ["batch", "n"]),
            ("positions", "int64", ["batch", "n"]),
        ]
        assert [(t.name, t.dtype, t.shape) for t in spec.outputs] == [
            ("scores", "float32", ["batch", "n"]),
            ("non_finite", "bool", ["batch", "n"]),
        ]


def test_exported_graphs_compute_the_module(random_artifact: Path) -> None:
    model = init_random(LensNet(load_manifest(random_artifact).config), seed=3).eval()
    rng = np.random.default_rng(99)
    fp32 = cpu_session(random_artifact / "lensnet.fp32.onnx")
    fp16 = cpu_session(random_artifact / "lensnet.fp16.onnx")
    for batch, n in [(1, 1), (1, 123), (2, 64), (1, 2049)]:
        feed = parity_inputs(model, batch, n, rng)
        expected = _module_scores(model, feed)
        got32 = fp32.run(None, feed)[0]
        got16 = fp16.run(None, {**feed, "embeddings": feed["embeddings"].astype(np.float16)})[0]
        assert got32.shape == got16.shape == (batch, n) and got16.dtype == np.float32
        assert np.abs(got32 - expected).max() <= 1e-4
        assert np.abs(got16 - expected).max() <= 2e-2
        assert sign_agreement(expected, got16, 0.05)[0] >= 0.99


def test_graphs_flag_non_finite_embeddings(random_artifact: Path) -> None:
    feed = parity_inputs(init_random(LensNet(SMALL), 0), 2, 9, np.random.default_rng(3))
    feed["embeddings"][0, 4, 7] = np.nan
    feed["embeddings"][1, 8, 0] = -np.inf
    expected = np.zeros((2, 9), dtype=bool)
    expected[0, 4] = expected[1, 8] = True
    for name, dtype in (("lensnet.fp32.onnx", np.float32), ("lensnet.fp16.onnx", np.float16)):
        run = {**feed, "embeddings": feed["embeddings"].astype(dtype)}
        _, non_finite = cpu_session(random_artifact / name).run(None, run)
        assert np.array_equal(non_finite, expected), name


def test_cpu_inference_is_bitwise_deterministic(random_artifact: Path) -> None:
    feed = parity_inputs(init_random(LensNet(SMALL), 0), 1, 777, np.random.default_rng(5))
    for name in ("lensnet.fp32.onnx", "lensnet.fp16.onnx"):
        if "fp16" in name:
            feed = {**feed, "embeddings": feed["embeddings"].astype(np.float16)}
        first = cpu_session(random_artifact / name)
        second = cpu_session(random_artifact / name)
        runs = [first.run(None, feed)[0], first.run(None, feed)[0], second.run(None, feed)[0]]
        assert all(r.tobytes() == runs[0].tobytes() for r in runs[1:]), name


def test_tampered_or_missing_files_are_refused(random_artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(random_artifact, copy)
    graph = copy / "lensnet.fp16.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"lensnet\.fp16\.onnx: sha256 does not match"):
        load_manifest(copy)
    (copy / "lensnet.fp32.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"lensnet\.fp32\.onnx: missing"):
        load_manifest(copy)


def test_manifest_checksums_match_files(random_artifact: Path) -> None:
    raw = json.loads((random_artifact / "manifest.json").read_text())
    names = {p.name for p in random_artifact.iterdir()} - {"manifest.json"}
    assert set(raw["files"]) == names
    for name, entry in raw["files"].items():
        assert entry["sha256"] == sha256_file(random_artifact / name)
        assert entry["size"] == (random_artifact / name).stat().st_size


def test_cli_from_nested_checkpoint(tmp_path: Path, small_model: LensNet) -> None:
    checkpoint = tmp_path / "run.pt"
    torch.save({"model": {f"lensnet.{k}": v for k, v in small_model.state_dict().items()}, "step": 9}, checkpoint)
    out = tmp_path / "art"
    result = _run_cli(
        "--checkpoint", str(checkpoint), "--num-heads", "4", "--block-size", "4", "--max-lod", "3",
        "--out", str(out), "--model-version", "run-9", "--parity-sizes", "1,33",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert manifest.source.sha256 == sha256_file(checkpoint) and manifest.source.file == "run.pt"
    assert (manifest.model.version, manifest.model.trained) == ("run-9", True)
    assert "so the defaults: positional='gaussian', causal=True" in result.stderr  # the ones not stated
    feed = parity_inputs(small_model, 1, 200, np.random.default_rng(1))
    got = cpu_session(out / "lensnet.fp32.onnx").run(None, feed)[0]
    assert np.abs(got - _module_scores(small_model, feed)).max() <= 1e-4


def test_cli_refuses_existing_output_and_bad_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    result = _run_cli("--random-init", "--out", str(tmp_path / "exists"))
    assert result.returncode == 2 and "use --force" in result.stderr
    (tmp_path / "bad.pt").write_bytes(b"\x80garbage")
    result = _run_cli("--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not a loadable PyTorch weights file" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"layers": "2"}, "layers must be int, got '2'"),
        ({"embed_dim": 64, "num_heads": 4.0}, "num_heads must be int, got 4.0"),
        ([1], "a LensNet config is an object of its fields, got list"),
        ({"embed_dim": 2048, "num_heads": 1}, "must be at most 1024 for a causal model"),
    ],
)
def test_cli_refuses_a_bad_config_before_exporting(tmp_path: Path, config: object, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _run_cli("--random-init", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sizes", ["0", "1,-3", "x", ""])
def test_cli_refuses_bad_parity_sizes_before_exporting(tmp_path: Path, sizes: str) -> None:
    result = _run_cli("--random-init", *SMALL_FLAGS, "--out", str(tmp_path / "o"), "--parity-sizes", sizes)
    assert result.returncode == 2 and "--parity-sizes: expected comma-separated integers >= 1" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_fp16_graph_runs_in_parity_only_where_its_written_out_scores_stay_bounded(
    tmp_path: Path, small_model: LensNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The causal fp16 graph writes out heads x N² scores on the CPU EP: parity runs it up to the
    bound and leaves its fields null beyond (the fp32 graph, memory-linear, runs at every size)."""
    monkeypatch.setattr(parity_module, "WRITTEN_OUT_MAX_BYTES", SMALL.num_heads * 64 * 64 * 4)
    manifest = build_module.build_artifact(
        small_model, tmp_path / "art", ModelInfo(name="x", version="1", description="", trained=False),
        Source(kind="random-init", seed=0), parity_sizes=(1, 64, 65),
    )  # fmt: skip
    cases = {(c.batch, c.n): c for c in manifest.parity.cases}
    assert {key for key, c in cases.items() if c.fp16_vs_fp32_max_abs is not None} == {(1, 1), (1, 64)}
    assert all(c.fp16_sign_agreement is None and c.fp16_sign_entries is None for key, c in cases.items()
               if key not in ((1, 1), (1, 64)))  # fmt: skip
    assert manifest.parity.passed and manifest.parity.fp16_vs_fp32_max_abs == max(
        cases[key].fp16_vs_fp32_max_abs
        for key in ((1, 1), (1, 64))  # type: ignore[type-var]
    )
    assert load_manifest(tmp_path / "art").parity == manifest.parity  # nulls round-trip
    monkeypatch.setattr(parity_module, "WRITTEN_OUT_MAX_BYTES", 0)  # nothing within the bound…
    graphs = {p: tmp_path / "art" / spec.file for p, spec in manifest.graphs.items()}
    report = parity_module.measure_parity(small_model, graphs, (64, 1), fp16_written_out=True)
    measured = [(c.batch, c.n) for c in report.cases if c.fp16_vs_fp32_max_abs is not None]
    assert measured == [(1, 1)] and report.fp16_vs_fp32_max_abs is not None  # …but the smallest case runs


def test_cli_help_explains_usage() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0
    for text in ("--checkpoint", "--random-init", "--out", "--parity-sizes", "exit status"):
        assert text in result.stdout


def test_wrong_export_fails_loudly_and_leaves_nothing(
    tmp_path: Path, small_model: LensNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph that does not compute the module (here: one weight perturbed) must not ship."""
    real_export = build_module.export_graph

    def perturbed_export(model: LensNet, precision: str, path: Path):  # type: ignore[no-untyped-def]
        broken = init_random(LensNet(model.config), seed=11)
        with torch.no_grad():
            broken.blocks[0].mlp.c_fc.weight[0, 0] += 0.05
        return real_export(broken.eval(), precision, path)

    monkeypatch.setattr(build_module, "export_graph", perturbed_export)
    out = tmp_path / "art"
    with pytest.raises(build_module.ParityError, match="fp32 vs torch max"):
        build_module.build_artifact(
            small_model, out, ModelInfo(name="x", version="1", description="", trained=False),
            Source(kind="random-init", seed=11), parity_sizes=(1, 40),
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging leftovers

    argv = ["--random-init", "--seed", "11", *SMALL_FLAGS, "--out", str(out), "--parity-sizes", "1,40"]
    assert export_main(argv) == 1
    assert list(tmp_path.iterdir()) == []


def test_bundled_model_matches_its_module() -> None:
    """The committed demo artifact is what its manifest says: seed-0 weights, verified parity,
    checked again here on fresh snapshots up to N = 8,192."""
    manifest = load_manifest(BUNDLED)
    assert manifest.model.trained is False and "UNTRAINED" in manifest.model.description
    assert manifest.source.kind == "random-init" and manifest.source.seed is not None
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed).eval()
    rng = np.random.default_rng(2024)
    fp32 = cpu_session(BUNDLED / "lensnet.fp32.onnx")
    fp16 = cpu_session(BUNDLED / "lensnet.fp16.onnx")
    for n in (1, 333, 8192):
        feed = parity_inputs(model, 1, n, rng)
        expected = _module_scores(model, feed)
        got32 = fp32.run(None, feed)[0]
        got16 = fp16.run(None, {**feed, "embeddings": feed["embeddings"].astype(np.float16)})[0]
        assert np.abs(got32 - expected).max() <= 1e-4
        assert np.abs(got16 - got32).max() <= 2e-2
        assert sign_agreement(got32, got16, 0.05)[0] >= 0.99
