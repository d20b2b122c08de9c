"""Fused, memory-linear causal attention for the exported graphs.

`lensnet.attention` (PyTorch SDPA) states the math. For export, each block's attention becomes
the custom op `lensnet::attention`, which the ONNX exporter translates into one of these
constructions over ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (MHA):

- `block-causal` (the fp32 graph): ORT's CPU MHA runs a flash kernel (memory linear in N) only
  when it is *not* causal; with `unidirectional=1` it writes out every N x N score. So, for
  N > WRITTEN_OUT_MAX, causal attention is decomposed into non-causal pieces. Split the (padded) sequence in halves,
  recursively, `LEVELS` times: at each level the right half of every segment attends to its
  whole left half (one batched non-causal MHA call); the 2^LEVELS leaf blocks attend to
  themselves causally, written out (N x N / 2^LEVELS scores). Every pair j <= i is covered
  exactly once, the work is the causal half of N², and the memory is linear but for the leaves.
  Pieces are merged through their softmax sums: each MHA call gets one extra "sentinel" key
  whose score is the lowest any key can have (-sqrt(hd): q and k are RMS-normalised, so
  |q·k| <= hd) and whose value is 1 in an extra channel; that channel's output is
  e^{-sqrt(hd)} / Z, which gives the piece's sum Z and its unnormalised output exactly. The
  leaves use the same e^{s + sqrt(hd)} weights, so all pieces add up without a max pass; fp32
  holds them for head_dim <= MAX_HEAD_DIM. Up to WRITTEN_OUT_MAX entries an `If` takes the
  written-out attention instead (MatMul, causal mask, Softmax, MatMul): the N x N scores are
  small there, and one matmul beats the pieces' dozens of small calls.
- `causal-mha` (the fp16 graph): one MHA with `unidirectional=1`: ORT's CUDA flash and
  memory-efficient kernels (fp16 inputs, fp32 softmax accumulation). On the CPU this writes
  out N x N, which is why the fp32 graph is the CPU's.
- `mha`: a non-causal model gets one plain MHA in both graphs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op

from .config import MAX_HEAD_DIM
from .lensnet import attention

Value = Any
"""A traced ONNX value: what the exporter passes to a translation (its symbolic tensor type)."""
LEVELS = 7
"""Halvings of the block-causal construction: N is padded to a multiple of 2^LEVELS = 128 and
the leaf blocks are N / 128 long (64 at N = 8,192: 8 MiB of leaf scores for 4 heads)."""
WRITTEN_OUT_MAX = 512
"""Largest N the block-causal graph computes written out (1 MiB of scores per head). Measured on
the 2-core CPU (one attention, 4 heads of 64): the pieces take 0.74x the written-out CPU time at
N = 768 and 0.64x at 1,024; at 512 both cost the same, and with two threads the written-out
graph's fewer operators win (13 vs 19 ms)."""

_MHA_SCHEMA = OpSchema(
    "MultiHeadAttention",
    "com.microsoft",
    1,
    inputs=[OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
    attributes=[
        OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "score scale"),
        OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "1: causal"),
    ],
)
_MHA = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", _MHA_SCHEMA)
_MARKER_DOMAIN = "lensnet.export"
_MARKER_SCHEMA = OpSchema(
    "CausalAttention",
    _MARKER_DOMAIN,
    1,
    inputs=[OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)"], "")],
)
_MARKER = onnxscript.values.Op(onnxscript.values.Opset(_MARKER_DOMAIN, 1), "CausalAttention", _MARKER_SCHEMA)
"""Stands for a block-causal attention until `expand_block_causal` replaces it with its `If`."""


@torch.library.custom_op("lensnet::attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, construction: str) -> torch.Tensor:
    """`lensnet.attention` as an opaque op for the exporter; eager calls compute the reference."""
    return attention(q, k, v, causal).contiguous()


@fused_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, construction: str) -> torch.Tensor:
    return torch.empty_like(v)


def _ints(*values: int) -> Value:
    return op.Constant(value=onnx.helper.make_tensor("ints", onnx.TensorProto.INT64, [len(values)], list(values)))


def _float(value: float) -> Value:
    return op.Constant(value_float=value)


def _array(value: np.ndarray) -> Value:
    return op.Constant(value=onnx.numpy_helper.from_array(value.astype(np.float32)))


def onnx_attention(q: Value, k: Value, v: Value, causal: bool, construction: str) -> Value:
    """The exporter's translation of `lensnet::attention`: `[B, N, H, hd]` in and out.

    Besides the manifest's constructions it knows the two branches of `block-causal`:
    `pieces` (the decomposition) and `written-out`."""
    heads, head_dim = q.shape[2], q.shape[3]
    if construction in ("mha", "causal-mha"):
        if causal != (construction == "causal-mha"):
            raise ValueError(f"attention construction {construction!r} does not fit causal={causal}")
        return _mha(q, k, v, heads, head_dim, causal=causal)
    if construction not in ("block-causal", "pieces", "written-out") or not causal:
        raise ValueError(f"attention construction {construction!r} does not fit causal={causal}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"block-causal attention supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if construction == "written-out":
        return _written_out(q, k, v, head_dim)
    return _block_causal(q, k, v, heads, head_dim) if construction == "pieces" else _MARKER(q, k, v)


def _written_out(q: Value, k: Value, v: Value, head_dim: int) -> Value:
    """softmax(q k^T / sqrt(hd) + causal mask) v, with every score in memory."""
    scores = op.Mul(
        op.MatMul(op.Transpose(q, perm=[0, 2, 1, 3]), op.Transpose(k, perm=[0, 2, 3, 1])), _float(head_dim**-0.5)
    )
    index = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(q, start=1, end=2)), op.Constant(value_int=1))
    future = op.Greater(op.Unsqueeze(index, _ints(0)), op.Unsqueeze(index, _ints(1)))
    weights = op.Softmax(op.Where(future, _float(-math.inf), scores), axis=-1)
    return op.Transpose(op.MatMul(weights, op.Transpose(v, perm=[0, 2, 1, 3])), perm=[0, 2, 1, 3])


def _mha(q: Value, k: Value, v: Value, heads: int, head_dim: int, causal: bool) -> Value:
    packed = op.Concat(op.Shape(q, start=0, end=2), _ints(heads * head_dim), axis=0)
    y = _MHA(
        op.Reshape(q, packed), op.Reshape(k, packed), op.Reshape(v, packed),
        num_heads=heads, scale=head_dim**-0.5, unidirectional=int(causal),
    )  # fmt: skip
    return op.Reshape(y, op.Shape(v))


def _block_causal(q: Value, k: Value, v: Value, heads: int, head_dim: int) -> Value:
    """See the module docstring. Shapes: B batch, P padded length, H heads, d = head_dim."""
    h, d, wide = heads, head_dim, head_dim + 1
    root = math.sqrt(d)
    b, n = op.Shape(q, start=0, end=1), op.Shape(q, start=1, end=2)
    unit = 2**LEVELS
    p = op.Mul(op.Div(op.Add(n, _ints(unit - 1)), _ints(unit)), _ints(unit))
    pads = op.Concat(_ints(0, 0, 0, 0, 0), op.Sub(p, n), _ints(0, 0), axis=0)
    # Padding goes after the last entry: no real query sees a padded key.
    q, k, v = op.Pad(q, pads), op.Pad(k, pads), op.Pad(v, pads)
    column = op.Concat(b, p, _ints(h, 1), axis=0)
    ones, zeros = op.Expand(_float(1.0), column), op.Expand(_float(0.0), column)
    # One extra channel: q·1 times the sentinel's -d scores -sqrt(d); real keys and values get 0 there.
    q_wide, k_wide, v_wide = op.Concat(q, ones, axis=-1), op.Concat(k, zeros, axis=-1), op.Concat(v, zeros, axis=-1)
    sentinel_k = _array(
        np.concatenate([np.zeros((1, 1, h, d)), np.full((1, 1, h, 1), -float(d))], -1).reshape(1, 1, -1)
    )
    sentinel_v = _array(np.concatenate([np.zeros((1, 1, h, d)), np.ones((1, 1, h, 1))], -1).reshape(1, 1, -1))
    total, weight = None, None
    for level in range(LEVELS):
        groups, half = op.Mul(b, _ints(2**level)), op.Div(p, _ints(2 ** (level + 1)))
        split = op.Concat(groups, _ints(2), half, _ints(h * wide), axis=0)
        right_q = op.Squeeze(op.Slice(op.Reshape(q_wide, split), _ints(1), _ints(2), _ints(1)), _ints(1))
        left_k = op.Squeeze(op.Slice(op.Reshape(k_wide, split), _ints(0), _ints(1), _ints(1)), _ints(1))
        left_v = op.Squeeze(op.Slice(op.Reshape(v_wide, split), _ints(0), _ints(1), _ints(1)), _ints(1))
        one_row = op.Concat(groups, _ints(1, h * wide), axis=0)
        left_k = op.Concat(left_k, op.Expand(sentinel_k, one_row), axis=1)
        left_v = op.Concat(left_v, op.Expand(sentinel_v, one_row), axis=1)
        y = _MHA(right_q, left_k, left_v, num_heads=h, scale=1.0 / root)
        y = op.Reshape(y, op.Concat(groups, half, _ints(h, wide), axis=0))
        inverse = op.Reciprocal(op.Slice(y, _ints(d), _ints(wide), _ints(3)))  # Z e^{sqrt d} + 1
        piece = op.Mul(op.Slice(y, _ints(0), _ints(d), _ints(3)), inverse)  # sum_j e^{s_j + sqrt d} v_j
        piece_weight = op.Sub(inverse, _float(1.0))  # sum_j e^{s_j + sqrt d}
        # Back to full length: the left halves (the keys) get nothing from this level.
        left_pad = _ints(0, 1, 0, 0, 0, 0, 0, 0, 0, 0)
        piece = op.Reshape(op.Pad(op.Unsqueeze(piece, _ints(1)), left_pad), op.Concat(b, p, _ints(h, d), axis=0))
        piece_weight = op.Reshape(op.Pad(op.Unsqueeze(piece_weight, _ints(1)), left_pad), column)
        total = piece if total is None else op.Add(total, piece)
        weight = piece_weight if weight is None else op.Add(weight, piece_weight)
    # Leaves: causal blocks of P / 2^LEVELS entries, written out with the same weights.
    leaf = op.Div(p, _ints(unit))
    blocks = op.Concat(op.Mul(b, _ints(unit)), leaf, _ints(h, d), axis=0)
    leaf_q = op.Transpose(op.Reshape(q, blocks), perm=[0, 2, 1, 3])
    leaf_k = op.Transpose(op.Reshape(k, blocks), perm=[0, 2, 3, 1])
    leaf_v = op.Transpose(op.Reshape(v, blocks), perm=[0, 2, 1, 3])
    scores = op.Add(op.Mul(op.MatMul(leaf_q, leaf_k), _float(1.0 / root)), _float(root))
    index = op.Range(op.Constant(value_int=0), op.Squeeze(leaf), op.Constant(value_int=1))
    future = op.Greater(op.Unsqueeze(index, _ints(0)), op.Unsqueeze(index, _ints(1)))
    weights = op.Where(future, _float(0.0), op.Exp(scores))
    leaf_total = op.Reshape(
        op.Transpose(op.MatMul(weights, leaf_v), perm=[0, 2, 1, 3]), op.Concat(b, p, _ints(h, d), axis=0)
    )
    leaf_weight = op.Reshape(op.Transpose(op.ReduceSum(weights, _ints(-1)), perm=[0, 2, 1, 3]), column)
    out = op.Div(op.Add(total, leaf_total), op.Add(weight, leaf_weight))
    return op.Slice(out, _ints(0), n, _ints(1))


TRANSLATIONS = {torch.ops.lensnet.attention.default: onnx_attention}
"""The exporter's `custom_translation_table`."""


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter narrates to stdout and warns about optional torchvision ops; keep the CLI quiet."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class _Attend(torch.nn.Module):
    def __init__(self, construction: str) -> None:
        super().__init__()
        self.construction = construction

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fused_attention(q, k, v, self.construction != "mha", self.construction)


def attention_model(construction: str, heads: int, head_dim: int, dtype: torch.dtype) -> onnx.ModelProto:
    """One attention alone as an ONNX model: inputs q, k, v and output y, `[B, N, H, hd]`."""
    example = tuple(torch.randn(2, 5, heads, head_dim).to(dtype) for _ in range(3))
    axes = {0: torch.export.Dim("b"), 1: torch.export.Dim("n")}
    with quiet_exporter():
        program = torch.onnx.export(
            _Attend(construction), example, dynamo=True, opset_version=18, input_names=["q", "k", "v"],
            output_names=["y"], dynamic_shapes={"q": axes, "k": axes, "v": axes}, custom_translation_table=TRANSLATIONS,
        )  # fmt: skip
    proto = program.model_proto
    expand_block_causal(proto, heads, head_dim)
    return proto


def expand_block_causal(proto: onnx.ModelProto, heads: int, head_dim: int) -> None:
    """Replace every `CausalAttention` marker by `If(N <= WRITTEN_OUT_MAX, written-out, pieces)`."""
    graph = proto.graph
    if not any(node.domain == _MARKER_DOMAIN for node in graph.node):
        return
    branches = {c: attention_model(c, heads, head_dim, torch.float32).graph for c in ("written-out", "pieces")}
    limit = "causal_attention_written_out_max"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([WRITTEN_OUT_MAX], np.int64), limit))
    nodes = []
    for i, node in enumerate(graph.node):
        if node.domain != _MARKER_DOMAIN:
            nodes.append(node)
            continue
        name = f"causal_attention_{i}"
        q = node.input[0]
        nodes += [
            onnx.helper.make_node("Shape", [q], [f"{name}_n"], f"{name}_n", start=1, end=2),
            onnx.helper.make_node("LessOrEqual", [f"{name}_n", limit], [f"{name}_small"], f"{name}_small"),
            onnx.helper.make_node(
                "If", [f"{name}_small"], list(node.output), name,
                then_branch=_bound(branches["written-out"], list(node.input), f"{name}_w_"),
                else_branch=_bound(branches["pieces"], list(node.input), f"{name}_p_"),
            ),
        ]  # fmt: skip
    graph.ClearField("node")
    graph.node.extend(nodes)
    imports = [o for o in proto.opset_import if o.domain != _MARKER_DOMAIN]
    if not any(o.domain == "com.microsoft" for o in imports):
        imports.append(onnx.helper.make_opsetid("com.microsoft", 1))
    proto.ClearField("opset_import")
    proto.opset_import.extend(imports)


def _bound(branch: onnx.GraphProto, inputs: list[str], prefix: str) -> onnx.GraphProto:
    """`branch` as an If branch: its inputs read the outer `inputs`, every other name prefixed."""
    graph = copy.deepcopy(branch)
    outer = {value.name: name for value, name in zip(graph.input, inputs, strict=True)}

    def rename(name: str) -> str:
        return outer.get(name, prefix + name) if name else name

    for node in graph.node:
        node.name = prefix + node.name
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for value in graph.output:
        value.name = rename(value.name)
    graph.ClearField("input")
    graph.ClearField("value_info")
    graph.name = prefix.rstrip("_")
    return graph
