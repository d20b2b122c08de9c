"""`lensnet-export`: from a training-repo checkpoint (or demo weights) to a verified artifact."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model_export.artifact import ModelInfo, Source, sha256_file

from .config import PARITY_SIZES, LensNetConfig

EXAMPLES = """\
examples:
  # a training-repo checkpoint (D, layers and head are read from the weights):
  lensnet-export --checkpoint run42/lensnet.safetensors --num-heads 8 --out artifacts/lensnet-run42 \\
      --name lensnet --model-version run42-step9000

  # the untrained demo model bundled in models/default:
  lensnet-export --random-init --seed 0 --embed-dim 256 --out models/default --force

exit status: 0 artifact written; 1 parity bounds not met (nothing written); 2 bad arguments
or unreadable/mismatched checkpoint.
"""

CONFIG_FLAGS = ("embed_dim", "layers", "num_heads", "block_size", "max_lod", "head", "positional")
NOT_IN_WEIGHTS = ("num_heads", "block_size", "max_lod", "positional", "causal")
"""Config fields a checkpoint's tensors cannot reveal: the defaults apply unless stated."""


def parity_sizes(text: str) -> list[int]:
    """--parity-sizes: comma-separated WC lengths >= 1 (checked before any export work)."""
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lensnet-export",
        description="Export a LensNet model to ONNX (fp32 + fp16) with a manifest and a parity report. "
        "The export fails, leaving nothing behind, unless the graphs match the PyTorch module.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("weights (choose one)").add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="LensNet checkpoint: .safetensors or a PyTorch file")
    source.add_argument("--random-init", action="store_true", help="untrained demo weights, fixed by --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init (default: 0)")

    config = parser.add_argument_group(
        "model config",
        "Defaults: the training repo's (D=512, 2 layers, 4 heads, B=32, max LOD 2, mlp head, "
        "gaussian RoPE, causal). With --checkpoint, D, layers and head come from the weights.",
    )
    config.add_argument("--config", type=Path, help="JSON file with any of the fields below (flags win)")
    config.add_argument("--embed-dim", type=int, help="D, the base model's width")
    config.add_argument("--layers", type=int)
    config.add_argument("--num-heads", type=int)
    config.add_argument("--block-size", type=int, help="B: entries per gist block")
    config.add_argument("--max-lod", type=int, help="highest gist level (at most 3)")
    config.add_argument("--head", choices=["mlp", "linear"])
    config.add_argument("--positional", choices=["gaussian", "simple"])
    config.add_argument("--bidirectional", action="store_true", help="non-causal attention (future model kinds)")

    artifact = parser.add_argument_group("artifact")
    artifact.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    artifact.add_argument("--force", action="store_true", help="replace --out if it exists")
    artifact.add_argument("--name", help="model name in the manifest")
    artifact.add_argument("--model-version", default="dev", help="model version in the manifest (default: dev)")
    artifact.add_argument("--description", help="free text for the manifest")
    artifact.add_argument(
        "--parity-sizes",
        type=parity_sizes,
        default=list(PARITY_SIZES),
        help=f"WC lengths for the parity report (default: {','.join(map(str, PARITY_SIZES))})",
    )
    return parser.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields the user stated: the --config file, then flags."""
    overrides = json.loads(args.config.read_text()) if args.config else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"--config: a LensNet config is an object of its fields, got {type(overrides).__name__}")
    overrides.update({name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None})
    if args.bidirectional:
        overrides["causal"] = False
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # torch and onnx are the `export` extra: not in the service's runtime image
        from .build import ParityError, build_artifact
        from .checkpoint import CheckpointError, load_lensnet
        from .lensnet import LensNet, init_random
    except ImportError as exc:
        print(f"lensnet-export: needs the export extra (pip install 'lensnet-focus[export]'): {exc}", file=sys.stderr)
        return 2
    try:
        sizes = args.parity_sizes
        overrides = config_overrides(args)
        if args.random_init:
            model = init_random(LensNet(LensNetConfig.from_dict(overrides)), args.seed).eval()
            source = Source(kind="random-init", seed=args.seed)
            info = ModelInfo(
                name=args.name or "lensnet-demo",
                version=args.model_version,
                description=args.description
                or "UNTRAINED demonstration model (random weights): for trying the service, not for decisions.",
                trained=False,
            )
        else:
            model = load_lensnet(args.checkpoint, overrides)
            if defaulted := [name for name in NOT_IN_WEIGHTS if name not in overrides]:
                chosen = ", ".join(f"{name}={getattr(model.config, name)!r}" for name in defaulted)
                note = "state them if the model was trained otherwise: parity cannot tell"
                print(f"lensnet-export: not in the weights and not stated, so the defaults: {chosen} ({note})",
                      file=sys.stderr)  # fmt: skip
            source = Source(kind="checkpoint", file=args.checkpoint.name, sha256=sha256_file(args.checkpoint))
            info = ModelInfo(
                name=args.name or "lensnet",
                version=args.model_version,
                description=args.description or f"exported from {args.checkpoint.name}",
                trained=True,
            )
        manifest = build_artifact(model, args.out, info, source, parity_sizes=sizes, force=args.force)
    except ParityError as exc:
        print(f"lensnet-export: {exc}", file=sys.stderr)
        print(exc.report.model_dump_json(indent=2), file=sys.stderr)
        return 1
    except (CheckpointError, FileExistsError, ValueError, OSError) as exc:
        print(f"lensnet-export: {exc}", file=sys.stderr)
        return 2
    parity = manifest.parity
    print(
        f"wrote {args.out}: {info.name} {info.version}, D={model.config.embed_dim}, layers={model.config.layers}; "
        f"parity fp32 vs torch {parity.fp32_vs_torch_max_abs:.2e}, fp16 vs fp32 {parity.fp16_vs_fp32_max_abs:.2e}, "
        f"fp16 sign agreement {parity.fp16_sign_agreement:.4f}"
    )
    return 0
