"""ONNX graphs of an artifact: the LensNet graph per precision."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from onnxscript import opset18 as op

from model_export.artifact import CPU_PROVIDER, CUDA_PROVIDER, GRAPH_DTYPES, Attention, GraphSpec, Precision, TensorSpec

from .fused_attention import TRANSLATIONS, expand_block_causal, fused_attention, quiet_exporter
from .lensnet import LensNet

OPSET = 18
INPUT_NAMES = ["embeddings", "lod", "positions"]
OUTPUT_NAMES = ["scores", "non_finite"]
CONSTRUCTIONS: dict[Precision, Attention] = {"fp32": "block-causal", "fp16": "causal-mha"}
"""Each graph's causal attention (model_export/fused_attention.py): fp32 is the CPU's graph
(flash-style pieces, memory linear in N), fp16 the CUDA one (ORT's fused causal kernels)."""
BUILT_FOR: dict[Attention, list[str]] = {
    # CPU only: on an H200 (onnxruntime-gpu 1.31.1, torch's CUDA 13 libraries) its If node faulted
    # the CUDA context (benchmarks/reports/2026-11-28-h200/faults.txt), and where it ran it was
    # 4.4x slower than causal-mha at N = 8,192 (its 65-wide heads miss the flash kernel).
    "block-causal": [CPU_PROVIDER],
    "causal-mha": [CUDA_PROVIDER],  # ORT's CPU MHA writes out N x N scores when causal
    "mha": [CPU_PROVIDER, CUDA_PROVIDER],
}
"""The providers each construction is built for (the manifest's `GraphSpec.providers`)."""


class ServingGraph(torch.nn.Module):
    """What the artifact graphs compute: LensNet's scores, plus a per-entry flag for embeddings
    holding NaN/inf. Checking inside the graph reads the input once, on the device, instead of a
    separate CPU pass over N x D values on every request. The flag is `isnan(sum(x * 0))`: 0 * a
    finite value is 0 and 0 * inf is NaN, which every sum keeps (IEEE 754), so it equals
    `~isfinite(x).all(-1)` in two passes where the elementwise checks took seven (~20 ms at 8k)."""

    def __init__(self, model: LensNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, embeddings: torch.Tensor, lod: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(embeddings, lod, positions), torch.isnan((embeddings * 0).sum(dim=-1))


def _example_inputs(model: LensNet, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Sizes > 1 on every dynamic axis, so the exporter cannot specialise them.
    batch, n = 2, 3 * model.config.block_size + 5
    lod = torch.zeros(batch, n, dtype=torch.int64)
    positions = torch.arange(n, dtype=torch.int64).repeat(batch, 1)
    return torch.randn(batch, n, model.config.embed_dim).to(dtype), lod, positions


def graph_spec(path: Path, attention: Attention) -> GraphSpec:
    """Input/output names, dtypes and shapes as the graph declares them."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorSpec(name=value.name, dtype=dtype, shape=dims)

    return GraphSpec(
        file=path.name,
        attention=attention,
        providers=BUILT_FOR[attention],
        inputs=[spec(v) for v in graph.input],
        outputs=[spec(v) for v in graph.output],
    )


def export_graph(model: LensNet, precision: Precision, path: Path) -> GraphSpec:
    """Export `model` (fp32) as the `precision` `ServingGraph`: dynamic batch and N axes, opset 18,
    fused attention (`CONSTRUCTIONS`), and no checkout-specific bytes (see `_strip_provenance`).

    fp16 runs the transformer blocks in fp16 (norms and attention stay fp32 inside the module)
    and keeps positional tables, features, head and the score output in fp32.
    """
    model = copy.deepcopy(model).eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if precision == "fp16":
        model.blocks.half()
    attention = CONSTRUCTIONS[precision] if model.config.causal else "mha"
    for block in model.blocks:
        block.attn.attend = functools.partial(fused_attention, construction=attention)
    batch, n = torch.export.Dim("batch"), torch.export.Dim("n")
    axes = {0: batch, 1: n}
    with quiet_exporter():
        program = torch.onnx.export(
            ServingGraph(model),
            _example_inputs(model, dtype),
            dynamo=True,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_shapes={"embeddings": axes, "lod": axes, "positions": axes},
            custom_translation_table={**TRANSLATIONS, torch.ops.aten.rms_norm.default: _rms_norm},
        )
    proto = program.model_proto
    expand_block_causal(proto, model.config.num_heads, model.config.head_dim)
    _strip_provenance(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path))
    spec = graph_spec(path, attention)
    got = {t.name: t.dtype for t in spec.inputs + spec.outputs}
    want = {"embeddings": GRAPH_DTYPES[precision], "lod": "int64", "positions": "int64"}
    want |= {"scores": "float32", "non_finite": "bool"}
    if got != want:
        raise RuntimeError(f"{path.name}: exported graph has dtypes {got}, expected {want}")
    return spec


def _rms_norm(x: Any, normalized_shape: list[int], weight: Any = None, eps: float | None = None) -> Any:
    """`F.rms_norm` (weightless, as LensNet uses it) in the form ONNX Runtime fuses into one
    `SimplifiedLayerNormalization`: x / sqrt(mean(x^2) + eps) * ones. The exporter's own form
    (... -> Reciprocal -> Mul, no scale) is not fused: six passes over the tensor, ~45 ms at 8k."""
    if weight is not None or len(normalized_shape) != 1:
        raise ValueError("the export fuses weightless RMSNorm over the last axis only")
    epsilon = float(torch.finfo(torch.float32).eps) if eps is None else eps
    ones = op.Constant(value=onnx.numpy_helper.from_array(np.ones(normalized_shape, np.float32)))
    last = op.Constant(value=onnx.helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1]))
    mean_square = op.ReduceMean(op.Pow(x, op.Constant(value_float=2.0)), last)
    return op.Mul(op.Div(x, op.Sqrt(op.Add(mean_square, op.Constant(value_float=epsilon)))), ones)


def _strip_provenance(proto: onnx.ModelProto) -> None:
    """Drop doc strings and metadata (the exporter records source file paths and stack traces in
    them), so the same weights give the same bytes from any checkout."""
    del proto.metadata_props[:]
    proto.doc_string = ""
    for graph in [proto.graph, *proto.functions]:
        _strip_graph(graph)


def _strip_graph(graph: onnx.GraphProto | onnx.FunctionProto) -> None:
    graph.doc_string = ""
    del graph.metadata_props[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in _GRAPH_ATTRIBUTES else []:
                _strip_graph(subgraph)
    if isinstance(graph, onnx.GraphProto):
        for item in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            item.doc_string = ""
            del item.metadata_props[:]


_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
