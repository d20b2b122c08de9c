"""The benchmarks' own rules: percentiles only where the samples support them, reports that name
their provenance, a floor endpoint admitted like the service, the same bytes on both sides, and
allocator scenarios that make the edits they are named for."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

import benchmarks
from benchmarks import allocator, bare_server, latency, min_samples, percentiles
from lensnet_client import FocusClient, FocusError
from lensnet_client.client import parse_server_timing

from .live import REPO


def test_a_percentile_is_quoted_only_with_a_sample_beyond_it() -> None:
    assert [min_samples(q) for q in (50, 90, 95, 99)] == [2, 10, 20, 100]
    assert "p99" not in percentiles(range(99)) and percentiles(range(100))["p99"] == 98.01
    assert "p95" not in percentiles(range(19)) and "p95" in percentiles(range(20))
    assert percentiles([7.0]) == {"samples": 1, "max": 7.0}
    assert percentiles([]) == {"samples": 0}


class Service:
    """What WithFloor reads of the service's app: its settings' slot count."""

    def __init__(self, slots: int) -> None:
        self.settings = SimpleNamespace(max_concurrency=slots)


class ServiceApp:
    """The service's app as WithFloor sees it: its `service`, and the paths it was called for."""

    def __init__(self, slots: int) -> None:
        self.service, self.paths = Service(slots), []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])


def test_the_floor_reads_every_chunk_one_request_per_service_slot() -> None:
    """With the service's one slot, a second body is not read until the first has been answered,
    and the wait is reported as admit, outside receive; other paths go to the service."""
    app = bare_server.WithFloor(ServiceApp(1))
    events: list[str] = []
    answers: dict[str, dict[str, Any]] = {}

    def request(name: str, chunks: int, gate: asyncio.Event | None) -> Any:
        sent = iter(range(chunks))

        async def receive() -> dict[str, Any]:
            k = next(sent)
            events.append(f"{name} chunk {k}")
            if gate:
                await gate.wait()
            return {"type": "http.request", "body": b"x" * 100, "more_body": k < chunks - 1}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                events.append(f"{name} answered")
                answers[name] = message

        return app({"type": "http", "path": bare_server.FLOOR_PATH}, receive, send)

    async def run() -> None:
        gate = asyncio.Event()
        first = asyncio.create_task(request("first", 1, gate))
        second = asyncio.create_task(request("second", 3, None))
        for _ in range(5):
            await asyncio.sleep(0)
        assert events == ["first chunk 0"]  # the second waits for the slot
        gate.set()
        await asyncio.gather(first, second)
        await app({"type": "http", "path": "/v1/focus"}, receive=None, send=None)

    asyncio.run(run())
    assert events == ["first chunk 0", "first answered", "second chunk 0", "second chunk 1", "second chunk 2",
                      "second answered"]  # fmt: skip
    timing = dict(answers["second"]["headers"])[b"server-timing"].decode()
    assert set(parse_server_timing(timing)) == {"admit", "receive"} and answers["second"]["status"] == 200
    assert app.app.paths == ["/v1/focus"]


@pytest.mark.parametrize("fmt", ["binary", "json"])
def test_the_bare_endpoint_gets_the_bytes_the_service_gets(fmt: str) -> None:
    snaps = latency.snapshots(64, 256, seed=1)
    sent: list[tuple[bytes, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.content, request.headers["content-type"]))
        return httpx.Response(400, json={"title": "recorded"})

    with FocusClient("http://test", format=fmt, retries=0, transport=httpx.MockTransport(handler)) as client:  # type: ignore[arg-type]
        for embeddings, lod, positions in snaps:
            with pytest.raises(FocusError):
                client.focus(embeddings, lod, positions, w_max=64)
    bodies = latency.focus_bodies(fmt, snaps, 64)
    assert [(content, headers["content-type"]) for content, headers in bodies] == sent


@pytest.mark.parametrize("scenario", allocator.SCENARIOS, ids=lambda s: s.name)
def test_each_allocator_scenario_makes_the_edits_it_is_named_for(scenario: allocator.Scenario) -> None:
    result = allocator.measure(scenario, 512, runs=1, seed=0, cold=False)
    assert {kind for kind, count in result["edits_per_call"].items() if count > 0} == scenario.kinds


def test_an_allocator_scenario_that_misses_its_edits_fails() -> None:
    mislabelled = allocator.Scenario("trades", allocator.uniform, -64, 4, frozenset({"trade"}))
    with pytest.raises(RuntimeError, match="not exactly"):
        allocator.measure(mislabelled, 512, runs=1, seed=0, cold=False)


def quoted_beyond_their_samples(node: Any) -> list[str]:
    """Every percentile in a report quoted from fewer samples than `min_samples` allows."""
    if isinstance(node, list):
        return [bad for item in node for bad in quoted_beyond_their_samples(item)]
    if not isinstance(node, dict):
        return []
    bad = [f"{key} of {node['samples']}" for key in node if key.startswith("p") and key[1:].isdigit()
           and node["samples"] < min_samples(int(key[1:]))]  # fmt: skip
    return bad + [b for value in node.values() for b in quoted_beyond_their_samples(value)]


TINY = {
    "allocator": ["--runs", "3", "--sizes", "512"],
    "read_body": ["--runs", "3", "--sizes", "64"],
    "v2_overhead": ["--pairs", "3", "--sizes", "64"],
    "latency": ["--requests", "3", "--sizes", "64", "--dims", "256", "--formats", "binary", "--concurrency", "1", "2"],
    "sessions": ["--n", "64", "--dims", "256", "--steps", "4", "--warmup", "1", "--subset-every", "2", "--no-soak"],
    "model_latency": ["--dims", "256", "--sizes", "64", "--runs", "2"],
    "memory": ["--dims", "256", "--sizes", "64"],
    "feedback": ["--batch", "50", "--entries", "64", "--pairs", "1", "--phase-s", "0.5", "--settle-s", "0.1"],
}


@pytest.mark.parametrize("name", TINY)
def test_each_benchmark_runs_end_to_end_and_names_its_provenance(name: str) -> None:
    args = [sys.executable, "-m", f"benchmarks.{name}", *TINY[name]]
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert report["commit"] == head and isinstance(report["dirty"], bool)
    assert report["command"].endswith(" ".join(args[1:])) and report["machine"]["cpus"] >= 1
    assert quoted_beyond_their_samples(report) == []
    if name == "sessions":
        (steady,) = report["steady"]
        assert (steady["device"], steady["precision"]) == ("CPUExecutionProvider", "fp32")
        assert "gpu_step_total_p99_le_3ms" not in steady["targets"]  # a CUDA target, and 4 steps give no p99
        # Steps 1 and 3 (of 0-4, 0 the warm-up) apply half the edits, reported apart; all match /v1/focus.
        assert steady["step"]["overhead_ms"]["samples"] == steady["step_subset"]["overhead_ms"]["samples"] == 2
        assert steady["answers_equal_to_full"] == "5/5" and steady["resyncs"] == 0
    if name == "model_latency":  # 2 rounds: too few for an interval, so none is quoted, and no verdict over one
        assert all("torch_over_ort_p50_95ci_rounds" not in row for row in report["results"])
    if name == "latency":
        for result in report["results"]:
            assert result["requests"] == result["floor_ms"]["receive"]["samples"] == 3  # paired, warm-up not counted
            assert result["warmup_requests"] == latency.WARMUP * result["concurrency"]
            assert set(result["server_ms"]) >= {"receive", "model", "total"}


def test_a_reports_dirty_flag_names_changed_code_not_rewritten_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a real git checkout: a rewritten report leaves the flag clean, any other edit sets it."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks" / "reports").mkdir(parents=True)
    (tmp_path / "benchmarks" / "reports" / "r.json").write_text("{}")
    (tmp_path / "README.md").write_text("a")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(benchmarks, "REPO", tmp_path)
    monkeypatch.delenv("LENSNET_SOURCE_COMMIT", raising=False)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "benchmarks" / "reports" / "r.json").write_text('{"rerun": 1}')
    assert (benchmarks.provenance()["commit"], benchmarks.provenance()["dirty"]) == (head, False)
    (tmp_path / "README.md").write_text("b")
    assert benchmarks.provenance()["dirty"] is True


def test_a_copy_without_git_takes_its_commit_and_dirty_flag_from_the_packer(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/device/run.sh: the commit pack.sh recorded, `+dirty` when the carried tree differs."""
    monkeypatch.setenv("LENSNET_SOURCE_COMMIT", "0123abc")
    assert (benchmarks.provenance()["commit"], benchmarks.provenance()["dirty"]) == ("0123abc", False)
    monkeypatch.setenv("LENSNET_SOURCE_COMMIT", "0123abc+dirty")
    assert (benchmarks.provenance()["commit"], benchmarks.provenance()["dirty"]) == ("0123abc", True)


def test_session_targets_check_the_whole_step_p99_on_cuda_only_where_there_is_one() -> None:
    from benchmarks.sessions import targets

    def run(overhead: float, total: dict[str, float]) -> dict[str, Any]:
        return {"overhead_ms": {"p50": overhead}, "stages_ms": {"total": total}}

    step, full = run(0.4, {"samples": 100, "p50": 2.0, "p99": 2.9}), run(8.0, {"samples": 20, "p50": 9.0})
    met = targets(step, full, 9000, "CUDAExecutionProvider")
    assert met == {"step_bytes_without_created_le_64KiB": True, "step_overhead_p50_le_0.5ms": True,
                   "overhead_ratio_p50_le_0.1": True, "gpu_step_total_p99_le_3ms": True}  # fmt: skip
    step["stages_ms"]["total"]["p99"] = 3.1
    assert targets(step, full, 9000, "CUDAExecutionProvider")["gpu_step_total_p99_le_3ms"] is False
    assert "gpu_step_total_p99_le_3ms" not in targets(step, full, 9000, "CPUExecutionProvider")
    del step["stages_ms"]["total"]["p99"]  # fewer than 100 steps: no p99 to check
    assert "gpu_step_total_p99_le_3ms" not in targets(step, full, 9000, "CUDAExecutionProvider")
    assert targets(run(0.6, {"p50": 2.0}), full, 70000, "CPUExecutionProvider") == {
        "step_bytes_without_created_le_64KiB": False, "step_overhead_p50_le_0.5ms": False,
        "overhead_ratio_p50_le_0.1": True,
    }  # fmt: skip


def test_model_latency_gpu_targets_read_the_graph_the_service_runs_on_cuda() -> None:
    """The fp16 graph as served: not the faster-looking fp32 rows, not device-resident runs."""
    from benchmarks.model_latency import targets

    def row(n: int, engine: str, p50: float) -> dict[str, Any]:
        return {"d": 256, "n": n, "engine": engine, "ms": {"p50": p50}}

    rows = [row(n, "ort-fp16-cuda", ms) for n, ms in ((512, 0.4), (2048, 0.6), (8192, 1.4))]
    rows += [row(n, engine, 0.1) for n in (512, 2048, 8192) for engine in ("ort-fp32-cuda", "ort-fp16-cuda-iobinding")]
    found = targets(rows)
    assert found["gpu_model_p50_ms_8k"] == {"target": 1.5, "measured": 1.4, "met": True}
    assert found["gpu_model_p50_ms_le_2k"] == {"target": 0.5, "measured": 0.6, "met": False}


def test_the_ratio_interval_resamples_pairs_so_noise_both_members_shared_cancels() -> None:
    """Each pair ran side by side: a slow pair slows both members, which the paired interval
    must not count as doubt about the ratio (1.25 here), while a pairing broken by a mismatch does."""
    rng = np.random.default_rng(7)
    load = rng.uniform(1.0, 3.0, 15)  # per-pair machine noise, up to 3x
    top, bottom = [[1.25 * f] for f in load], [[f] for f in load]
    low, high = benchmarks.p50_ratio_interval(top, bottom)
    assert low == pytest.approx(1.25) and high == pytest.approx(1.25)
    shuffled = [bottom[k] for k in rng.permutation(15)]  # same samples, pairing lost
    low, high = benchmarks.p50_ratio_interval(top, shuffled)
    assert low < 1.25 < high and high - low > 0.3


def test_the_cpu_model_target_is_met_over_its_interval_only_when_the_interval_clears_it() -> None:
    from benchmarks.model_latency import targets

    def rows(ratio: float, interval: list[float]) -> list[dict[str, Any]]:
        return [{"d": 256, "n": 8192, "engine": "ort-fp32-cpu", "ms": {"p50": 1000.0}, "peak_rss_growth_mib": 150.0,
                 "torch_over_ort_p50": ratio, "torch_over_ort_p50_95ci_rounds": interval}]  # fmt: skip

    met = targets(rows(1.05, [1.01, 1.09]))["cpu_speedup_vs_torch_8k"]
    assert met == {"target": 1.0, "measured": 1.05, "met": True, "interval_95": [1.01, 1.09], "met_over_interval": True}
    noisy = targets(rows(1.05, [0.97, 1.12]))["cpu_speedup_vs_torch_8k"]
    assert (noisy["met"], noisy["met_over_interval"]) == (True, False)
    (few,) = rows(1.05, [])
    del few["torch_over_ort_p50_95ci_rounds"]  # too few rounds for an interval: no verdict over it
    assert targets([few])["cpu_speedup_vs_torch_8k"]["met_over_interval"] is None


def test_model_latency_alternates_the_engine_order_and_pauses_before_each_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each round runs the engines in one order or its reverse, so neither always follows the
    other's spinning threads, and every run comes SETTLE_S after whatever ran before it."""
    from benchmarks import model_latency

    happened: list[str] = []

    def engine(name: str) -> tuple[Any, str]:
        return (lambda feed: happened.append(name), "fp32")

    monkeypatch.setattr(model_latency, "_engines", lambda *args: {"first": engine("first"), "second": engine("second")})
    monkeypatch.setattr(model_latency.time, "sleep", lambda seconds: happened.append(f"sleep {seconds}"))
    rows = model_latency.measure_dim(256, [64], 3, 3, False, 1, ["cpu"], None)
    assert [row["runs"] for row in rows] == [3, 3]
    pause = f"sleep {model_latency.SETTLE_S}"
    assert happened[0::2] == [pause] * 8  # a warm-up round and 3 timed ones, 2 runs each
    assert happened[1::2] == ["second", "first", "first", "second", "second", "first", "first", "second"]
