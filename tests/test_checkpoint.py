"""Checkpoint import: every recognised form loads key for key; every broken one fails clearly."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_export.checkpoint import CheckpointError, load_lensnet
from model_export.lensnet import LensNet

from .conftest import SMALL

# Settings that cannot be read from weights; D, layers and head are inferred.
STATED = {"num_heads": SMALL.num_heads, "block_size": SMALL.block_size, "max_lod": SMALL.max_lod}


def _assert_same_weights(loaded: LensNet, original: LensNet) -> None:
    want = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


FORMS: dict[str, Callable[[dict], object]] = {
    "bare": lambda sd: sd,
    "nested-lensnet": lambda sd: {"lensnet": sd, "step": 1200},
    "nested-state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "nested-model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "double-nested": lambda sd: {"model": {"lensnet": sd}},
    "prefixed": lambda sd: {f"lensnet.{k}": v for k, v in sd.items()} | {"gistnet.proj.weight": torch.ones(2, 2)},
    "ddp-wrapped": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compiled-and-nested": lambda sd: {"lensnet_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    "ddp-whole-model": lambda sd: (
        {f"module.lensnet.{k}": v for k, v in sd.items()} | {"module.gistnet.proj.weight": torch.ones(2, 2)}
    ),
    "prefixed-with-metadata": lambda sd: {f"lensnet.{k}": v for k, v in sd.items()} | {"step": 9, "lr": 0.1},
}


@pytest.mark.parametrize("form", FORMS)
def test_pytorch_file_forms_load_strictly(tmp_path: Path, small_model: LensNet, form: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(FORMS[form](small_model.state_dict()), path)
    _assert_same_weights(load_lensnet(path, STATED), small_model)


@pytest.mark.parametrize("form", ["bare", "prefixed"])
def test_safetensors_forms_load_strictly(tmp_path: Path, small_model: LensNet, form: str) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in FORMS[form](small_model.state_dict()).items()}, str(path))
    _assert_same_weights(load_lensnet(path, STATED), small_model)


def test_safetensors_detected_without_extension(tmp_path: Path, small_model: LensNet) -> None:
    path = tmp_path / "weights.bin"
    save_file(small_model.state_dict(), str(path))
    _assert_same_weights(load_lensnet(path, STATED), small_model)


def test_bf16_checkpoint_loads_into_fp32(tmp_path: Path, small_model: LensNet) -> None:
    path = tmp_path / "bf16.pt"
    torch.save({k: v.bfloat16() for k, v in small_model.state_dict().items()}, path)
    loaded = load_lensnet(path, STATED)
    assert loaded.blocks[0].attn.c_q.weight.dtype == torch.float32
    assert torch.equal(loaded.level_embed.weight, small_model.level_embed.weight.bfloat16().float())


def test_config_is_inferred_from_weights(tmp_path: Path) -> None:
    from model_export.config import LensNetConfig

    original = LensNet(LensNetConfig(embed_dim=48, layers=3, num_heads=4, head="linear", block_size=4, max_lod=3))
    path = tmp_path / "c.pt"
    torch.save(original.state_dict(), path)
    loaded = load_lensnet(path, STATED)
    assert (loaded.config.embed_dim, loaded.config.layers, loaded.config.head) == (48, 3, "linear")


def test_missing_unexpected_and_mismatched_reported_together(tmp_path: Path, small_model: LensNet) -> None:
    sd = dict(small_model.state_dict())
    del sd["blocks.1.mlp.c_fc.weight"]
    del sd["dist_mlp.0.bias"]
    sd["blocks.0.attn.rotary.weight"] = torch.zeros(3)
    sd["scorer.0.weight"] = torch.zeros(7, 128)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_lensnet(path, STATED)
    message = str(info.value)
    assert "missing keys (2): blocks.1.mlp.c_fc.weight, dist_mlp.0.bias" in message
    assert "unexpected keys (1): blocks.0.attn.rotary.weight" in message
    assert "scorer.0.weight: expected [128, 128], got [7, 128]" in message


def test_stated_config_contradicting_weights_is_a_shape_error(tmp_path: Path, small_model: LensNet) -> None:
    path = tmp_path / "c.pt"
    torch.save(small_model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*blocks.0.attn.c_q.weight: expected \[128, 128\]"):
        load_lensnet(path, STATED | {"embed_dim": 128})


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"lensnet": Exploit()}))
    with pytest.raises(CheckpointError, match="not a loadable PyTorch weights file"):
        load_lensnet(path, STATED)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"definitely not weights", "not a readable safetensors file"),
        (None, "checkpoint not found"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_lensnet(path, STATED)


def test_checkpoint_without_lensnet_weights(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="no LensNet state_dict found"):
        load_lensnet(path, STATED)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda sd: sd | {"blocks.0.attn.c_q.weight": sd["blocks.0.attn.c_q.weight"].long()}, "not floating point"),
        (lambda sd: sd | {"scorer.0.bias": sd["scorer.0.bias"] * float("nan")}, r"NaN or inf in: scorer\.0\.bias"),
    ],
)
def test_unusable_weights_are_a_checkpoint_error(
    tmp_path: Path, small_model: LensNet, spoil: Callable[[dict], dict], message: str
) -> None:
    path = tmp_path / "spoiled.pt"
    torch.save(spoil(small_model.state_dict()), path)
    with pytest.raises(CheckpointError, match=message):
        load_lensnet(path, STATED)


@pytest.mark.parametrize("stated", [{"layers": "2"}, {"num_heads": 4.0}, {"max_lod": True}])
def test_stated_values_of_the_wrong_type_are_a_checkpoint_error(
    tmp_path: Path, small_model: LensNet, stated: dict
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(small_model.state_dict(), path)
    (name,) = stated
    with pytest.raises(CheckpointError, match=f"{name} must be"):
        load_lensnet(path, STATED | stated)
