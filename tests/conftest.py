"""Shared fixtures: small LensNet models and their weights on disk."""

from __future__ import annotations

import pytest

from model_export.config import LensNetConfig
from model_export.lensnet import LensNet, init_random

SMALL = LensNetConfig(embed_dim=64, layers=2, num_heads=4, block_size=4, max_lod=3)


@pytest.fixture
def small_model() -> LensNet:
    return init_random(LensNet(SMALL), seed=11).eval()
