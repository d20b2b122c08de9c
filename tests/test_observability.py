"""The dashboard and the alert rules against a live service scraped by a real Prometheus.

One module-scoped stack: the service on the bundled demo model (under tests.hooked_service: its
model stage takes 5 ms longer, so every answered scoring request is over the 3 ms budget on any
hardware, and a gate in its queue stage makes overload happen by construction) and Debian's
`prometheus` on loopback, scraping every second and evaluating deploy/prometheus/rules every second. The scrape
job mirrors the ServiceMonitor (deploy/k8s): the same job name, namespace/pod/endpoint target
labels and honor_labels, so the queries are checked against the labels they get on Kubernetes.
Known traffic covers every series the dashboard shows: focus and score requests (edits, clamps,
scores at every LOD), 422s, 413s (too large), 429s (overload) and 504s (deadline), ΔNLL feedback
(a healthy run; a polarity-flipped one in the last test), a shadow model (the bundled one
shadowing itself), a focus session (created, stepped, 409, deleted, 404) and one left open.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from examples.policy_health import Sent, collect_edits, send_feedback
from lensnet_client import FocusClient
from lensnet_client.layout import synthetic_layout
from tests.hooked_service import Gate
from tests.live import free_port
from tests.test_deploy import FINAL_STAGES, all_panels, dashboard, dockerfile_stages

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "lensnet.rules.yml"
K8S = DEPLOY / "k8s"

JOB = "lensnet-focus"  # what the ServiceMonitor's job label is: the Service's name
POD = "lensnet-focus-test-0"
# The service runs with one inference slot and no queue, so a request held at the queue gate makes
# the next ones 429s (OVERLOADED per round), and with a WC limit of 400 entries, so 500 entries get a 413.
MAX_ENTRIES = 400
OVERLOADED = 4
# Added to every inference (a test hook): over the 3 ms budget whatever the hardware.
MODEL_DELAY_S = 0.005
# The scoring endpoints, as the rules select them.
SCORING_ENDPOINTS = "/v1/(focus|score|sessions|sessions/[^/]+/focus)|/v2/infer"
SCORING = f'lensnet_request_duration_seconds_count{{job="{JOB}",endpoint=~"{SCORING_ENDPOINTS}"}}'
# Policy health: the service's count window, and the matched feedback items sent per run (healthy
# in the stack, polarity-flipped in the last test); the alerts need at least 100 items.
WINDOW = 120
FEEDBACK_EDITS = 150
# Grafana's built-in variables, as Grafana would expand them for a short time range.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
# Seconds of scrapes from the first to the one the queries are evaluated at: long enough that a
# scrape committed just after a rule evaluation moves rate()'s extrapolation by a few % at most
# (over the ~10 s of traffic alone, one scrape moves it by ~10 %); shorter than $__rate_interval,
# so the dashboard's one-minute rates still see all the traffic.
HISTORY_S = 30
T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------------------


def eventually(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess logging to `log` (with `env` added to its environment), stopped (SIGTERM, then
    SIGKILL) however the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def ready(proc: subprocess.Popen[bytes], log: Path, url: str) -> bool:
    """Whether `url` answers 200; fails at once, with the log, if `proc` has exited."""
    if proc.poll() is not None:
        pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def executable(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


# --- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    service: httpx.Client
    prometheus: httpx.Client
    sent: Counter[tuple[str, int]]  # (endpoint, status) → requests
    at: float  # a scrape time after all traffic: the dashboard queries are evaluated there
    feedback: Sent | None = None  # the healthy feedback run (benefit = +x + noise)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector; fails the test on any API error (parse errors included)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        response = self.prometheus.post("/api/v1/query", data=params)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        (sample,) = self.query(expr, at)
        return float(sample["value"][1])


def snapshot(rng: np.random.Generator, n: int, model: dict[str, Any]) -> dict[str, Any]:
    lod, positions = synthetic_layout(n, model["block_size"], model["max_lod"], rng)
    embeddings = rng.standard_normal((n, model["embed_dim"])).astype(np.float32)
    return {"embeddings": embeddings.tolist(), "lod": lod.tolist(), "positions": positions.tolist()}


def send_traffic(url: str, seed: int, gate: Gate) -> Counter[tuple[str, int]]:
    """One round of known traffic; returns what was answered, by (endpoint, status)."""
    sent: Counter[tuple[str, int]] = Counter()
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=30) as client:
        model = client.get("/v1/model").json()

        def post(endpoint: str, body: dict[str, Any], **headers: str) -> int:
            status = client.post(endpoint, json=body, headers=headers).status_code
            sent[endpoint, status] += 1
            return status

        def post_raw(payload: bytes) -> int:  # one connection each (the held request's is another thread's)
            with httpx.Client(base_url=url, timeout=30) as own:
                return own.post("/v1/score", content=payload, headers={"content-type": "application/json"}).status_code

        for n in (120, 200, 260, 300, 340, 380, 150, 320, 390, 280):
            assert post("/v1/focus", snapshot(rng, n, model) | {"options": {"w_max": 250}}) == 200
        for n in (64, 200, 380, 300):
            assert post("/v1/score", snapshot(rng, n, model)) == 200
        # A focus session: created, stepped twice, a stale version (409), deleted, then unknown (404).
        created = client.post("/v1/sessions", json=snapshot(rng, 200, model) | {"options": {"w_max": 250}})
        assert created.status_code == 201
        step = f"/v1/sessions/{created.json()['session_id']}/focus"

        def post_step(version: int) -> int:
            status = client.post(step, json={"version": version, "applied": []}).status_code
            sent["/v1/sessions/{id}/focus", status] += 1
            return status

        sent["/v1/sessions", 201] += 1
        assert [post_step(1), post_step(2), post_step(1)] == [200, 200, 409]  # the last: a stale version
        assert client.delete(step.removesuffix("/focus")).status_code == 204
        assert post_step(3) == 404
        kept = client.post("/v1/sessions", json=snapshot(rng, 100, model) | {"options": {"w_max": 250}})
        assert kept.status_code == 201  # stays open: the session gauges show it
        sent["/v1/sessions", 201] += 1
        invalid = snapshot(rng, 100, model)
        invalid["positions"] = [p + 1 for p in invalid["positions"]]  # misaligned spans
        assert post("/v1/score", invalid) == 422
        assert post("/v1/focus", snapshot(rng, MAX_ENTRIES + 100, model) | {"options": {"w_max": 250}}) == 413
        assert post("/v1/focus", snapshot(rng, 64, model) | {"options": {"w_max": 250}},
                    **{"X-Request-Timeout-Ms": "0.001"}) == 504  # fmt: skip
        # Overload, by construction: a request held at the queue gate takes the only place (one slot,
        # no queue), so each of the next OVERLOADED is refused 429 at once; then the gate opens.
        body = json.dumps(snapshot(rng, 64, model)).encode()
        gate.close()
        try:
            with ThreadPoolExecutor(1) as pool:
                entered = gate.entered()
                held = pool.submit(post_raw, body)
                gate.wait_entered(entered + 1)
                refused = [post_raw(body) for _ in range(OVERLOADED)]
                gate.open()
                assert held.result() == 200 and refused == [429] * OVERLOADED, refused
        finally:
            gate.open()
        sent["/v1/score", 200] += 1
        sent["/v1/score", 429] += OVERLOADED
    return sent


def prometheus_config(service_port: int) -> dict[str, Any]:
    """A one-second scrape of the service, shaped like the ServiceMonitor's scrape config."""
    (monitor,) = [d for d in yaml.safe_load_all((K8S / "servicemonitor.yaml").read_text()) if d]
    (endpoint,) = monitor["spec"]["endpoints"]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": JOB,
            "metrics_path": endpoint["path"],
            "honor_labels": endpoint.get("honorLabels", False),
            "static_configs": [{
                "targets": [f"127.0.0.1:{service_port}"],
                "labels": {"namespace": "lensnet", "pod": POD, "endpoint": endpoint["port"]},
            }],
        }],
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = executable("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (scripts/bootstrap test installs Debian's package)")
    tmp = tmp_path_factory.mktemp("observability")
    gate = Gate(tmp / "queue-gate")
    hooks = {"model": MODEL_DELAY_S, "queue": gate.spec}
    service_port, prometheus_port = free_port(), free_port()
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(service_port)))
    service_url, prometheus_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prometheus_port}"
    with ExitStack() as resources:
        service_log, prometheus_log = tmp / "service.log", tmp / "prometheus.log"
        service = resources.enter_context(process([
            sys.executable, "-m", "tests.hooked_service", "--host", "127.0.0.1", "--port", str(service_port),
            "--warmup-sizes", "[32]", "--max-concurrency", "1", "--queue-size", "0", "--max-entries", str(MAX_ENTRIES),
            "--shutdown-grace-s", "2", "--log-level", "warning", "--correlation-window-count", str(WINDOW),
            "--shadow-model-dir", str(ROOT / "models" / "default"), "--shadow-sample-rate", "1",
        ], service_log, {"LENSNET_TEST_HOOKS": json.dumps(hooks)}))  # fmt: skip
        prom = resources.enter_context(process([
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn",
        ], prometheus_log))  # fmt: skip
        eventually(lambda: ready(service, service_log, f"{service_url}/readyz"), 60, "the service")
        gate.arm().open()
        shadow = "lensnet_shadow_model_info{"
        eventually(lambda: shadow in httpx.get(f"{service_url}/metrics").text, 60, "the shadow model")
        eventually(lambda: ready(prom, prometheus_log, f"{prometheus_url}/-/ready"), 30, "Prometheus")
        client = resources.enter_context(httpx.Client(base_url=prometheus_url, timeout=10))
        service_client = resources.enter_context(httpx.Client(base_url=service_url, timeout=10))
        live = Stack(service_client, client, Counter(), 0.0)
        eventually(lambda: live.query(f'up{{job="{JOB}"}} == 1'), 20, "the first scrape")
        scraped_since = time.time()

        # Two rounds with a scrape in between: rate() only sees increases after a series' first
        # sample, so every series must exist before the second round increases it.
        for seed in (1, 2):
            live.sent += send_traffic(service_url, seed, gate)
            expected = f"sum({SCORING}) == {live.sent.total()}"
            eventually(lambda q=expected: live.query(q), 20, "Prometheus to scrape the traffic")
        live.feedback = feedback_run(live, service_url, k=1.0, seed=3)  # a healthy policy

        def scraped_after(moment: float) -> float | None:
            last = live.value(f'timestamp(up{{job="{JOB}"}})')
            return last if last > moment else None

        # Two more scrapes, so every series (even one born in the last request) has two samples, and
        # HISTORY_S of samples in all, so one scrape more or less moves a rate by a few % at most.
        after = max(time.time() + 2, scraped_since + HISTORY_S)
        live.at = eventually(lambda: scraped_after(after), HISTORY_S + 20, "the scrapes after the traffic")
        yield live


def feedback_run(live: Stack, url: str, k: float, seed: int) -> Sent:
    """Focus steps, then ΔNLL feedback for FEEDBACK_EDITS of their edits with benefit k·score + noise."""
    rng = np.random.default_rng(seed)
    with FocusClient(url, timeout=30) as client:
        edits, steps = collect_edits(client, FEEDBACK_EDITS, rng, n=MAX_ENTRIES - 16)
        live.sent["/v1/focus", 200] += steps
        return send_feedback(client, edits, k, 0.3, rng)


# --- the dashboard ------------------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"panel{panel['id']}-{target['refId']}", panel, target)
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def expand(expr: str, variables: dict[str, str]) -> str:
    """Substitute Grafana variables ($name, ${name}, ${name:format}); every one must be known."""
    values = GRAFANA_BUILTINS | variables

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]

    expanded = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", substitute, expr)
    assert "$" not in expanded, expanded
    return expanded


# Dashboard targets ("panel title/refId") the known traffic leaves at 0, and why.
QUIET_TARGETS = {
    "Under 3 ms (time range)/A": "the model hook makes every answered request slower than 3 ms",
    "In-flight and queued requests/A": "a gauge: the traffic is over when the dashboard is read",
    "In-flight and queued requests/B": "a gauge: the traffic is over when the dashboard is read",
    "Model errors/A": "the bundled model has no fault",
    "Deployment trace records written and dropped/A": "the stack writes no traces (tests/test_traces.py)",
    "Deployment trace records written and dropped/B": "the stack writes no traces (tests/test_traces.py)",
    "Session evictions by reason/A": "no session bound is reached (tests/test_sessions.py)",
    "Session row placements by outcome, and undone/B": "no session bound is reached (tests/test_sessions.py)",
}

# The `All` selection of the multi-value variables is their allValue, `.*`.
ALL = {"job": JOB, "instance": ".*", "lod": ".*"}


def label_values(live: Stack, query: str) -> list[str]:
    """Grafana's `label_values(selector, label)` through Prometheus' label values API."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert match, query
    selector, label = expand(match.group(1), ALL), match.group(2)
    response = live.prometheus.get(f"/api/v1/label/{label}/values", params={"match[]": selector})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_dashboard_variables_find_the_service(stack: Stack) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    assert label_values(stack, variables["job"]["definition"]) == [JOB]
    assert label_values(stack, variables["instance"]["definition"]) == [stack.service.base_url.netloc.decode()]
    model = stack.service.get("/v1/model").json()
    assert label_values(stack, variables["lod"]["definition"]) == [str(lod) for lod in range(model["max_lod"] + 1)]


@pytest.mark.parametrize(
    ("panel", "target"), [t[1:] for t in dashboard_targets()], ids=[t[0] for t in dashboard_targets()]
)
def test_dashboard_query_returns_data(stack: Stack, panel: dict[str, Any], target: dict[str, Any]) -> None:
    """Every panel query returns a finite value after the known traffic, and a non-zero one unless
    the traffic leaves it at 0 by design (QUIET_TARGETS): a counter that never moves fails here.

    A repeated panel is checked once per value of its variable (the score heatmap: once per LOD).
    """
    repeat = panel.get("repeat")
    values = [None]
    if repeat:
        (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == repeat]
        values = label_values(stack, variable["definition"])
        assert values, repeat
    quiet = f"{panel['title']}/{target['refId']}" in QUIET_TARGETS
    for value in values:
        expr = expand(target["expr"], ALL | ({repeat: value} if repeat else {}))
        result = stack.query(expr, at=stack.at)
        finite = [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]
        assert finite, f"{panel['title']} ({repeat}={value}): no data for {expr}\n{result}"
        assert quiet or any(finite), f"{panel['title']} ({repeat}={value}): only zeros for {expr}\n{result}"
        if quiet:
            assert not any(finite), f"{panel['title']}: listed as quiet but moved ({expr}): {result}"


def exposed_metric_names(live: Stack) -> set[str]:
    text = live.service.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def referenced_metric_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w:])lensnet_[a-z0-9_]+", text))


def test_every_referenced_metric_is_exposed_by_the_service(stack: Stack) -> None:
    exposed = exposed_metric_names(stack)
    (adapter,) = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    sources = {
        "dashboard": " ".join(
            [target["expr"] for _, _, target in dashboard_targets()]
            + [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
        ),
        "rules": " ".join(rule["expr"] for rule in rules()),
        "adapter": f"{adapter['seriesQuery']} {adapter['metricsQuery']}",
    }
    for where, text in sources.items():
        referenced = referenced_metric_names(text)
        assert referenced, where
        assert referenced <= exposed, f"{where}: {sorted(referenced - exposed)}"


def test_prometheus_counts_exactly_the_traffic_sent(stack: Stack) -> None:
    """The scraped request and refusal counters agree with what the client saw, under the
    ServiceMonitor's labelling (its `endpoint` target label must not replace the service's)."""
    result = stack.query(f"sum by (endpoint, status) ({SCORING})", at=stack.at)
    seen = {(s["metric"]["endpoint"], int(s["metric"]["status"])): int(float(s["value"][1])) for s in result}
    assert {key: count for key, count in seen.items() if count} == dict(stack.sent)  # the rest exist at 0
    refused = stack.query(f'lensnet_requests_refused_total{{job="{JOB}"}}', at=stack.at)
    by_reason = {s["metric"]["reason"]: int(float(s["value"][1])) for s in refused}
    statuses = Counter({status: n for (_, status), n in stack.sent.items()})
    assert by_reason == {  # the 504s come from a 0.001 ms deadline: shorter than the latency budget
        "overload": statuses[429], "too_large": statuses[413], "deadline_short": statuses[504], "deadline": 0,
        "not_ready": 0, "shutting_down": 0, "body_timeout": 0,
    }  # fmt: skip


# --- the rules ----------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# A rule's expression is evaluated where Prometheus evaluated the rule, and rates are compared with
# a rate of that evaluation: the raw request rate for a raw expression, the recorded
# lensnet:requests:rate5m (recorded in the same group evaluation as the rules built on it) for
# recorded series. There they agree with the counts exactly (measured) unless a scrape was
# committed between two rules of one evaluation: HISTORY_S bounds what that moves.
RECORDED_REL = 0.1


def check_recorded(stack: Stack, record: str, result: list[dict[str, Any]], rel: float, rate: float) -> None:
    """`record`'s series (as one evaluation of the rule gives them) hold what the known traffic
    gives: shares of `rate` (the scoring requests' rate from the same evaluation) where the traffic
    fixes them (all counters start at 0 and are scraped together, so the ratios of their rates are
    the ratios of their counts; within `rel`), bounds where the model's scores decide."""
    values = [float(sample["value"][1]) for sample in result]
    total = stack.sent.total()
    by_status = Counter({status: n for (_, status), n in stack.sent.items()})
    # 4xx but 429 (422, 413, 409, 404), and the 504s: all on 0.001 ms deadlines, the client's.
    client_caused = sum(n for status, n in by_status.items() if 400 <= status < 500 and status != 429)
    client_caused += by_status[504]
    latency = ("5m", "30m", "1h", "6h")
    exact = {
        "lensnet:requests_overloaded:ratio_rate5m": by_status[429] / total,
        "lensnet:requests_client_caused:ratio_rate5m": client_caused / total,
        "lensnet:request_errors:ratio_rate5m": 0.0,  # no 5xx but the client's 504s
        **{f"lensnet:latency_budget_miss:ratio_rate{w}": 1.0 for w in latency},  # every request: model + 5 ms
        "lensnet:session_evictions:ratio_rate10m": 0.0,
        "lensnet:session_resyncs:ratio_rate10m": 0.5,  # per round: 2 steps answered, a 409 and a 404
    }
    if record in exact:
        assert values == pytest.approx([exact[record]], rel=rel, abs=rel / 10), (record, result)
    elif record == "lensnet:requests:rate5m":
        shares = {(s["metric"]["endpoint"], int(s["metric"]["status"])): float(s["value"][1]) / rate for s in result}
        assert {key: share for key, share in shares.items() if share} == pytest.approx(
            {key: n / total for key, n in stack.sent.items()}, rel=rel
        )
    elif record == "lensnet:requests_client_caused:rate5m":
        assert values == pytest.approx([rate * client_caused / total], rel=rel)
    elif record == "lensnet:request_duration_seconds:p99_rate5m":
        # Every answered request took the model hook's 5 ms at least (the overload rounds' held
        # requests, ~3 % of them, waited at the gate far longer: they set the p99).
        assert len(values) == 1 and MODEL_DELAY_S <= values[0] < math.inf, result
    elif record == "lensnet:clamp_ratio:rate10m":
        assert len(values) == 1 and 0 < values[0] <= 1, result  # the demo model's scores ask for illegal edits
    elif record in ("lensnet:entry_score:median_rate30m", "lensnet:entry_score:saturated_ratio_rate30m"):
        assert sorted(s["metric"]["lod"] for s in result) == ["0", "1", "2"], result
        low = -1.0 if "median" in record else 0.0
        assert all(low <= v <= 1.0 for v in values), result
    else:
        pytest.fail(f"no expectation for the recording rule {record}")


@pytest.mark.parametrize("rule", rules(), ids=[r.get("record") or r["alert"] for r in rules()])
def test_rule_expression_has_the_value_the_traffic_gives(stack: Stack, rule: dict[str, Any]) -> None:
    """Each recording rule's expression, where Prometheus last evaluated the rule before the scrape
    after the traffic, and the series it recorded there; each alert's expression holds exactly when
    the alert is expected active."""
    if "alert" in rule:
        result = stack.query(rule["expr"], at=stack.at)
        assert bool(result) == (EXPECTED_ALERTS[rule["alert"]] != "inactive"), result
        return
    # At the rule's own evaluation time the recorded series it reads are the ones it read; at any
    # other time they are up to an evaluation older than its raw rates, and over this short traffic
    # one evaluation moves a rate's extrapolation by more than 10 % (CI saw 13 %).
    stamps = stack.query(f'timestamp({rule["record"]}{{job="{JOB}"}})', at=stack.at)
    assert stamps, f"{rule['record']}: Prometheus recorded nothing"
    at = max(float(sample["value"][1]) for sample in stamps)
    result = stack.query(rule["expr"], at=at)
    raw = not referenced_recordings(rule["expr"])
    raw_rate = float(stack.query(f"sum(rate({SCORING}[5m]))", at=at)[0]["value"][1])
    requests = stack.query(f'lensnet:requests:rate5m{{job="{JOB}"}}', at=at)
    recorded_rate = sum(float(sample["value"][1]) for sample in requests)
    check_recorded(stack, rule["record"], result, 1e-6 if raw else RECORDED_REL, raw_rate if raw else recorded_rate)
    recorded = stack.query(f'{rule["record"]}{{job="{JOB}"}}', at=stack.at)
    assert all(s["metric"]["namespace"] == "lensnet" for s in recorded), "aggregated by (namespace, job)"
    check_recorded(stack, rule["record"], recorded, RECORDED_REL, recorded_rate)


def referenced_recordings(expr: str) -> set[str]:
    return set(re.findall(r"lensnet:[a-z0-9_:]+", expr))


def test_prometheus_loads_every_rule_healthy(stack: Stack) -> None:
    def loaded() -> list[dict[str, Any]] | None:
        groups = stack.prometheus.get("/api/v1/rules").json()["data"]["groups"]
        found = [rule for group in groups for rule in group["rules"]]
        # A rule is unknown until its first evaluation.
        return found if found and all(r["health"] != "unknown" for r in found) else None

    found = eventually(loaded, 15, "the rules' first evaluation")
    assert sorted(r["name"] for r in found) == sorted(r.get("record") or r["alert"] for r in rules())
    assert {r["name"]: r["health"] for r in found} == {r["name"]: "ok" for r in found}


# The model hook makes every answered request slower than 3 ms, 2 of the ~70 scoring requests are
# 504s on deadlines shorter than the budget (the client's, not paged on) and more than 5 % are
# 429s (OVERLOADED per round): the latency and overload alerts go pending (their `for` keeps them
# from firing in a short test). The model is ready and healthy, and the drift alerts have no
# day-long baseline yet.
EXPECTED_ALERTS = {
    "LensNetLatencyP99OverBudget": "pending",
    "LensNetLatencySLOFastBurn": "pending",
    "LensNetLatencySLOSlowBurn": "pending",
    "LensNetHighErrorRatio": "inactive",  # its only 5xx are 504s on 0.001 ms deadlines: the client's
    "LensNetOverloaded": "pending",
    "LensNetClampRateSpike": "inactive",
    "LensNetScoreMedianShift": "inactive",
    "LensNetScoreSaturationShift": "inactive",
    "LensNetModelNotReady": "inactive",
    "LensNetModelErrors": "inactive",
    "LensNetPolicyPolarityFlipped": "inactive",
    "LensNetPolicyCorrelationWeak": "inactive",
    "LensNetTargetDown": "inactive",
    "LensNetDown": "inactive",
    "LensNetSessionEvictionChurn": "inactive",
}


def test_alerts_react_to_the_live_traffic(stack: Stack) -> None:
    assert set(EXPECTED_ALERTS) == {r["alert"] for r in rules() if "alert" in r}
    statuses = Counter({status: n for (_, status), n in stack.sent.items()})
    total = statuses.total()
    assert statuses[504] / total > 0.01 and statuses[429] / total > 0.05, f"traffic as designed: {statuses}"

    def states() -> dict[str, str]:
        groups = stack.prometheus.get("/api/v1/rules", params={"type": "alert"}).json()["data"]["groups"]
        return {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}

    deadline = time.monotonic() + 20  # the recording rules feed the alerts a few evaluations later
    while (current := states()) != EXPECTED_ALERTS and time.monotonic() < deadline:
        time.sleep(0.25)
    assert current == EXPECTED_ALERTS
    (alert,) = [a for a in stack.prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
                if a["labels"]["alertname"] == "LensNetLatencyP99OverBudget"]  # fmt: skip
    assert alert["labels"] == {"alertname": "LensNetLatencyP99OverBudget", "job": JOB, "namespace": "lensnet",
                               "severity": "warning"}  # fmt: skip
    assert "budget 3 ms" in alert["annotations"]["description"]


# --- the autoscaler's metric --------------------------------------------------------------------


def test_adapter_rule_serves_the_hpa_metric(stack: Stack) -> None:
    """The Prometheus adapter rule, rendered as the adapter would for the HPA's pod query."""
    (rule,) = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    series = stack.prometheus.get("/api/v1/series", params={"match[]": rule["seriesQuery"]}).json()["data"]
    assert series and {s["pod"] for s in series} == {POD}
    metric = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"]).group(1)
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", metric)
        .replace("<<.LabelMatchers>>", f'namespace="lensnet",pod=~"{POD}"')
        .replace("<<.GroupBy>>", "pod")
    )
    (sample,) = stack.query(query, at=stack.at)
    assert sample["metric"] == {"pod": POD}
    # Requests in service, on average: some after the traffic, at most the one inference slot.
    assert 0 < float(sample["value"][1]) <= 1


# --- the image's HEALTHCHECK --------------------------------------------------------------------


@pytest.mark.parametrize("target", FINAL_STAGES)
def test_image_healthcheck_command_probes_healthz(stack: Stack, target: str) -> None:
    """The Dockerfile's HEALTHCHECK command succeeds against a live server and fails without one."""
    (healthcheck,) = dockerfile_stages()[target].args("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    command[0] = sys.executable  # the image's `python` is its virtualenv's

    def probe(port: int) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(command, env={**os.environ, "LENSNET_PORT": str(port)}, capture_output=True, timeout=30)

    healthy = probe(stack.service.base_url.port)
    assert healthy.returncode == 0, healthy.stderr
    assert probe(free_port()).returncode != 0


# --- policy health: the worked example on a real Prometheus (last: it changes the service's state) ---


def alert_states(live: Stack, name: str) -> list[dict[str, Any]]:
    return [a for a in live.prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
            if a["labels"]["alertname"] == name]  # fmt: skip


def test_policy_correlation_and_polarity_alert_follow_the_feedback(stack: Stack) -> None:
    """The healthy run's gauges, as Prometheus scraped them, equal scipy's on the service's count
    window (the last WINDOW items) to 1e-6, and nothing alerts; after a polarity-flipped run
    (benefit = -score + noise) the correlation scraped is negative and the polarity alert is
    active (pending: it fires after its 5 minutes, as the promtool test shows)."""
    from scipy import stats

    def scraped(method: str) -> float | None:
        result = stack.query(f'lensnet_policy_correlation{{job="{JOB}",action="all",method="{method}",window="count"}}')
        return float(result[0]["value"][1]) if result else None

    def scraped_equals_scipy(run: Sent) -> None:
        x, y = run.x[-WINDOW:], run.y[-WINDOW:]
        for method, reference in (("spearman", stats.spearmanr), ("pearson", stats.pearsonr)):
            expected = reference(x, y).statistic
            eventually(lambda m=method, e=expected: (v := scraped(m)) is not None and abs(v - e) < 1e-6, 20,
                       f"Prometheus to scrape the {method} correlation {expected:.4f}")  # fmt: skip

    assert stack.feedback is not None
    scraped_equals_scipy(stack.feedback)
    assert scraped("spearman") > 0.5
    assert not alert_states(stack, "LensNetPolicyPolarityFlipped")
    assert not alert_states(stack, "LensNetPolicyCorrelationWeak")

    flipped = feedback_run(stack, str(stack.service.base_url), k=-1.0, seed=4)
    scraped_equals_scipy(flipped)
    assert scraped("spearman") < -0.5
    (alert,) = eventually(
        lambda: [a for a in alert_states(stack, "LensNetPolicyPolarityFlipped") if a["labels"]["action"] == "all"],
        20, "the polarity alert",
    )  # fmt: skip
    assert alert["state"] == "pending" and alert["labels"]["severity"] == "critical"
    assert float(alert["value"]) == pytest.approx(scraped("spearman"), abs=1e-6)
    assert not alert_states(stack, "LensNetPolicyCorrelationWeak")
