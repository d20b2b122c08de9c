"""Shadow scoring: the live/shadow comparison, artifact checks, and a live service with a shadow."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lensnet_client import FocusClient, synthetic_layout
from model_export.artifact import ArtifactError, load_manifest
from service.core.agreement import compare
from service.core.allocator import AllocatorOptions, allocate, check_layout
from service.shadow import check_compatible

from .live import REPO, LiveService, snapshot

BUNDLED = REPO / "models" / "default"


def test_compare_scores_signs_and_edits() -> None:
    rng = np.random.default_rng(0)
    lod, positions = synthetic_layout(400, 32, 2, rng)
    layout = check_layout(lod, positions, 32, 2)
    options = AllocatorOptions(block_size=32, max_lod=2, w_max=300, max_edits=32)
    live = rng.uniform(-1, 1, lod.size).astype(np.float32)
    shadow = live.copy()
    flipped = rng.choice(lod.size, 40, replace=False)
    shadow[flipped] *= -1  # a candidate that disagrees on 10 % of the entries
    live_edits, shadow_edits = allocate(layout, live, options).edits, allocate(layout, shadow, options).edits
    agreement = compare(live, shadow, live_edits, shadow_edits)
    assert agreement.sign_agreement == pytest.approx(1 - 40 / lod.size)
    assert agreement.correlation == pytest.approx(np.corrcoef(live, shadow)[0, 1], abs=1e-9)
    shared = {(e.action, e.index) for e in live_edits} & {(e.action, e.index) for e in shadow_edits}
    assert agreement.live_edits == len(live_edits) and agreement.shared_edits == len(shared) < len(live_edits)
    opposite = compare(live, -live, live_edits, ())
    assert opposite.sign_agreement == 0 and opposite.correlation == pytest.approx(-1) and opposite.shared_edits == 0
    same = compare(live, live, live_edits, live_edits)
    assert (same.sign_agreement, same.shared_edits) == (1.0, len(live_edits)) and same.correlation == pytest.approx(1)


def incompatible_copy(tmp_path: Path) -> Path:
    """The bundled artifact, its manifest claiming another D (its files still verify)."""
    target = tmp_path / "other-d"
    shutil.copytree(BUNDLED, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["config"]["embed_dim"] = 512
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_shadow_must_read_the_live_snapshots(tmp_path: Path) -> None:
    live = load_manifest(BUNDLED)
    check_compatible(live, load_manifest(BUNDLED))
    with pytest.raises(ArtifactError, match="embed_dim: 512 vs 256"):
        check_compatible(live, load_manifest(incompatible_copy(tmp_path)))


@pytest.mark.parametrize("bad", ["missing", "incompatible"])
def test_the_service_refuses_a_bad_shadow_at_start(tmp_path: Path, bad: str) -> None:
    directory = tmp_path / "nowhere" if bad == "missing" else incompatible_copy(tmp_path)
    service = LiveService("--shadow-model-dir", str(directory))
    try:
        assert service.process.wait(timeout=60) == 2
        assert "refusing to start" in service.log()
    finally:
        service.stop()


def test_a_shadow_scores_sampled_requests_off_the_request_path() -> None:
    """The bundled model shadowing itself: every sampled request is scored or dropped (its slot
    busy), never failed; the two agree fully (scores to the last bits, signs, edits)."""
    service = LiveService("--shadow-model-dir", str(BUNDLED), "--shadow-sample-rate", "1").wait_ready()
    try:

        def metric(name: str) -> float:
            return service.metrics().get(name, 0.0)

        deadline = time.monotonic() + 60
        while not any(k.startswith("lensnet_shadow_model_info{") for k in service.metrics()):
            assert time.monotonic() < deadline, "the shadow model did not load"
            time.sleep(0.2)
        requests = 8
        with FocusClient(service.url, timeout=60) as client:
            for seed in range(requests):
                client.focus(*snapshot(300, seed=seed), w_max=200)
        results = ("scored", "dropped", "failed")
        while sum(metric(f'lensnet_shadow_requests_total{{result="{r}"}}') for r in results) < requests:
            assert time.monotonic() < deadline + 60, service.metrics()
            time.sleep(0.1)
        scored = metric('lensnet_shadow_requests_total{result="scored"}')
        assert scored >= 1 and metric('lensnet_shadow_requests_total{result="failed"}') == 0
        assert metric("lensnet_shadow_score_correlation_count") == scored
        assert metric('lensnet_shadow_score_correlation_bucket{le="0.9999"}') == 0
        assert metric('lensnet_shadow_sign_agreement_bucket{le="0.9999"}') == 0
        assert metric("lensnet_shadow_live_edits_total") > 0
        assert metric("lensnet_shadow_shared_edits_total") == metric("lensnet_shadow_live_edits_total")
    finally:
        assert service.stop() == 0
