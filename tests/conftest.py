"""Shared fixtures: a small LensNet model, and a live service for a test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model_export.config import LensNetConfig
from model_export.lensnet import LensNet, init_random

from .live import LiveService

SMALL = LensNetConfig(embed_dim=64, layers=2, num_heads=4, block_size=4, max_lod=3)


@pytest.fixture
def small_model() -> LensNet:
    return init_random(LensNet(SMALL), seed=11).eval()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    """`lensnet-serve` on the bundled model with default settings, for one test module."""
    service = LiveService().wait_ready()
    yield service
    assert service.stop() == 0
