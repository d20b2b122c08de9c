"""Carry a random-init artifact to a machine in a few KiB: its graphs without the weights, which
the receiving side regenerates from the manifest's seed (`init_random`) and checks against the
manifest's sha256, so the graphs it benchmarks are byte for byte the ones exported here.

    python -m benchmarks.device.slim strip ARTIFACT OUT   # here: OUT holds graphs minus weights
    python -m benchmarks.device.slim fill OUT             # there: weights back, sha256 checked
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from model_export.artifact import MANIFEST_NAME, Manifest, load_manifest
from model_export.lensnet import LensNet, init_random

RECIPES = "weights.json"
MIN_BYTES = 64 * 1024  # smaller initializers travel as they are


def _parameters(artifact: Path) -> dict[str, np.ndarray]:
    """The artifact's random-init weights, regenerated from its manifest's config and seed."""
    manifest = Manifest.model_validate_json((artifact / MANIFEST_NAME).read_text())
    model = init_random(LensNet(manifest.config), seed=manifest.source.seed or 0)
    return {name: p.detach().numpy() for name, p in model.state_dict().items()}


def _forms(param: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [("as-is", param), ("transposed", param.T)] if param.ndim == 2 else [("as-is", param)]


def strip(artifact: Path, out: Path) -> None:
    params = _parameters(artifact)
    out.mkdir(parents=True, exist_ok=True)
    recipes: dict[str, dict[str, list[str]]] = {}
    for graph in sorted(artifact.glob("*.onnx")):
        proto = onnx.load(str(graph))
        recipes[graph.name] = {}
        for init in proto.graph.initializer:
            if len(init.raw_data) < MIN_BYTES:
                continue
            value = numpy_helper.to_array(init)
            match = next(
                ([name, form] for name, p in params.items() for form, v in _forms(p)
                 if v.shape == value.shape and np.array_equal(v.astype(value.dtype), value)),
                None,
            )  # fmt: skip
            if match is None:
                raise SystemExit(f"{graph.name}: initializer {init.name} {value.shape} is no parameter")
            recipes[graph.name][init.name] = match
            init.raw_data = b""
        onnx.save_model(proto, str(out / graph.name))
    (out / RECIPES).write_text(json.dumps(recipes, indent=1))
    (out / "manifest.json").write_bytes((artifact / "manifest.json").read_bytes())


def fill(out: Path) -> None:
    params = _parameters(out)
    recipes = json.loads((out / RECIPES).read_text())
    for file, inits in recipes.items():
        proto = onnx.load(str(out / file))
        for init in proto.graph.initializer:
            if init.name in inits:
                name, form = inits[init.name]
                value = params[name].T if form == "transposed" else params[name]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                init.raw_data = np.ascontiguousarray(value.astype(dtype)).tobytes()
        onnx.save_model(proto, str(out / file))
    (out / RECIPES).unlink()
    load_manifest(out)  # raises unless every graph's size and sha256 match the manifest


if __name__ == "__main__":
    {"strip": lambda a: strip(Path(a[0]), Path(a[1])), "fill": lambda a: fill(Path(a[0]))}[sys.argv[1]](sys.argv[2:])
