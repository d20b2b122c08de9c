"""Decision ids and POST /v1/feedback over real HTTP: a `lensnet-serve` process on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import numpy as np
import pytest
from scipy import stats

from examples.policy_health import collect_edits, gauges, send_feedback
from lensnet_client import FocusClient, frame
from service.http.feedback import MAX_PENDING, FeedbackEndpoint
from service.metrics import Metrics
from service.policy import PolicyHealth
from service.settings import Settings

from .live import LiveService, snapshot

WINDOW = 150  # the count window the service runs with
MEMORY = 64  # decisions it remembers
MAX_ITEMS = 300


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService(
        "--correlation-window-count", str(WINDOW), "--decision-memory-size", str(MEMORY),
        "--feedback-max-items", str(MAX_ITEMS), "--max-body-bytes", str(1 << 20),
    ).wait_ready()  # fmt: skip
    yield service
    assert service.stop() == 0


@pytest.fixture
def client(live: LiveService) -> Iterator[FocusClient]:
    with FocusClient(live.url, timeout=60) as focus_client:
        yield focus_client


def counted(live: LiveService) -> dict[str, float]:
    return {k: v for k, v in live.metrics().items() if k.startswith("lensnet_feedback_items_total")}


def post(live: LiveService, body: object, content_type: str = "application/json") -> tuple[int, dict]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = live.http.post("/v1/feedback", content=content, headers={"content-type": content_type})
    return response.status_code, response.json()


def test_gauges_equal_scipy_on_the_window_and_follow_a_polarity_flip(live: LiveService, client: FocusClient) -> None:
    """y = k·x + noise: each count window's Pearson/Spearman (per action and overall) equal scipy's on
    exactly the last WINDOW matched items of that action, to 1e-6; flipping k flips their sign.
    (First in the module: the windows hold only what this test sends.)"""
    rng = np.random.default_rng(5)
    runs = []
    for k in (0.8, -0.8):
        runs.append(send_feedback(client, collect_edits(client, WINDOW + 30, rng)[0], k, 0.3, rng))
        shown = gauges(client)
        x, y, expand = (np.concatenate([getattr(run, name) for run in runs]) for name in ("x", "y", "expand"))
        for action, chosen in (("all", np.ones(x.size, bool)), ("expand", expand), ("collapse", ~expand)):
            xa, ya = x[chosen][-WINDOW:], y[chosen][-WINDOW:]
            assert shown[f'lensnet_policy_correlation_samples{{action="{action}",window="count"}}'] == xa.size
            assert shown[f'lensnet_policy_correlation_samples{{action="{action}",window="time"}}'] == chosen.sum()
            if xa.size < 10:
                continue
            for method, reference in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
                value = shown[f'lensnet_policy_correlation{{action="{action}",method="{method}",window="count"}}']
                assert value == pytest.approx(reference(xa, ya).statistic, abs=1e-6), (action, method)
        all_count = 'lensnet_policy_correlation{action="all",method="spearman",window="count"}'
        assert np.sign(shown[all_count]) == np.sign(k)


def test_every_focus_answer_has_its_own_decision_id(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(128, seed=1)
    ids = []
    for content_type, body in (
        ("application/json", json.dumps({"embeddings": embeddings.astype(float).tolist(), "lod": lod.tolist(),
                                         "positions": positions.tolist(), "options": {"w_max": 64}}).encode()),
        (frame.MEDIA_TYPE, frame.pack({"options": {"w_max": 64}},
                                      {"embeddings": embeddings, "lod": lod, "positions": positions})),
    ):  # fmt: skip
        response = live.http.post("/v1/focus", content=body, headers={"content-type": content_type})
        assert response.status_code == 200
        document = response.json() if content_type == "application/json" else frame.unpack(response.content)[0]
        ids.append(document["decision_id"])
    assert len(set(ids)) == 2 and all(len(i) <= 64 for i in ids)


def test_feedback_results_per_item_and_counters(live: LiveService, client: FocusClient) -> None:
    rng = np.random.default_rng(2)
    (decision, _, edit), *_ = collect_edits(client, 1, rng)[0]
    before = counted(live)
    results = client.feedback([
        (decision, 0, 0.1), (decision, 0, 0.2), (decision, 9999, 0.1), ("nonsense", 0, 0.1),
        (decision.split("-")[0] + "-ffffff", 0, 0.1), ("0000-1", 0, 0.0),
    ])  # fmt: skip
    assert results == ["matched", "duplicate", "bad_index", "unknown_decision", "unknown_decision", "unknown_decision"]
    after = counted(live)
    increase = {k.split('"')[1]: after[k] - before.get(k, 0.0) for k in after}
    assert increase == {"matched": 1, "duplicate": 1, "bad_index": 1, "unknown_decision": 3, "expired_decision": 0}
    delta = live.metrics()
    lod = edit.lod_before
    assert delta[f'lensnet_feedback_delta_nll_count{{action="{edit.action}",lod="{lod}"}}'] >= 1


def test_decisions_beyond_the_memory_expire(live: LiveService, client: FocusClient) -> None:
    rng = np.random.default_rng(3)
    (oldest, _, _), *_ = collect_edits(client, 1, rng)[0]
    embeddings, lod, positions = snapshot(32, seed=4)
    for _ in range(MEMORY):
        client.focus(embeddings, lod, positions, w_max=32)
    assert client.feedback([(oldest, 0, 0.1)]) == ["expired_decision"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"items": [', 400, "body"),
        ({"items": []}, 422, "items"),
        ({"items": [{"decision_id": "a-1", "edit": 0}]}, 422, "items[0].delta_nll"),
        ({"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": "0.1"}]}, 422, "items[0].delta_nll"),
        ({"items": [{"decision_id": "a-1", "edit": 0.5, "delta_nll": 0.1}]}, 422, "items[0].edit"),
        ({"items": [{"decision_id": "a-1", "edit": -1, "delta_nll": 0.1}]}, 422, "items[0].edit"),
        ({"items": [{"decision_id": "a" * 65, "edit": 0, "delta_nll": 0.1}]}, 422, "items[0].decision_id"),
        ({"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1, "x": 1}]}, 422, "items[0].x"),
        ({"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1}], "more": 1}, 422, "more"),
        ({"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1}] * (MAX_ITEMS + 1)}, 422, "items"),
        ([1, 2], 422, "body"),
        (b'{"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": NaN}]}', 422, "items[0].delta_nll"),
        (b'{"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": -Infinity}]}', 422, "items[0].delta_nll"),
        (b"\xff\xfe", 400, "body"),
        (b'{"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 1e999}]}', 422, "items[0].delta_nll"),
        (b"x" * ((1 << 20) + 1), 413, "body"),
    ],
)
def test_bad_feedback_gets_a_problem_naming_the_field(live: LiveService, body: object, status: int, field: str) -> None:
    code, problem = post(live, body)
    assert (code, problem["field"]) == (status, field), problem
    assert problem["type"].startswith("urn:lensnet:problem:") and problem["expected"] and "got" in problem
    assert live.http.get("/readyz").status_code == 200


def test_feedback_needs_json(live: LiveService) -> None:
    code, problem = post(live, b"items", content_type="text/plain")
    assert code == 415 and problem["field"] == "Content-Type"


def test_feedback_takes_only_post_and_counts_every_answer(live: LiveService) -> None:
    """The route is served beside FastAPI: a GET still gets a 405 problem naming what is allowed,
    and each answer is counted under the route's own label."""
    label = 'lensnet_request_duration_seconds_count{endpoint="/v1/feedback",status="405"}'
    before = live.metrics().get(label, 0.0)
    response = live.http.get("/v1/feedback")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(":http-error")
    assert live.metrics()[label] == before + 1


def test_openapi_documents_feedback_and_decision_ids(live: LiveService) -> None:
    document = live.http.get("/openapi.json").json()
    operation = document["paths"]["/v1/feedback"]["post"]
    item = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]["items"]["items"]
    assert set(item["properties"]) == {"decision_id", "edit", "delta_nll"}
    assert {"200", "400", "413", "422"} <= operation["responses"].keys()
    assert "decision_id" in document["components"]["schemas"]["FocusResponse"]["required"]


def test_feedback_beyond_the_pending_bound_gets_429(live: LiveService) -> None:
    """MAX_PENDING uploads that never finish hold every place; the next batch is refused at once."""
    with ExitStack() as held:
        for _ in range(MAX_PENDING):
            sock = held.enter_context(socket.create_connection(("127.0.0.1", live.port)))
            sock.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # fmt: skip
        deadline = time.monotonic() + 30
        while live.metrics()["lensnet_in_flight_requests"] < MAX_PENDING:  # their headers read, bodies awaited
            assert time.monotonic() < deadline, live.metrics()["lensnet_in_flight_requests"]
            time.sleep(0.2)
        code, problem = post(live, {"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1}]})
        assert code == 429 and problem["type"].endswith(":overloaded"), problem
    deadline = time.monotonic() + 30
    while live.metrics()["lensnet_in_flight_requests"] > 0:  # the server has seen them hang up
        assert time.monotonic() < deadline, live.metrics()["lensnet_in_flight_requests"]
        time.sleep(0.2)
    code, problem = post(live, {"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1}]})
    assert code == 200 and problem["results"] == ["unknown_decision"]


def test_a_failure_inside_the_route_answers_500_and_the_next_batch_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the policy's work (not bad input) is a 500 problem, logged, and the route keeps serving."""
    policy = PolicyHealth(Settings(), Metrics(0.003, 2))
    endpoint = FeedbackEndpoint(policy, Settings())
    body = {"items": [{"decision_id": "a-1", "edit": 0, "delta_nll": 0.1}]}
    real = policy.feedback
    monkeypatch.setattr(policy, "feedback", lambda batch: 1 / 0)

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=endpoint), base_url="http://x") as http:
            return await http.post("/v1/feedback", json=body)

    failed = asyncio.run(post())
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
    assert failed.json()["type"].endswith(":internal-error") and endpoint.pending == 0
    monkeypatch.setattr(policy, "feedback", real)
    served = asyncio.run(post())
    assert served.status_code == 200 and served.json()["results"] == ["unknown_decision"]
