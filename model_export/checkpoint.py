"""Loading training-repo LensNet checkpoints, safely and strictly.

Recognised forms (also in the README, "Model artifacts"):
- file: safetensors, or a PyTorch file (`torch.save`), read with `weights_only=True`;
- content: a bare LensNet state_dict; or a checkpoint nesting it under one of
  `NESTING_KEYS` (searched depth-first, up to three levels); or a flat dict whose LensNet
  entries carry the `lensnet.` prefix (other modules' keys are ignored). `module.` (DDP) and
  `_orig_mod.` (torch.compile) wrappers are stripped.
Missing keys, unexpected keys and shape mismatches are reported together in one error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import LensNetConfig
from .lensnet import LensNet

NESTING_KEYS = ("lensnet", "lensnet_state_dict", "state_dict", "model_state_dict", "model")
LENSNET_PREFIX = "lensnet."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NESTING = 3


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the LensNet config."""


def read_checkpoint_file(path: Path) -> Any:
    """Read a safetensors or PyTorch file without ever unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(8)
    is_torch = head.startswith(b"PK") or head[:1] == b"\x80"  # zip archive or legacy pickle
    if path.suffix == ".safetensors" or not is_torch:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, … for unsafe/corrupt files
        raise CheckpointError(f"{path}: not a loadable PyTorch weights file ({exc})") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _find_state_dict(obj: Any, depth: int = 0) -> Mapping[str, torch.Tensor] | None:
    if _is_tensor_dict(obj):
        return obj
    if not isinstance(obj, Mapping) or depth >= _MAX_NESTING:
        return None
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
    if any(isinstance(key, str) and _unwrapped(key).startswith(LENSNET_PREFIX) for key in tensors):
        return tensors  # a flat checkpoint: `lensnet.`-prefixed weights beside other entries (a step count…)
    for key in NESTING_KEYS:
        found = _find_state_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    return None


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The LensNet state_dict inside a loaded checkpoint object (see the module docstring)."""
    state = _find_state_dict(obj)
    if state is None:
        keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"no LensNet state_dict found: expected a dict of tensors, possibly nested under one of "
            f"{list(NESTING_KEYS)}; got top-level {keys}"
        )
    # Peel prefixes until none applies: wrappers (DDP, torch.compile) may sit around the whole
    # model (`module.lensnet.…`) or around LensNet alone (`lensnet.module.…`).
    while True:
        wrapper = next((w for w in WRAPPER_PREFIXES if state and all(k.startswith(w) for k in state)), None)
        if wrapper is not None:
            state = _strip(state, wrapper)
        elif any(key.startswith(LENSNET_PREFIX) for key in state):
            state = _strip(state, LENSNET_PREFIX)
        else:
            break
    return dict(state)


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`embed_dim`, `layers` and `head`, read off tensor shapes.

    Heads, block size, max LOD and positional kind are not recoverable from weights.
    """
    if "level_embed.weight" not in state:
        return {}
    layers = {int(key.split(".")[1]) for key in state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    inferred: dict[str, Any] = {
        "embed_dim": int(state["level_embed.weight"].shape[1]),
        "head": "linear" if "scorer.weight" in state else "mlp",
    }
    if layers:
        inferred["layers"] = max(layers) + 1
    return inferred


def check_state_dict(model: LensNet, state: Mapping[str, torch.Tensor]) -> None:
    """Raise one `CheckpointError` listing every missing key, unexpected key and shape mismatch."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: expected {list(shape)}, got {list(state[key].shape)}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not match the LensNet config:\n  " + "\n  ".join(problems))


def check_values(state: Mapping[str, torch.Tensor]) -> None:
    """Raise one `CheckpointError` naming every tensor that is not floating point or holds NaN/inf."""
    kinds = [f"{key} ({value.dtype})" for key, value in state.items() if not value.is_floating_point()]
    broken = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    problems = [f"not floating point: {', '.join(kinds)}"] if kinds else []
    problems += [f"NaN or inf in: {', '.join(broken)}"] if broken else []
    if problems:
        raise CheckpointError("checkpoint weights are unusable:\n  " + "\n  ".join(problems))


def load_lensnet(path: Path, overrides: Mapping[str, Any]) -> LensNet:
    """Load a checkpoint into a LensNet with `strict=True`, in fp32.

    The config is the defaults, then what the weights' shapes say (`infer_config`), then
    `overrides` (what the user stated); a stated value that contradicts the weights surfaces
    as a shape mismatch.
    """
    state = extract_state_dict(read_checkpoint_file(path))
    try:
        config = LensNetConfig.from_dict({**infer_config(state), **overrides})
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    model = LensNet(config)
    check_state_dict(model, state)
    check_values(state)
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return model.eval()
