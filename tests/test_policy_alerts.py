"""The polarity alert fires on a real Prometheus when the live service's feedback flips sign.

A `lensnet-serve` process and Debian's `prometheus` on loopback (as in test_observability, whose
helpers this reuses): Prometheus scrapes every second and evaluates the production rules file
every second, with only its `for:` durations shortened (FOR) so an alert can fire within a test;
every `expr` is byte-identical to production (asserted). Feedback is the worked example's
(examples/policy_health.py): benefit y = k·score + noise on real edits of real focus answers.
A healthy run (k = +1) must keep the polarity alert inactive; the flipped run (k = -1, the
review's bug) must take it to *firing* (promtool's unit tests check the production durations).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from scipy import stats

from examples.policy_health import Sent, collect_edits, send_feedback
from lensnet_client import FocusClient
from tests.live import LiveService, free_port
from tests.test_observability import RULES, eventually, executable, process, prometheus_config, ready

ALERT = "LensNetPolicyPolarityFlipped"
FOR = "3s"  # every rule's `for:`, here (production: minutes)
WINDOW = 120  # the service's count window; the alert needs at least 100 items in it
EDITS = WINDOW + 30  # matched items per run: a run fills the window with its own feedback


def shortened_rules(text: str) -> str:
    """The rules file with every `for:` duration replaced by FOR, and nothing else changed."""
    return re.sub(r"^(\s+)for: \S+$", rf"\g<1>for: {FOR}", text, flags=re.MULTILINE)


def rule_list(text: str) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def test_shortened_rules_differ_from_production_only_in_for() -> None:
    production, test = RULES.read_text(), shortened_rules(RULES.read_text())
    pairs = list(zip(rule_list(production), rule_list(test), strict=True))
    assert any(p.get("alert") == ALERT and "for" in p for p, _ in pairs)
    for prod, short in pairs:
        assert short["expr"] == prod["expr"]  # byte-identical expressions
        assert {k: v for k, v in short.items() if k != "for"} == {k: v for k, v in prod.items() if k != "for"}
        assert short.get("for", FOR) == FOR and ("for" in short) == ("for" in prod)


@dataclass
class Stack:
    service: LiveService
    prometheus: httpx.Client

    def polarity_alerts(self) -> list[dict[str, Any]]:
        """The polarity alert's active (pending or firing) instances for all edits together."""
        alerts = self.prometheus.get("/api/v1/alerts").json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == ALERT and a["labels"]["action"] == "all"]

    def scraped(self, query: str) -> float | None:
        result = self.prometheus.get("/api/v1/query", params={"query": query}).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def feedback(self, k: float, seed: int) -> Sent:
        """Focus steps, then ΔNLL feedback for EDITS of their edits with benefit k·score + noise."""
        rng = np.random.default_rng(seed)
        with FocusClient(self.service.url, timeout=30) as client:
            return send_feedback(client, collect_edits(client, EDITS, rng)[0], k, 0.3, rng)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = executable("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (scripts/bootstrap test installs Debian's package)")
    tmp = tmp_path_factory.mktemp("policy-alerts")
    rules = tmp / "lensnet.rules.yml"
    rules.write_text(shortened_rules(RULES.read_text()))
    with ExitStack() as resources:
        service = LiveService("--correlation-window-count", str(WINDOW)).wait_ready()
        resources.callback(service.stop)
        config = prometheus_config(service.port) | {"rule_files": [str(rules)]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port, log = free_port(), tmp / "prometheus.log"
        prom = resources.enter_context(process([
            prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], log))  # fmt: skip
        eventually(lambda: ready(prom, log, f"http://127.0.0.1:{port}/-/ready"), 30, "Prometheus")
        client = resources.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10))
        live = Stack(service, client)
        eventually(lambda: live.scraped("up == 1"), 20, "the first scrape")
        yield live


SPEARMAN = 'lensnet_policy_correlation{action="all",method="spearman",window="count"}'
SAMPLES = 'lensnet_policy_correlation_samples{action="all",window="count"}'


def scraped_run(stack: Stack, run: Sent) -> float:
    """Wait until Prometheus has scraped the run's full window; its Spearman correlation."""
    expected = stats.spearmanr(run.x[-WINDOW:], run.y[-WINDOW:]).statistic
    eventually(lambda: (v := stack.scraped(SPEARMAN)) is not None and abs(v - expected) < 1e-6
               and stack.scraped(SAMPLES) == WINDOW, 20, f"the scraped correlation {expected:.3f}")  # fmt: skip
    return expected


def test_polarity_alert_stays_inactive_for_a_healthy_policy_and_fires_when_it_flips(stack: Stack) -> None:
    healthy = scraped_run(stack, stack.feedback(k=1.0, seed=1))
    assert healthy > 0.5
    # Several times the shortened `for:` at a 1 s evaluation interval: never pending, never firing.
    watched_until = time.monotonic() + 4 * float(FOR.removesuffix("s"))
    while time.monotonic() < watched_until:
        assert stack.polarity_alerts() == []
        time.sleep(0.5)

    flipped = scraped_run(stack, stack.feedback(k=-1.0, seed=2))
    assert flipped < -0.5
    (alert,) = eventually(lambda: [a for a in stack.polarity_alerts() if a["state"] == "firing"], 30,
                          f"{ALERT} to fire")  # fmt: skip
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["window"] == "count"
    assert float(alert["value"]) == pytest.approx(flipped, abs=1e-6)
    assert "prefers the worse choices" in alert["annotations"]["description"]
