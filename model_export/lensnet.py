"""LensNet, the training repo's "transformer" focus scorer, reproduced for export.

Same parameters and `state_dict` keys as `mc/lensnet.py` (nanochat blocks + Gaussian RoPE +
auxiliary features + tanh head), so its checkpoints load with `strict=True`. Two deliberate,
documented difference, invisible for one snapshot per call: `dist_feat` is normalised per
snapshot (the reference divides by the batch-wide maximum).
Precision policy: the blocks run in their parameters' dtype (fp32, or fp16 for the fp16 graph);
norms and attention are computed in fp32; features and head always run in fp32.
Each block's attention goes through `SelfAttention.attend` (default: `attention`, PyTorch's SDPA),
so the exporter can put a fused ONNX construction of the same function in its place
(`model_export/fused_attention.py`) while this module stays the plain statement of the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEVEL_EMBEDDINGS, LensNetConfig

ROPE_BASE = 10000.0


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Weightless RMSNorm over the last axis, computed in fp32 (as PyTorch's kernels do)."""
    return F.rms_norm(x.float(), (x.size(-1),)).to(x.dtype)


def rotary_tables(
    lod: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, decay: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian RoPE tables `[Bt, N, 1, head_dim/2]`, rounded to bf16 like the reference.

    `theta` is formed in fp32 exactly as the reference does; its cos/sin are evaluated in fp64
    and rounded once to fp32, so every backend (PyTorch, ONNX Runtime CPU/CUDA) gets the
    correctly rounded value and the bf16 rounding that follows cannot flip between them.
    `decay[lod]` is a per-level table (`exp(-0.5 (sigma * inv_freq)^2)`, or ones for "simple").
    """
    theta = (positions.float()[..., None] * inv_freq).double()
    damp = decay[lod]
    cos = torch.cos(theta).float() * damp
    sin = torch.sin(theta).float() * damp
    return cos[:, :, None, :].bfloat16().float(), sin[:, :, None, :].bfloat16().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension (nanochat's convention)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scaled dot-product attention over `[Bt, N, H, hd]` (entry i sees entries <= i when causal),
    computed in fp32 whatever the blocks' dtype; PyTorch's fused kernels keep memory linear in N."""
    dtype = v.dtype
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).to(dtype)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.num_heads, self.causal = config.num_heads, config.causal
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.attend: Attend = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bt, n, d = x.shape
        shape = (bt, n, self.num_heads, d // self.num_heads)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        y = self.attend(q, k, v, self.causal)
        return self.c_proj(y.reshape(bt, n, d))


class MLP(nn.Module):
    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.embed_dim, 4 * config.embed_dim, bias=False)
        self.c_proj = nn.Linear(4 * config.embed_dim, config.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin)
        return x + self.mlp(rms_norm(x))


def _feature_mlp(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))


class LensNet(nn.Module):
    """Scores each WC entry in `[-1, 1]`: embeddings `[Bt, N, D]`, lod/positions `[Bt, N]` → `[Bt, N]`."""

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.level_embed = nn.Embedding(LEVEL_EMBEDDINGS, d)
        self.span_mlp = _feature_mlp(d)
        self.dist_mlp = _feature_mlp(d)
        if config.head == "mlp":
            self.scorer: nn.Module = nn.Sequential(
                nn.Linear(2 * d, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, 1)
            )
        else:
            self.scorer = nn.Linear(2 * d, 1)
        # Per-level constants, computed once in fp32 exactly as the reference computes them per
        # entry; as tables they are bit-identical in every backend (see rotary_tables).
        channels = torch.arange(0, config.head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (ROPE_BASE ** (channels / config.head_dim))
        levels = torch.arange(LEVEL_EMBEDDINGS, dtype=torch.float32)
        sigma = torch.pow(float(config.block_size), levels).clamp(min=1.0)
        decay = torch.exp(-0.5 * (sigma[:, None] * inv_freq) ** 2)
        if config.positional == "simple":
            decay = torch.ones_like(decay)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("decay", decay, persistent=False)
        self.register_buffer("span_width", torch.exp(levels * math.log(config.block_size)), persistent=False)

    @property
    def block_dtype(self) -> torch.dtype:
        return self.blocks[0].attn.c_q.weight.dtype

    def forward(self, embeddings: torch.Tensor, lod: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary_tables(lod, positions, self.inv_freq, self.decay)
        dtype = self.block_dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = embeddings.to(dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        span = self.span_width[lod][..., None]
        dist = positions.float()
        dist = dist / dist.amax(dim=-1, keepdim=True).clamp(min=1.0)
        features = self.level_embed(lod) + self.span_mlp(span) + self.dist_mlp(dist[..., None])
        x = x.to(features.dtype)
        return torch.tanh(self.scorer(torch.cat([x, features], dim=-1)).squeeze(-1))


def init_random(model: LensNet, seed: int) -> LensNet:
    """Deterministic demo weights for an untrained model.

    Every path contributes (unlike nanochat's zeroed projections), feature inputs are scaled to
    their range (span widths reach `B ** max_lod`), and the last head layer is standardised on
    a fixed calibration snapshot so untrained scores spread over [-1, 1] around 0 instead of
    saturating. Nothing here is meaningful beyond "exercises every code path".
    """
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    input_range = {"span_mlp.0.weight": float(cfg.block_size**cfg.max_lod), "dist_mlp.0.weight": 1.0}
    # Calibration snapshot: 16 entries per level from the top down, then 64 tokens (valid: each
    # run of 16 level-l entries ends on a multiple of B**l, where any lower level may start).
    lod = torch.tensor([lvl for lvl in range(cfg.max_lod, -1, -1) for _ in range(16)] + [0] * 64)
    pos = torch.cumsum(torch.pow(cfg.block_size, lod), 0) - torch.pow(cfg.block_size, lod)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif name in input_range:
                param.normal_(0.0, 1.0 / input_range[name], generator=generator)
            else:
                fan_in = param.shape[1] if param.ndim == 2 and "level_embed" not in name else 1
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        x = torch.randn(1, lod.numel(), cfg.embed_dim, generator=generator)
        last = model.scorer[-1] if isinstance(model.scorer, nn.Sequential) else model.scorer
        captured: list[torch.Tensor] = []
        hook = last.register_forward_hook(lambda _m, _i, out: captured.append(out))
        model(x, lod[None], pos[None])
        hook.remove()
        logits = captured[0]
        scale = 0.8 / logits.std().clamp(min=1e-6)
        last.weight.mul_(scale)
        last.bias.copy_(-logits.mean() * scale)
    return model
