"""Build a complete artifact directory: graphs, parity gate, manifest — atomically.

Everything is written to a temporary sibling directory and renamed into place only after the
parity bounds are met, so a failed export never leaves an artifact that looks valid.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import onnx
import onnxruntime
import torch

from model_export.artifact import (
    GRAPH_FILES,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    WRITTEN_OUT_ON_CPU,
    Manifest,
    ModelInfo,
    ParityReport,
    Source,
    describe_files,
)

from .config import PARITY_SIZES
from .lensnet import LensNet
from .onnx_graphs import OPSET, export_graph
from .parity import measure_parity


class ParityError(RuntimeError):
    """The exported graphs do not compute what the PyTorch module computes."""

    def __init__(self, report: ParityReport) -> None:
        b = report.bounds
        super().__init__(
            "exported graphs failed the parity bounds: "
            f"fp32 vs torch max|Δ| {report.fp32_vs_torch_max_abs:.3g} (bound {b.fp32_vs_torch_max_abs}), "
            f"fp16 vs fp32 max|Δ| {report.fp16_vs_fp32_max_abs:.3g} (bound {b.fp16_vs_fp32_max_abs}), "
            f"fp16 sign agreement {report.fp16_sign_agreement:.4f} (bound {b.fp16_sign_agreement})"
        )
        self.report = report


def _replace_dir(source: Path, target: Path) -> None:
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        source.rename(target)
        shutil.rmtree(retired)
    else:
        source.rename(target)


def build_artifact(
    model: LensNet,
    out_dir: Path,
    info: ModelInfo,
    source: Source,
    parity_sizes: Sequence[int] = PARITY_SIZES,
    parity_seed: int = 0,
    force: bool = False,
) -> Manifest:
    """Export `model` into `out_dir` and return the manifest written there."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; artifacts are read by other users (containers)
    try:
        graphs = {precision: export_graph(model, precision, staging / name) for precision, name in GRAPH_FILES.items()}
        paths = {precision: staging / spec.file for precision, spec in graphs.items()}
        written_out = graphs["fp16"].attention in WRITTEN_OUT_ON_CPU
        parity = measure_parity(model, paths, parity_sizes, parity_seed, fp16_written_out=written_out)
        if not parity.passed:
            raise ParityError(parity)
        manifest = Manifest(
            format_version=MANIFEST_FORMAT,
            model=info,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config=model.config,
            source=source,
            graphs=graphs,
            files=describe_files(staging, [spec.file for spec in graphs.values()]),
            parity=parity,
            export={
                "opset": str(OPSET),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        )
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
