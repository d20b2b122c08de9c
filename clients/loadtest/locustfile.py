"""The load-test latency check: drive any LensNet focus deployment with realistic binary requests
and exit non-zero when a latency budget (or the error budget) is missed.

    locust -f clients/loadtest/locustfile.py --headless --host http://lensnet:8000 \\
        --users 4 --spawn-rate 4 --run-time 2m --endpoint focus --n 8192 --p99-ms 3

D, B and the maximum LOD come from the deployment's `GET /v1/model`; `--n` picks the WC lengths
(several: an even mix). Each request is a random valid WC snapshot with float16 embeddings, sent
as the service's binary frame (`/v1/focus`, `/v1/score`) or as a v2 inference request with
binary tensors (`infer`). Latencies are recorded per endpoint (and per N) in HdrHistograms at
nanosecond resolution, from the client's clock and from the server's `Server-Timing` (`total`
and every stage), because Locust's own statistics round to whole milliseconds. At the end the
report (JSON) is printed and written to `--report-file`; the exit status is 1 when an endpoint's
server p99 is over `--p99-ms`, its client p99 over `--client-p99-ms`, its error rate over
`--max-error-rate`, or it answered nothing, else 0. Run it as one Locust process (not
distributed: the histograms live in the process that measured them).
"""

from __future__ import annotations

import json
import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import httpx
import numpy as np
from hdrh.histogram import HdrHistogram
from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from lensnet_client import frame, oip, synthetic_layout
from lensnet_client.client import parse_server_timing

VARIANTS = 4  # distinct snapshots per endpoint and N, cycled
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0}


@dataclass(frozen=True, slots=True)
class Request:
    endpoint: str
    n: int
    path: str
    body: bytes
    headers: dict[str, str]


class Scenario(ABC):
    """The requests one endpoint sends: `VARIANTS` pre-built bodies per N, picked at random.
    A new endpoint subclasses it and registers in SCENARIOS. Hook for incremental sessions (being
    built elsewhere): a stateful scenario overrides `for_user` to return an object holding one
    simulated user's session (opened on its first `next`, then sending deltas), so the recorder,
    the report and the budget check apply to it unchanged."""

    def __init__(self, model: dict[str, Any], sizes: list[int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.model = model
        self.requests = []
        for n in sizes:
            for _ in range(VARIANTS):
                lod, positions = synthetic_layout(n, model["block_size"], model["max_lod"], rng)
                embeddings = rng.standard_normal((n, model["embed_dim"])).astype(np.float16)
                arrays = {"embeddings": embeddings, "lod": lod, "positions": positions}
                self.requests.append(self.build(n, arrays))

    @abstractmethod
    def build(self, n: int, arrays: dict[str, np.ndarray]) -> Request:
        """The request carrying one snapshot (`arrays`: embeddings, lod, positions) of length `n`."""

    def for_user(self) -> Scenario:
        return self  # stateless: every user shares the bodies

    def next(self, rng: random.Random) -> Request:
        return rng.choice(self.requests)


class Focus(Scenario):
    def build(self, n: int, arrays: dict[str, np.ndarray]) -> Request:
        headers = {"content-type": frame.MEDIA_TYPE, "accept": frame.MEDIA_TYPE}
        return Request("focus", n, "/v1/focus", frame.pack({"options": {"w_max": n}}, arrays), headers)


class Score(Scenario):
    def build(self, n: int, arrays: dict[str, np.ndarray]) -> Request:
        headers = {"content-type": frame.MEDIA_TYPE, "accept": frame.MEDIA_TYPE}
        return Request("score", n, "/v1/score", frame.pack({}, arrays), headers)


class Infer(Scenario):
    def build(self, n: int, arrays: dict[str, np.ndarray]) -> Request:
        body, headers = oip.pack(arrays)
        return Request("infer", n, f"/v2/models/{self.model['name']}/infer", body, headers)


SCENARIOS: dict[str, type[Scenario]] = {"focus": Focus, "score": Score, "infer": Infer}


class Latencies:
    """Client and Server-Timing latencies (ns) and errors of one endpoint, or one endpoint at one N."""

    def __init__(self) -> None:
        self.client = _histogram()
        self.stages: dict[str, HdrHistogram] = {}
        self.errors = 0
        self.error_samples: list[str] = []

    def ok(self, client_s: float, server_timing: dict[str, float]) -> None:
        self.client.record_value(max(1, round(client_s * 1e9)))
        for stage, ms in server_timing.items():
            self.stages.setdefault(stage, _histogram()).record_value(max(1, round(ms * 1e6)))

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what)

    def report(self) -> dict[str, Any]:
        done = self.client.get_total_count()
        total = self.stages.get("total")
        return {
            "requests": done,
            "errors": self.errors,
            "error_rate": round(self.errors / max(1, done + self.errors), 6),
            "error_samples": self.error_samples,
            "client_ms": _percentiles(self.client),
            "server_ms": _percentiles(total) if total else {},
            "server_stages_p50_ms": {
                stage: round(h.get_value_at_percentile(50.0) / 1e6, 4) for stage, h in self.stages.items()
            },
        }


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 3_600_000_000_000, 3)  # 1 ns … 1 hour, 3 significant digits


def _percentiles(histogram: HdrHistogram) -> dict[str, float]:
    if not histogram.get_total_count():
        return {}
    values = {key: histogram.get_value_at_percentile(q) for key, q in PERCENTILES.items()}
    return {key: round(ns / 1e6, 4) for key, ns in (values | {"max": histogram.get_max_value()}).items()}


class Check:
    """The run's settings, scenarios and measurements (one per Locust process)."""

    def __init__(self) -> None:
        self.scenarios: dict[str, Scenario] = {}
        self.by_endpoint: dict[str, Latencies] = {}
        self.by_size: dict[tuple[str, int], Latencies] = {}
        self.model: dict[str, Any] = {}
        self.started = time.monotonic()
        self.not_started = ""  # why the check could not start, if it could not

    def prepare(self, host: str, endpoints: list[str], sizes: list[int], seed: int) -> None:
        self.model = httpx.get(f"{host.rstrip('/')}/v1/model", timeout=30).raise_for_status().json()
        self.scenarios = {name: SCENARIOS[name](self.model, sizes, seed + k) for k, name in enumerate(endpoints)}
        self.by_endpoint = {name: Latencies() for name in endpoints}
        self.by_size = {(name, n): Latencies() for name in endpoints for n in sizes}
        self.started = time.monotonic()

    def record(self, request: Request, client_s: float, status: int, server_timing: dict[str, float]) -> None:
        for latencies in (self.by_endpoint[request.endpoint], self.by_size[request.endpoint, request.n]):
            if status == 200:
                latencies.ok(client_s, server_timing)
            else:
                latencies.failed(f"{status} at N={request.n}")

    def report(self, options: Any) -> dict[str, Any]:
        endpoints = {}
        failures = []
        for name, latencies in self.by_endpoint.items():
            summary = latencies.report()
            summary["by_n"] = {str(n): self.by_size[name, n].report() for (e, n) in self.by_size if e == name}
            endpoints[name] = summary
            failures += _missed(name, summary, options)
        return {
            "host": options.host,
            "model": {key: self.model.get(key) for key in ("name", "version", "precision", "provider", "embed_dim")},
            "seconds": round(time.monotonic() - self.started, 3),
            "budget": {
                "p99_ms": options.p99_ms,
                "client_p99_ms": options.client_p99_ms,
                "max_error_rate": options.max_error_rate,
            },
            "endpoints": endpoints,
            "failures": failures,
            "passed": not failures,
        }


def _missed(name: str, summary: dict[str, Any], options: Any) -> list[str]:
    """What `name` missed of the budget, in words (nothing: it passed)."""
    if not summary["requests"]:
        return [f"{name}: no successful request ({summary['errors']} errors)"]
    missed = []
    if summary["error_rate"] > options.max_error_rate:
        missed.append(f"{name}: error rate {summary['error_rate']} > {options.max_error_rate}")
    for clock, budget in (("server_ms", options.p99_ms), ("client_ms", options.client_p99_ms)):
        p99 = summary[clock].get("p99")
        if budget is not None and (p99 is None or p99 > budget):
            missed.append(f"{name}: {clock.split('_')[0]} p99 {p99} ms > {budget} ms")
    return missed


CHECK = Check()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--endpoint", default="focus", help=f"comma-separated, of {sorted(SCENARIOS)} (focus)")
    parser.add_argument("--n", default="512,2048,8192", help="comma-separated WC lengths, an even mix")
    parser.add_argument("--p99-ms", type=float, default=None, help="budget: server-side (Server-Timing) p99, ms")
    parser.add_argument("--client-p99-ms", type=float, default=None, help="budget: client-observed p99, ms")
    parser.add_argument("--max-error-rate", type=float, default=0.0, help="budget: share of non-200 answers (0)")
    parser.add_argument("--seed", type=int, default=0, help="for the random snapshots")
    parser.add_argument("--report-file", default="", help="also write the JSON report here")


@events.test_start.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Read the model off the deployment and build the bodies; on failure stop at once (exit status 2)."""
    options = environment.parsed_options
    endpoints = [name.strip() for name in options.endpoint.split(",") if name.strip()]
    try:
        if unknown := sorted(set(endpoints) - set(SCENARIOS)):
            raise ValueError(f"--endpoint: unknown {unknown}; choose from {sorted(SCENARIOS)}")
        sizes = [int(n) for n in options.n.split(",") if n.strip()]
        CHECK.prepare(environment.host, endpoints, sizes, options.seed)
    except (ValueError, httpx.HTTPError) as exc:
        CHECK.not_started = str(exc)
        logging.getLogger("lensnet.loadtest").error("cannot start the check: %s", exc)
        gevent.spawn(environment.runner.quit)  # type: ignore[union-attr]


@events.quitting.add_listener
def _verdict(environment: Environment, **_: Any) -> None:
    """Print and write the report; exit 0 (passed), 1 (a budget missed) or 2 (the check never started)."""
    options = environment.parsed_options
    if CHECK.by_endpoint:
        report = CHECK.report(options)
    else:  # bad arguments, an unreachable deployment, or the run time was over before it could start
        reason = CHECK.not_started or "the run ended before the check started"
        report = {"host": options.host, "endpoints": {}, "failures": [f"not started: {reason}"], "passed": False}
    text = json.dumps(report, indent=2)
    print(text)
    if options.report_file:
        Path(options.report_file).write_text(text + "\n")
    environment.process_exit_code = 2 if not CHECK.by_endpoint else 0 if report["passed"] else 1


class ServiceUser(FastHttpUser):
    """One closed-loop caller: sends a request of a random chosen endpoint and N, waits for the answer, repeats."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.scenarios = [scenario.for_user() for scenario in CHECK.scenarios.values()]
        if not self.scenarios:  # the check could not start; the runner is quitting
            self.stop()

    @task
    def call(self) -> None:
        request = self.rng.choice(self.scenarios).next(self.rng)
        name = f"{request.endpoint} N={request.n}"
        start = time.perf_counter()
        with self.client.post(
            request.path, data=request.body, headers=request.headers, name=name, catch_response=True
        ) as response:
            elapsed = time.perf_counter() - start
            timing = parse_server_timing(response.headers.get("server-timing")) if response.status_code == 200 else {}
            CHECK.record(request, elapsed, response.status_code, timing)
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
