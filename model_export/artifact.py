"""The model artifact contract: `manifest.json` beside the ONNX graphs, and its verification.

`model_export` writes artifacts in this format; the service refuses any artifact whose manifest
does not parse or whose files do not match their recorded size and sha256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import LensNetConfig

MANIFEST_NAME = "manifest.json"
CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
"""ONNX Runtime's names of the execution providers a graph can be built for (`GraphSpec.providers`)."""
MANIFEST_FORMAT = 3
"""2: no Cast adapter graphs (the service converts embeddings itself); 3: fused attention, named
per graph (`GraphSpec.attention`). Older artifacts are refused: re-export them with lensnet-export."""
GRAPH_FILES: dict[str, str] = {"fp32": "lensnet.fp32.onnx", "fp16": "lensnet.fp16.onnx"}
GRAPH_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16"}
"""The embeddings input dtype of each graph (lod/positions are int64, scores float32 in both)."""

Precision = Literal["fp32", "fp16"]
Attention = Literal["block-causal", "causal-mha", "mha"]
"""How a graph computes attention (model_export/fused_attention.py): `block-causal` (causal from
non-causal fused pieces; the CPU's fp32 graph), `causal-mha` (ORT's fused causal kernels; the CUDA
fp16 graph), `mha` (a non-causal model)."""
WRITTEN_OUT_ON_CPU: frozenset[Attention] = frozenset({"causal-mha"})
"""Constructions whose attention the CPU EP computes by writing out N x N scores (memory N²)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str
    version: str
    description: str
    trained: bool


class Source(_Strict):
    kind: Literal["checkpoint", "random-init"]
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]


class GraphSpec(_Strict):
    file: str
    attention: Attention
    providers: list[str] = Field(min_length=1)
    """ONNX Runtime execution providers this graph's attention is built for; `--precision auto`
    only considers (and times) the graphs built for the provider in use."""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def runs_on(self, provider: str) -> bool:
        """Whether a runtime may run this graph on `provider`: one it is built for, and never the
        block-causal construction on CUDA, which artifacts exported before 2026-11-28 still list:
        on an H200 (onnxruntime-gpu 1.31.1 with torch's CUDA 13 libraries) its `If` faulted the
        process's CUDA context, see benchmarks/reports/2026-11-28-h200/faults.txt."""
        return provider in self.providers and not (self.attention == "block-causal" and provider == CUDA_PROVIDER)


class FileEntry(_Strict):
    size: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ParityCase(_Strict):
    """One WC size's parity. The fp16 fields are null where the export did not run the fp16 graph:
    its CPU-run attention would write out more than `parity.WRITTEN_OUT_MAX_BYTES` of scores."""

    n: int
    batch: int
    fp32_vs_torch_max_abs: float
    fp16_vs_fp32_max_abs: float | None
    fp16_sign_agreement: float | None
    fp16_sign_entries: int | None


class ParityBounds(_Strict):
    fp32_vs_torch_max_abs: float = 1e-4
    fp16_vs_fp32_max_abs: float = 2e-2
    fp16_sign_agreement: float = 0.99
    sign_min_abs_score: float = 0.05


class ParityReport(_Strict):
    bounds: ParityBounds
    cases: list[ParityCase]
    fp32_vs_torch_max_abs: float
    fp16_vs_fp32_max_abs: float
    fp16_sign_agreement: float
    passed: bool


class Manifest(_Strict):
    format_version: int
    model: ModelInfo
    created_at: str
    config: LensNetConfig
    source: Source
    graphs: dict[Precision, GraphSpec]
    files: dict[str, FileEntry]
    parity: ParityReport
    export: dict[str, str]


class ArtifactError(RuntimeError):
    """The artifact is missing, malformed, or does not match its checksums."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, FileEntry]:
    """Size and sha256 of each named file, as the manifest records them."""
    return {
        name: FileEntry(size=(directory / name).stat().st_size, sha256=sha256_file(directory / name)) for name in names
    }


def load_manifest(directory: Path) -> Manifest:
    """Parse and verify an artifact directory; raise `ArtifactError` with every problem found."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME} (is this a model artifact directory?)")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ArtifactError(f"{path}: invalid manifest: {exc}") from exc
    if manifest.format_version != MANIFEST_FORMAT:
        raise ArtifactError(
            f"{path}: manifest format {manifest.format_version}, this service reads {MANIFEST_FORMAT} "
            "(re-export the model with lensnet-export)"
        )
    referenced = [graph.file for graph in manifest.graphs.values()]
    problems = [f"{name}: referenced but not listed in files" for name in referenced if name not in manifest.files]
    for name, entry in manifest.files.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry.size:
            problems.append(f"{name}: size {file.stat().st_size}, manifest says {entry.size}")
        elif sha256_file(file) != entry.sha256:
            problems.append(f"{name}: sha256 does not match the manifest")
    if not manifest.parity.passed:
        problems.append("parity report says the export did not meet its bounds")
    if problems:
        raise ArtifactError(f"{directory}: artifact failed verification: " + "; ".join(problems))
    return manifest
