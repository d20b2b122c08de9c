"""LensNet configuration: the hyper-parameters that define the trained function."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

HeadKind = Literal["mlp", "linear"]
PositionalKind = Literal["gaussian", "simple"]

LEVEL_EMBEDDINGS = 4
"""Rows of `level_embed`: fixed by the training repo, so `max_lod` can be at most 3."""
PARITY_SIZES = (1, 101, 2048, 8192)
"""WC lengths of the export's parity report: one entry, a length no B divides, up to 8,192."""
MAX_HEAD_DIM = 1024
"""Largest head_dim of a causal model: its block-causal attention weights scores by up to
e^{2 sqrt(hd)}, finite in fp32 up to here (model_export/fused_attention.py)."""
_TYPES: dict[str, type] = {"embed_dim": int, "layers": int, "num_heads": int, "block_size": int, "max_lod": int,
                           "head": str, "positional": str, "causal": bool}  # fmt: skip


@dataclass(frozen=True)
class LensNetConfig:
    """What the training repo's `TransformerLensNet` is built from (README, "Model artifacts")."""

    embed_dim: int = 512
    layers: int = 2
    num_heads: int = 4
    block_size: int = 32
    max_lod: int = 2
    head: HeadKind = "mlp"
    positional: PositionalKind = "gaussian"
    causal: bool = True

    def __post_init__(self) -> None:
        # Exact types: JSON's 4.0 or "2" and Python's True are not the ints a config needs.
        wrong = [
            f"{name} must be {kind.__name__}, got {getattr(self, name)!r}"
            for name, kind in _TYPES.items()
            if type(getattr(self, name)) is not kind
        ]
        if wrong:
            raise ValueError("invalid LensNet config: " + "; ".join(wrong))
        problems = []
        if self.embed_dim < 2 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            problems.append(f"embed_dim ({self.embed_dim}) must be a positive multiple of num_heads ({self.num_heads})")
        elif (self.embed_dim // self.num_heads) % 2:
            problems.append(f"head_dim = embed_dim / num_heads ({self.embed_dim // self.num_heads}) must be even")
        elif self.causal and self.embed_dim // self.num_heads > MAX_HEAD_DIM:
            problems.append(f"head_dim = embed_dim / num_heads ({self.embed_dim // self.num_heads}) must be at most "
                            f"{MAX_HEAD_DIM} for a causal model (use more heads)")  # fmt: skip
        if self.layers < 1:
            problems.append(f"layers must be >= 1, got {self.layers}")
        if self.block_size < 2:
            problems.append(f"block_size must be >= 2, got {self.block_size}")
        if not 1 <= self.max_lod < LEVEL_EMBEDDINGS:
            problems.append(f"max_lod must be in 1…{LEVEL_EMBEDDINGS - 1}, got {self.max_lod}")
        if self.head not in ("mlp", "linear"):
            problems.append(f"head must be 'mlp' or 'linear', got {self.head!r}")
        if self.positional not in ("gaussian", "simple"):
            problems.append(f"positional must be 'gaussian' or 'simple', got {self.positional!r}")
        if problems:
            raise ValueError("invalid LensNet config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def head_hidden(self) -> int:
        """Width of the mlp head: the reference computes `max(2D // 2, 128)`."""
        return max(self.embed_dim, 128)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LensNetConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a LensNet config is an object of its fields, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LensNet config keys: {sorted(unknown)}")
        return cls(**data)
