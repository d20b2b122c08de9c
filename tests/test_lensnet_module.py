"""The PyTorch LensNet reproduces the training repo's function and parameter layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lensnet_client.layout import synthetic_layout
from model_export.config import LensNetConfig
from model_export.lensnet import LensNet, init_random

# Written out from docs/lensnet-reference.md ("state_dict keys (a 2-layer, mlp-head model)").
REFERENCE_KEYS_2_LAYER_MLP = {
    f"blocks.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "attn.c_q.weight": ("D", "D"),
        "attn.c_k.weight": ("D", "D"),
        "attn.c_v.weight": ("D", "D"),
        "attn.c_proj.weight": ("D", "D"),
        "mlp.c_fc.weight": ("4D", "D"),
        "mlp.c_proj.weight": ("D", "4D"),
    }.items()
} | {
    "level_embed.weight": (4, "D"),
    "span_mlp.0.weight": ("D", 1),
    "span_mlp.0.bias": ("D",),
    "span_mlp.2.weight": ("D", "D"),
    "span_mlp.2.bias": ("D",),
    "dist_mlp.0.weight": ("D", 1),
    "dist_mlp.0.bias": ("D",),
    "dist_mlp.2.weight": ("D", "D"),
    "dist_mlp.2.bias": ("D",),
    "scorer.0.weight": ("H", "2D"),
    "scorer.0.bias": ("H",),
    "scorer.2.weight": (1, "H"),
    "scorer.2.bias": (1,),
}


def _resolve(shape: tuple, d: int, hidden: int) -> tuple[int, ...]:
    sizes = {"D": d, "4D": 4 * d, "2D": 2 * d, "H": hidden}
    return tuple(sizes.get(s, s) for s in shape)


@pytest.mark.parametrize("d", [64, 256])
def test_state_dict_matches_reference_keys_and_shapes(d: int) -> None:
    model = LensNet(LensNetConfig(embed_dim=d, layers=2, num_heads=4))
    hidden = max(2 * d // 2, 128)
    expected = {key: _resolve(shape, d, hidden) for key, shape in REFERENCE_KEYS_2_LAYER_MLP.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_linear_head_keys() -> None:
    model = LensNet(LensNetConfig(embed_dim=32, layers=1, num_heads=2, head="linear"))
    keys = model.state_dict()
    assert tuple(keys["scorer.weight"].shape) == (1, 64) and tuple(keys["scorer.bias"].shape) == (1,)
    assert not any(k.startswith("scorer.0") for k in keys)


def _reference_forward(model: LensNet, x: torch.Tensor, lod: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """An independent transcription of the training repo's forward (fp32), for one snapshot:
    SDPA with is_causal, rotary tables in fp32 → bf16, exp(lod·ln B) spans, batch-wide max."""
    cfg, sd = model.config, model.state_dict()
    hd, heads, b = cfg.head_dim, cfg.num_heads, cfg.block_size
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    theta = torch.einsum("bt,d->btd", pos.float(), inv_freq)
    sigma = (b ** lod.float()).clamp(min=1.0)
    decay = torch.exp(-0.5 * (sigma.unsqueeze(-1) * inv_freq) ** 2)
    cos = (torch.cos(theta) * decay)[:, :, None, :].bfloat16().float()
    sin = (torch.sin(theta) * decay)[:, :, None, :].bfloat16().float()

    def norm(t: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(t, (t.size(-1),))

    def rotary(t: torch.Tensor) -> torch.Tensor:
        d = t.shape[3] // 2
        t1, t2 = t[..., :d], t[..., d:]
        return torch.cat([t1 * cos + t2 * sin, t1 * (-sin) + t2 * cos], 3)

    bt, n, _ = x.shape
    for i in range(cfg.layers):
        p = f"blocks.{i}."
        h = norm(x)
        q, k, v = (F.linear(h, sd[p + f"attn.c_{c}.weight"]).view(bt, n, heads, hd) for c in "qkv")
        q, k = norm(rotary(q)), norm(rotary(k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + F.linear(y.transpose(1, 2).contiguous().view(bt, n, -1), sd[p + "attn.c_proj.weight"])
        h = F.relu(F.linear(norm(x), sd[p + "mlp.c_fc.weight"])).square()
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"])

    def feature_mlp(prefix: str, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(F.linear(t, sd[prefix + ".0.weight"], sd[prefix + ".0.bias"]))
        return F.linear(h, sd[prefix + ".2.weight"], sd[prefix + ".2.bias"])

    span = torch.exp(lod.float() * math.log(b)).unsqueeze(-1)
    cursor = pos.float() / torch.maximum(pos.float().max(), torch.tensor(1.0))
    features = F.embedding(lod, sd["level_embed.weight"]) + feature_mlp("span_mlp", span)
    features = features + feature_mlp("dist_mlp", cursor.unsqueeze(-1))
    h = torch.cat([x, features], dim=-1)
    h = F.relu(F.linear(h, sd["scorer.0.weight"], sd["scorer.0.bias"]))
    return torch.tanh(F.linear(h, sd["scorer.2.weight"], sd["scorer.2.bias"]).squeeze(-1))


def _snapshot(cfg: LensNetConfig, n: int, seed: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    layouts = [synthetic_layout(n, cfg.block_size, cfg.max_lod, rng) for _ in range(batch)]
    x = torch.from_numpy(rng.standard_normal((batch, n, cfg.embed_dim), dtype=np.float32))
    lod = np.stack([levels for levels, _ in layouts])
    return x, torch.from_numpy(lod), torch.from_numpy(np.stack([starts for _, starts in layouts]))


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (45, 1), (700, 2)])
def test_forward_matches_independent_reference(n: int, seed: int) -> None:
    cfg = LensNetConfig(embed_dim=64, layers=2, num_heads=4, block_size=4, max_lod=3)
    model = init_random(LensNet(cfg), seed=seed).eval()
    x, lod, pos = _snapshot(cfg, n, seed)
    with torch.no_grad():
        got, want = model(x, lod, pos), _reference_forward(model, x, lod, pos)
    # Not bit-exact: the module evaluates cos/sin in fp64 (so backends agree), and the reference's
    # fp32 cos can land on the other side of a bf16 rounding boundary for a few table entries.
    assert got.shape == (1, n)
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    assert got.std() > 0.05 if n > 1 else True  # scores are not collapsed to a constant


def test_scores_are_in_range_and_causal() -> None:
    cfg = LensNetConfig(embed_dim=32, layers=2, num_heads=2, block_size=4, max_lod=2)
    model = init_random(LensNet(cfg), seed=5).eval()
    x, lod, pos = _snapshot(cfg, 64, seed=5)
    changed = x.clone()
    changed[0, 40:] += 3.0
    # Keep the largest position (dist normalisation) unchanged: only embeddings move.
    with torch.no_grad():
        before, after = model(x, lod, pos), model(changed, lod, pos)
    assert before.abs().max() <= 1.0
    assert torch.equal(before[0, :40], after[0, :40])  # entry i never sees newer entries
    assert not torch.equal(before[0, 40:], after[0, 40:])


def test_bidirectional_config_sees_newer_entries() -> None:
    cfg = LensNetConfig(embed_dim=32, layers=1, num_heads=2, block_size=4, max_lod=2, causal=False)
    model = init_random(LensNet(cfg), seed=6).eval()
    x, lod, pos = _snapshot(cfg, 32, seed=6)
    changed = x.clone()
    changed[0, -1] += 3.0
    with torch.no_grad():
        assert not torch.equal(model(x, lod, pos)[0, :-1], model(changed, lod, pos)[0, :-1])


def test_batching_does_not_change_a_snapshots_scores() -> None:
    """dist_feat is normalised per snapshot, so a snapshot scores the same alone or in a batch."""
    cfg = LensNetConfig(embed_dim=32, layers=1, num_heads=2, block_size=4, max_lod=2)
    model = init_random(LensNet(cfg), seed=7).eval()
    x, lod, pos = _snapshot(cfg, 50, seed=7, batch=2)
    pos[1] += 4096  # very different position ranges
    with torch.no_grad():
        batched = model(x, lod, pos)
        alone = torch.cat([model(x[i : i + 1], lod[i : i + 1], pos[i : i + 1]) for i in range(2)])
    assert torch.allclose(batched, alone, atol=1e-6)


def test_simple_positional_kind_has_no_decay() -> None:
    cfg = LensNetConfig(embed_dim=32, layers=1, num_heads=2, positional="simple")
    assert torch.equal(LensNet(cfg).decay, torch.ones_like(LensNet(cfg).decay))
    gaussian = LensNet(LensNetConfig(embed_dim=32, layers=1, num_heads=2))
    assert gaussian.decay[2].min() < 1e-3  # LOD2 spans 1024 tokens: high frequencies are damped


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"embed_dim": 30, "num_heads": 4}, "multiple of num_heads"),
        ({"embed_dim": 24, "num_heads": 8}, "must be even"),
        ({"max_lod": 4}, "max_lod"),
        ({"block_size": 1}, "block_size"),
        ({"head": "conv"}, "head"),
        ({"layers": 0}, "layers"),
    ],
)
def test_invalid_config_is_rejected(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LensNetConfig(**fields)
