"""Stage timings on a live service: each stage gets the time of its own work (known delays added
to one stage's work at a time must show up in that stage, and only there), and the stages add up
to the total, in Server-Timing and in the Prometheus histograms, at small and large N."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from lensnet_client import FocusClient, FocusSession, frame
from lensnet_client.client import parse_server_timing

from .live import LiveService, snapshot

FRAME = frame.MEDIA_TYPE
# Seconds added to each stage's work: distinct, so that time moved from one stage to another
# always leaves both outside their windows [delay, delay + SLACK).
DELAYS = {"admit": 0.05, "queue": 0.10, "decode": 0.15, "model": 0.20, "allocate": 0.25, "telemetry": 0.30,
          "encode": 0.35, "apply": 0.40, "handoff": 0.45}  # fmt: skip
SLACK = 0.05  # the stage's own work at N = 64 (well under 5 ms) plus scheduling noise
UPLOAD_PAUSE = 0.2  # the client stops mid-body for this long: receive's time, nobody else's


def focus_body(n: int, seed: int = 0) -> bytes:
    embeddings, lod, positions = snapshot(n, seed=seed)
    return frame.pack({"options": {"w_max": n}}, {"embeddings": embeddings, "lod": lod, "positions": positions})


def timing(response: httpx.Response) -> dict[str, float]:
    assert response.status_code in (200, 201), response.text
    return {stage: ms / 1e3 for stage, ms in parse_server_timing(response.headers["server-timing"]).items()}


def assert_delays(stages: dict[str, float], names: tuple[str, ...]) -> None:
    for name in names:
        assert DELAYS[name] <= stages[name] < DELAYS[name] + SLACK, (name, stages)


def assert_adds_up(stages: dict[str, float]) -> None:
    """The named stages sum to the header's total (to its 3-decimal rounding, far inside 1 %)."""
    named = sum(seconds for stage, seconds in stages.items() if stage != "total")
    assert named == pytest.approx(stages["total"], rel=0.01, abs=2e-5), stages


@pytest.fixture(scope="module")
def hooked() -> Iterator[LiveService]:
    service = LiveService(hooks=DELAYS).wait_ready()
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def plain() -> Iterator[LiveService]:
    service = LiveService("--max-entries", "8192").wait_ready()
    yield service
    assert service.stop() == 0


def test_each_stage_of_a_focus_call_gets_its_own_work(hooked: LiveService) -> None:
    stages = timing(hooked.http.post("/v1/focus", content=focus_body(64), headers={"content-type": FRAME}))
    assert_delays(stages, ("admit", "queue", "handoff", "decode", "model", "allocate", "telemetry", "encode"))
    assert "apply" not in stages  # a stateless call applies nothing
    assert stages["receive"] < SLACK
    assert_adds_up(stages)


def test_receive_gets_the_upload_and_nothing_else(hooked: LiveService) -> None:
    body = focus_body(64, seed=1)

    def slow_upload() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        time.sleep(UPLOAD_PAUSE)
        yield body[len(body) // 2 :]

    headers = {"content-type": FRAME, "content-length": str(len(body))}
    stages = timing(hooked.http.post("/v1/focus", content=slow_upload(), headers=headers))
    # The pause starts as the first half leaves; the service's admit (its delay) overlaps it.
    assert UPLOAD_PAUSE - DELAYS["admit"] <= stages["receive"] < UPLOAD_PAUSE + SLACK, stages
    assert_delays(stages, ("admit", "decode", "model"))
    assert_adds_up(stages)


def test_a_session_step_times_its_apply_stage(hooked: LiveService) -> None:
    embeddings, lod, positions = snapshot(64, seed=2)
    with FocusClient(hooked.url, timeout=60) as client, FocusSession(client, w_max=64) as session:
        opened = session.open(embeddings, lod, positions)
        rows = sum(edit.added for edit in opened.edits)
        created = np.random.default_rng(0).standard_normal((rows, embeddings.shape[1])).astype(np.float16)
        step = session.step(created=created)
    stages = {stage: ms / 1e3 for stage, ms in step.server_timing.items()}
    assert_delays(stages, ("admit", "queue", "handoff", "decode", "apply", "model", "allocate", "telemetry", "encode"))
    assert_adds_up(stages)
    opening = {stage: ms / 1e3 for stage, ms in opened.server_timing.items()}
    assert opening["apply"] < SLACK  # keeping the new session: no delta staged
    assert_adds_up(opening)


@pytest.mark.parametrize("n", [64, 8192])
def test_stages_sum_to_the_request_duration_in_the_metrics(plain: LiveService, n: int) -> None:
    """Per answered call the stages (with `respond`, after the last byte) sum to the request
    duration; overhead = duration − model. Checked on the counters' sums over a few calls."""
    calls = 3 if n <= 64 else 1
    body = focus_body(n, seed=n)
    before = plain.metrics()
    headers = [timing(plain.http.post("/v1/focus", content=body, headers={"content-type": FRAME}))
               for _ in range(calls)]  # fmt: skip
    after = plain.metrics()
    for stages in headers:
        assert_adds_up(stages)

    def grew(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    duration = 'lensnet_request_duration_seconds_{}{{endpoint="/v1/focus",status="200"}}'
    assert grew(duration.format("count")) == calls
    stage_sums = {key: grew(key) for key in after if key.startswith("lensnet_stage_duration_seconds_sum")}
    respond = grew('lensnet_stage_duration_seconds_count{stage="respond"}')
    assert respond == calls and grew('lensnet_stage_duration_seconds_sum{stage="respond"}') > 0
    total = grew(duration.format("sum"))
    assert sum(stage_sums.values()) == pytest.approx(total, rel=0.01)
    model = grew('lensnet_stage_duration_seconds_sum{stage="model"}')
    overhead = grew('lensnet_overhead_seconds_sum{endpoint="/v1/focus"}')
    assert overhead == pytest.approx(total - model, rel=0.01)
    assert grew('lensnet_overhead_seconds_count{endpoint="/v1/focus"}') == calls
    # The header stops at the response's start; the metrics' duration also has the writing.
    assert total >= sum(stages["total"] for stages in headers)
