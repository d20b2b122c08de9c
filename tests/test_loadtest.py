"""The load-test latency check (clients/loadtest) in CI size: real Locust against a live service on
the demo model; it passes a generous budget, and fails an impossible one and a run full of errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .live import REPO, LiveService

LOCUSTFILE = REPO / "clients" / "loadtest" / "locustfile.py"
MAX_ENTRIES = 512


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService("--max-entries", str(MAX_ENTRIES)).wait_ready()
    yield service
    assert service.stop() == 0


def load_test(url: str, tmp_path: Path, *args: str, seconds: int = 5) -> tuple[int, dict[str, Any]]:
    """Run the check headless (2 users) for `seconds`; its exit status and JSON report."""
    report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"  # one per run: never a stale one
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url, "--users", "2",
        "--spawn-rate", "2", "--run-time", f"{seconds}s", "--only-summary", "--loglevel", "WARNING",
        "--report-file", str(report), *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=180)
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return result.returncode, json.loads(report.read_text())


def served(live: LiveService) -> dict[str, float]:
    """Successful scoring requests so far, by endpoint label."""
    samples = live.metrics()
    return {
        label: samples.get(f'lensnet_request_duration_seconds_count{{endpoint="{label}",status="200"}}', 0.0)
        for label in ("/v1/focus", "/v1/score", "/v2/infer")
    }


def test_passes_a_generous_budget_and_reports_what_the_service_served(live: LiveService, tmp_path: Path) -> None:
    before = served(live)
    code, report = load_test(
        live.url, tmp_path, "--endpoint", "focus,score,infer", "--n", "64,256", "--p99-ms", "60000",
        "--client-p99-ms", "60000",
    )  # fmt: skip
    assert code == 0 and report["passed"] and report["failures"] == []
    assert report["model"]["embed_dim"] == 256  # D came from the deployment
    after = served(live)
    for endpoint, label in (("focus", "/v1/focus"), ("score", "/v1/score"), ("infer", "/v2/infer")):
        summary = report["endpoints"][endpoint]
        assert summary["requests"] > 0 and summary["errors"] == 0
        # Every answered request was measured; the service may also have answered one request per
        # user (2) that the run's stop cut off on the client side before its answer was recorded.
        assert 0 <= after[label] - before[label] - summary["requests"] <= 2
        assert set(summary["by_n"]) == {"64", "256"}
        assert sum(size["requests"] for size in summary["by_n"].values()) == summary["requests"]
        client, server = summary["client_ms"], summary["server_ms"]
        assert client["p50"] <= client["p90"] <= client["p99"] <= client["max"]
        assert server["p50"] <= server["p90"] <= server["p99"] <= server["max"]
        assert 0 < server["p50"] <= client["p50"]  # the server's part of the round trip
        assert {"receive", "decode", "model", "encode", "total"} <= set(summary["server_stages_p50_ms"])


def test_fails_an_impossible_budget(live: LiveService, tmp_path: Path) -> None:
    budgets = ("--p99-ms", "0.001", "--client-p99-ms", "0.002")
    code, report = load_test(live.url, tmp_path, "--endpoint", "focus", "--n", "128", *budgets, seconds=4)
    assert code == 1 and not report["passed"]
    server, client = report["failures"]
    assert server.startswith("focus: server p99 ") and server.endswith("> 0.001 ms")
    assert client.startswith("focus: client p99 ") and client.endswith("> 0.002 ms")


def test_fails_when_the_service_answers_errors(live: LiveService, tmp_path: Path) -> None:
    sizes = f"64,{MAX_ENTRIES + 1}"  # half the requests are over --max-entries: 413
    code, report = load_test(live.url, tmp_path, "--endpoint", "infer", "--n", sizes, "--p99-ms", "60000", seconds=4)
    infer = report["endpoints"]["infer"]
    assert code == 1 and infer["errors"] > 0 and infer["by_n"][str(MAX_ENTRIES + 1)]["requests"] == 0
    assert infer["error_samples"][0] == f"413 at N={MAX_ENTRIES + 1}"
    assert report["failures"] == [f"infer: error rate {infer['error_rate']} > 0.0"]
    code, report = load_test(live.url, tmp_path, "--endpoint", "score", "--n", str(MAX_ENTRIES + 1), seconds=4)
    errors = report["endpoints"]["score"]["errors"]
    assert code == 1 and errors > 0 and report["failures"][0] == f"score: no successful request ({errors} errors)"


def test_a_deployment_it_cannot_read_stops_the_run_at_once_with_status_2(tmp_path: Path) -> None:
    started = time.monotonic()
    code, report = load_test("http://127.0.0.1:9", tmp_path, seconds=120)
    assert code == 2 and time.monotonic() - started < 60  # it did not wait for the run time
    (failure,) = report["failures"]
    assert failure.startswith("not started: ") and "refused" in failure and not report["passed"]
