"""Focus sessions over real HTTP: errors and all-or-nothing steps, bounds and their metrics, the
client's recovery (sync and async), and several workers on one port."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import pytest

from lensnet_client import (
    AsyncFocusClient,
    AsyncFocusSession,
    FocusClient,
    FocusError,
    FocusResult,
    FocusSession,
    History,
    edit_rows,
    frame,
)
from service.metrics import PLACEMENT_OUTCOMES

from .hooked_service import Gate
from .live import LiveService, snapshot, wait_for_metric

FRAME = frame.MEDIA_TYPE
D, B = 256, 32


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService("--max-entries", "2048", "--max-body-bytes", str(2 << 20)).wait_ready()
    yield service
    assert service.stop() == 0


def tail_append(lod: np.ndarray, positions: np.ndarray, k: int, seed: int = 0) -> dict[str, Any]:
    """k raw tokens continuing the WC (the kwargs of `FocusSession.step`)."""
    end = int(positions[-1]) + B ** int(lod[-1])
    rows = np.random.default_rng(seed).standard_normal((k, D)).astype(np.float16)
    return {"append_embeddings": rows, "append_lod": np.zeros(k, np.int64),
            "append_positions": np.arange(end, end + k, dtype=np.int64)}  # fmt: skip


def created_for(result: Any, seed: int = 0) -> np.ndarray:
    rows = sum(edit.added for edit in result.edits)
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float16)


def placements(metrics: dict[str, float]) -> float:
    """Row placements counted, whatever their outcome: one per session answer, once it has run."""
    return sum(metrics.get(f'lensnet_session_placements_total{{outcome="{o}"}}', 0.0) for o in PLACEMENT_OUTCOMES)


def await_placements(service: LiveService) -> dict[str, float]:
    """The metrics once every session answer's placement (run after the answer is sent) is counted."""
    deadline = time.monotonic() + 10
    answers = ("lensnet_sessions_created_total", "lensnet_session_steps_total")
    while placements(metrics := service.metrics()) < sum(metrics.get(key, 0.0) for key in answers):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.01)
    return metrics


def post_step(live: LiveService, session_id: str, fields: dict[str, Any], arrays: dict[str, Any]) -> httpx.Response:
    return live.http.post(f"/v1/sessions/{session_id}/focus", content=frame.pack(fields, arrays),
                          headers={"content-type": FRAME})  # fmt: skip


def test_create_answers_201_with_location_and_the_focus_answer(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(200, seed=3)
    body = frame.pack({"options": {"w_max": 180}}, {"embeddings": embeddings, "lod": lod, "positions": positions})
    created = live.http.post("/v1/sessions", content=body, headers={"content-type": FRAME})
    stateless = live.http.post("/v1/focus", content=body, headers={"content-type": FRAME})
    assert created.status_code == 201
    document, _ = frame.unpack(created.content)
    assert created.headers["location"] == f"/v1/sessions/{document['session_id']}" and document["version"] == 1
    expected, _ = frame.unpack(stateless.content)
    assert document["edits"] == expected["edits"] and document["counters"] == expected["counters"]
    info = live.http.get(created.headers["location"]).json()
    assert (info["n"], info["version"], info["options"]) == (200, 1, {"w_max": 180})
    assert info["bytes"] >= 200 * D * 4  # held in the graph's dtype (fp32 on the CPU)
    assert live.http.delete(created.headers["location"]).status_code == 204
    missing = live.http.get(created.headers["location"])
    assert missing.status_code == 404 and missing.json()["type"] == "urn:lensnet:problem:session-not-found"


def test_openapi_documents_the_session_endpoints(live: LiveService) -> None:
    document = live.http.get("/openapi.json").json()
    assert {"/v1/sessions", "/v1/sessions/{id}/focus", "/v1/sessions/{id}"} <= set(document["paths"])
    assert "201" in document["paths"]["/v1/sessions"]["post"]["responses"]
    assert {"404", "409"} <= set(document["paths"]["/v1/sessions/{id}/focus"]["post"]["responses"])
    assert {"delete", "get"} <= set(document["paths"]["/v1/sessions/{id}"])
    assert {"StepRequest", "SessionResponse", "SessionInfo"} <= set(document["components"]["schemas"])
    options = document["components"]["schemas"]["StepOptions"]["properties"]
    assert options["w_max"]["type"] == "integer" and "anyOf" not in options["w_max"]  # never null
    assert all("default" not in field for field in options.values())  # omitted: the session's
    assert "null: the allocator default" in options["max_edits"]["description"]


def test_failed_steps_leave_the_session_exactly_as_it_was(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(300, seed=4)
    with FocusClient(live.url) as client, FocusSession(client, w_max=290) as session:
        first = session.open(embeddings, lod, positions)
        assert first.edits  # over budget: the next step has edits to apply
        sid = session.state.session_id
        assert sid is not None
        await_placements(live)  # the rows placed for the next step after the answer: then nothing changes
        before = live.http.get(f"/v1/sessions/{sid}").json()
        assert before["placed"]
        append = tail_append(session.lod, session.positions, 4)
        broken = dict(append, append_positions=append["append_positions"] + 1)  # a gap after the tail
        bad_rows = dict(append, append_embeddings=np.full((4, D), np.nan, np.float16))
        cases = [
            ({"version": 1}, {"created": np.zeros((1, D), np.float16)}, 422, "created.shape"),
            ({"version": 1, "applied": []}, broken, 422, f"positions[{first.length_before}]"),
            ({"version": 1, "applied": []}, bad_rows, 422, "append_embeddings[0]"),
            ({"version": 1, "applied": [99]}, {}, 422, "applied[0]"),
            ({"version": 1, "applied": [], "trim_head": 300}, {}, 422, "trim_head"),  # nothing left
            ({"version": 1, "applied": [], "bogus": 1}, {}, 422, "bogus"),
            ({"version": 1, "applied": [], "options": {"max_edits": 0}}, {}, 422, "options.max_edits"),
            ({"version": 2, "applied": []}, {}, 409, "version"),
        ]
        for fields, arrays, status, where in cases:
            response = post_step(live, sid, fields, arrays)
            assert response.status_code == status, (fields, response.text)
            problem = response.json()
            assert problem["field"].startswith(where), problem
            if status == 409:
                assert problem["current_version"] == 1
            if fields.get("applied") == [] and where.startswith("positions["):
                assert problem["rule"] == "contiguity" and problem["index"] == first.length_before
        assert live.http.get(f"/v1/sessions/{sid}").json() | {"idle_s": 0, "age_s": 0} == before | {
            "idle_s": 0, "age_s": 0,
        }  # fmt: skip
        # The session still answers its next step exactly like /v1/focus on the caller's copy.
        result = session.step(created=created_for(first), **append, return_scores=True)
        assert result.version == 2 and session.resyncs == 0


class Hooked(NamedTuple):
    """What `hooked_session` holds open."""

    service: LiveService
    client: FocusClient
    session: FocusSession
    embeddings: np.ndarray  # the session's WC at its creation
    first: FocusResult  # the creation's answer
    append: dict[str, Any]  # 16 tokens continuing that WC (`FocusSession.step` keywords)
    pool: ThreadPoolExecutor  # one thread, for a step held inside a stage


@contextlib.contextmanager
def hooked_session(hooks: dict[str, Any], seed: int, *flags: str, n: int = 64, w_max: int = 64) -> Iterator[Hooked]:
    """A live service with stage `hooks` (and `flags`) and an `n`-entry session open on it: for steps
    held or failing inside a stage. Gates among the hooks are opened on the way out, so no call
    waits for one while the service stops."""
    service = LiveService(*flags, hooks=hooks).wait_ready()
    embeddings, lod, positions = snapshot(n, seed=seed)
    try:
        with (
            FocusClient(service.url, timeout=60) as client,
            FocusSession(client, w_max=w_max) as session,
            ThreadPoolExecutor(1) as pool,
        ):
            first = session.open(embeddings, lod, positions)
            append = tail_append(session.lod, session.positions, 16)
            yield Hooked(service, client, session, embeddings, first, append, pool)
    finally:
        for spec in hooks.values():
            if isinstance(spec, dict) and "gate" in spec:
                Gate(Path(spec["gate"])).open()
        assert service.stop() == 0


def assert_still_at_its_creation(service: LiveService, session: FocusSession) -> None:
    info = service.http.get(f"/v1/sessions/{session.state.session_id}").json()
    assert (info["version"], info["n"]) == (1, 64)


def assert_the_creations_placement(h: Hooked) -> None:
    """The one placement so far, after the creation's answer, has the outcome the rules give: the
    rows are placed for any edits (in a grown buffer: a new session's has no spare row)."""
    outcome = "placed" if h.first.edits else "none"
    m = await_placements(h.service)
    assert m[f'lensnet_session_placements_total{{outcome="{outcome}"}}'] == placements(m) == 1, outcome


def late_step(session: FocusSession, **step: Any) -> FocusError:
    """A step sent with a 100 ms deadline that it must miss: its error."""
    with pytest.raises(FocusError) as error:
        session.step(**step, deadline_ms=100)
    return error.value


def test_a_step_past_its_deadline_is_undone(tmp_path: Path) -> None:
    """504 after the model ran (the step is held in the model past its deadline): the delta was
    applied and is rolled back; the same step then succeeds."""
    gate = Gate(tmp_path / "gate")
    with hooked_session({"model": gate.spec}, seed=6) as h:
        assert not h.first.edits  # this WC's first answer has none: nothing to place
        assert_the_creations_placement(h)
        gate.arm()
        step = h.pool.submit(late_step, h.session, applied=[], **h.append)
        gate.wait_entered(1)  # in the model, the delta applied; it arrived before, so within 100 ms…
        time.sleep(0.15)  # …its deadline passes
        gate.open()
        error = step.result()
        assert error.status == 504 and error.problem["detail"] == "the model finished after the deadline"
        assert_still_at_its_creation(h.service, h.session)
        assert h.service.metrics()['lensnet_requests_refused_total{reason="deadline"}'] == 1
        assert h.session.step(applied=[], **h.append).version == 2


def test_a_placed_step_past_its_deadline_is_undone_to_the_rows_before_the_placement(tmp_path: Path) -> None:
    """A step that takes its session's placement and then fails (504: held in the model past its
    deadline) leaves the session as it was before the placement (not placed, the set-aside rows no
    longer counted, in GET and the gauge alike); the same step then scores the caller's copy."""
    gate = Gate(tmp_path / "gate")
    with hooked_session({"model": gate.spec}, 4, n=300, w_max=290) as h:
        sid = h.session.state.session_id
        m = await_placements(h.service)
        placed = h.service.http.get(f"/v1/sessions/{sid}").json()
        assert placed["placed"]
        assert m['lensnet_session_placements_total{outcome="placed"}'] == placements(m) == 1
        created = created_for(h.first)
        gate.arm()
        step = h.pool.submit(late_step, h.session, created=created, **h.append)
        gate.wait_entered(1)  # in the model, the placed rows filled and the tail appended
        time.sleep(0.15)  # its deadline passes
        gate.open()
        assert step.result().status == 504
        after = h.service.http.get(f"/v1/sessions/{sid}").json()
        assert (after["version"], after["n"], after["placed"]) == (1, 300, False)
        assert after["bytes"] < placed["bytes"] and h.service.metrics()["lensnet_session_bytes"] == after["bytes"]
        result = h.session.step(created=created, **h.append, return_scores=True)
        assert result.version == 2 and h.session.resyncs == 0
        whole = np.concatenate([edit_rows(h.embeddings, h.first.edits, created), h.append["append_embeddings"]])
        stateless = h.client.focus(whole, h.session.lod, h.session.positions, w_max=290, return_scores=True)
        assert np.array_equal(result.scores, stateless.scores)  # the rows the model saw are the caller's


def test_a_bug_inside_a_step_is_a_500_and_the_step_is_undone(tmp_path: Path) -> None:
    """A failure after the delta was staged (here in the allocator: a bug, not bad input) answers
    500 internal-error, leaves the session as it was, and the same step then succeeds."""
    failing = tmp_path / "fail"
    failing.mkdir()
    with hooked_session({"allocate": {"fail": str(failing)}}, seed=8, w_max=96) as h:
        assert sum(edit.added - edit.removed for edit in h.first.edits) > 0  # placed in a grown buffer
        assert_the_creations_placement(h)
        (failing / "armed").touch()
        with pytest.raises(FocusError) as error:
            h.session.step(applied=[], **h.append)
        assert error.value.status == 500 and error.value.problem["type"].endswith(":internal-error")
        assert "planted" not in error.value.problem["detail"]  # the log has it, the caller does not
        assert_still_at_its_creation(h.service, h.session)
        (failing / "armed").unlink()
        result = h.session.step(applied=[], **h.append, return_scores=True)
        assert result.version == 2 and h.session.resyncs == 0
        whole = np.concatenate([h.embeddings, h.append["append_embeddings"]])
        stateless = h.client.focus(whole, h.session.lod, h.session.positions, w_max=96, return_scores=True)
        assert np.array_equal(result.scores, stateless.scores) and result.edits == stateless.edits
        assert "a planted failure" in h.service.log()


def test_a_step_waits_for_the_rows_placement_and_a_concurrent_step_gets_409(tmp_path: Path) -> None:
    """After an answer an inference thread places the session's rows for its edits: a step that
    comes meanwhile waits for it (in its apply stage) instead of answering 409; one that comes while
    another step of the session runs answers 409 at once."""
    # Armed before the start: the warm-up places nothing, so the creation's placement is the first held.
    placing, model = Gate(tmp_path / "place").arm(), Gate(tmp_path / "model")
    with hooked_session({"place": placing.spec, "model": model.spec}, 11, "--max-concurrency", "2") as h:
        placing.wait_entered(1)  # the placement after the creation's answer holds the session
        waiting = h.pool.submit(h.session.step, applied=[], **h.append)
        time.sleep(1.0)  # the step reaches the session well within this (it does not 409 meanwhile)
        assert not waiting.done()
        placing.open()
        second = waiting.result(timeout=30)
        assert second.version == 2 and h.session.resyncs == 0
        assert second.server_timing["apply"] >= 500  # ms: the wait for the placement
        model.arm()
        tail = tail_append(h.session.lod, h.session.positions, 4, seed=1)
        running = h.pool.submit(h.session.step, applied=[], **tail)
        model.wait_entered(1)  # the third step holds the session, in the model
        response = post_step(h.service, h.session.state.session_id, {"version": 2, "applied": []}, {})
        assert response.status_code == 409, response.text
        assert response.json()["detail"].startswith("another step of this session is in progress:")
        model.open()
        assert running.result(timeout=30).version == 3
        m = await_placements(h.service)  # the three answers'
        assert placements(m) == 3
        assert m['lensnet_session_placements_total{outcome="error"}'] == 0
        assert m["lensnet_session_placement_seconds_count"] == m['lensnet_session_placements_total{outcome="placed"}']


def test_a_placement_that_finds_its_session_deleted_places_nothing(tmp_path: Path) -> None:
    """A session deleted while its placement waits for its turn: the placement counts `gone`, and
    neither moves rows nor adds bytes to a store that no longer holds the session."""
    placing = Gate(tmp_path / "place").arm()
    with hooked_session({"place": placing.spec}, 4, n=300, w_max=290) as h:
        assert h.first.edits
        placing.wait_entered(1)  # the creation's placement, holding the session
        assert h.service.http.delete(f"/v1/sessions/{h.session.state.session_id}").status_code == 204
        placing.open()
        m = await_placements(h.service)
        assert m['lensnet_session_placements_total{outcome="gone"}'] == placements(m) == 1
        assert m["lensnet_session_bytes"] == 0 and m["lensnet_sessions_active"] == 0


def test_session_calls_use_the_same_limits_and_json(live: LiveService) -> None:
    too_big = live.http.post("/v1/sessions", content=b"x" * ((2 << 20) + 1), headers={"content-type": FRAME})
    assert too_big.status_code == 413
    assert live.http.get("/v1/sessions").status_code == 405
    assert (
        live.http.post("/v1/sessions/nope/focus", content=b"{}", headers={"content-type": "text/plain"}).status_code
        == 415
    )
    gone = live.http.post("/v1/sessions/nope/focus", json={"bogus": 1})  # a broken body to a gone session:
    assert gone.status_code == 404 and gone.json()["type"].endswith(":session-not-found")  # the 404 to act on
    embeddings, lod, positions = snapshot(64, seed=6)
    body = {"embeddings": embeddings.astype(np.float32).tolist(), "lod": lod.tolist(), "positions": positions.tolist(),
            "options": {"w_max": 64}}  # fmt: skip
    created = live.http.post("/v1/sessions", json=body)
    assert created.status_code == 201 and created.headers["content-type"] == "application/json"
    sid = created.json()["session_id"]
    end = int(positions[-1]) + B ** int(lod[-1])
    step = {"version": 1, "applied": [], "created": [], "append_embeddings": [[0.5] * D] * 2, "append_lod": [0, 0],
            "append_positions": [end, end + 1], "return_scores": True}  # fmt: skip
    answer = live.http.post(f"/v1/sessions/{sid}/focus", json=step)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == 2 and len(answer.json()["scores"]) == 66


def test_client_recovers_from_404_and_409_with_a_full_upload(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(256, seed=7)
    wc = {"embeddings": embeddings}
    history = History()
    before = live.metrics()
    with FocusClient(live.url) as client, FocusSession(client, w_max=250, snapshot=lambda: wc["embeddings"]) as s:
        result = s.open(embeddings, lod, positions)
        for conflict in ("delete", "version"):
            sid = s.state.session_id
            if conflict == "delete":
                live.http.delete(f"/v1/sessions/{sid}")
            else:  # someone else stepped the session: the client's version is stale
                assert post_step(live, sid, {"version": s.state.version, "applied": []}, {}).status_code == 200
            created = created_for(result)
            append = tail_append(s.lod, s.positions, 8)
            applied = list(result.edits)
            # the caller applies the step to its own copy first (what `snapshot` returns)
            wc["embeddings"] = np.concatenate(
                [edit_rows(wc["embeddings"], applied, created), append["append_embeddings"]]
            )
            history.record(applied)
            new = s.step(created=created, **append, return_scores=True)
            stateless = client.focus(wc["embeddings"], s.lod, s.positions, w_max=250, history=history,
                                     return_scores=True)  # fmt: skip
            assert new.edits == stateless.edits and np.array_equal(new.scores, stateless.scores)
            assert new.version == 1 and new.session_id != sid  # a fresh session
            assert live.http.get(f"/v1/sessions/{sid}").status_code == 404  # a 409's old one deleted
            result = new
        assert s.resyncs == 2
    after = live.metrics()
    for reason in ("not_found", "version"):
        key = f'lensnet_session_resyncs_total{{reason="{reason}"}}'
        assert after[key] - before.get(key, 0) == 1


def test_a_resync_on_a_step_with_overrides_keeps_them_to_that_step(live: LiveService) -> None:
    """The step that re-creates the session has one-step overrides: its answer follows them, and
    the later steps answer with the caller's options again (as a session never lost would)."""
    embeddings, lod, positions = snapshot(256, seed=12)
    wc = {"embeddings": embeddings}
    history = History()
    with FocusClient(live.url) as client, FocusSession(client, w_max=250, snapshot=lambda: wc["embeddings"]) as s:
        result = s.open(embeddings, lod, positions)
        for k, overrides in enumerate(({"max_edits": 1, "tau_expand": 0.01}, {}, {})):
            if k == 0:
                live.http.delete(f"/v1/sessions/{s.state.session_id}")  # lost: this step re-creates it
            created, append, applied = created_for(result, k), tail_append(s.lod, s.positions, 8, k), list(result.edits)
            wc["embeddings"] = np.concatenate(
                [edit_rows(wc["embeddings"], applied, created), append["append_embeddings"]]
            )
            history.record(applied)
            new = s.step(created=created, **append, return_scores=True, **overrides)
            stateless = client.focus(wc["embeddings"], s.lod, s.positions, w_max=250, history=history,
                                     return_scores=True, **overrides)  # fmt: skip
            assert new.edits == stateless.edits and np.array_equal(new.scores, stateless.scores), k
            assert len(new.edits) <= (1 if k == 0 else 8)
            result = new
        assert s.resyncs == 1 and len(result.edits) > 1  # the override's max_edits did not stay


def test_a_null_step_option_takes_the_allocator_default(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(300, seed=13)
    arrays = {"embeddings": embeddings, "lod": lod, "positions": positions}

    def answer(path: str, fields: dict[str, Any], sent: dict[str, Any]) -> httpx.Response:
        headers = {"content-type": FRAME, "accept": "application/json"}
        return live.http.post(path, content=frame.pack(fields, sent), headers=headers)

    created = answer("/v1/sessions", {"options": {"w_max": 280, "max_edits": 1}}, arrays)
    sid = created.json()["session_id"]
    assert created.status_code == 201 and len(created.json()["edits"]) == 1
    step = f"/v1/sessions/{sid}/focus"
    kept = answer(step, {"version": 1, "applied": []}, {})
    assert kept.status_code == 200 and len(kept.json()["edits"]) == 1  # omitted: the session's
    reset = answer(step, {"version": 2, "applied": [], "options": {"max_edits": None}}, {})
    stateless = answer("/v1/focus", {"options": {"w_max": 280}}, arrays)
    assert reset.status_code == 200 and reset.json()["edits"] == stateless.json()["edits"]
    assert len(reset.json()["edits"]) > 1
    no_budget = post_step(live, sid, {"version": 3, "applied": [99], "options": {"w_max": None}}, {})
    assert no_budget.status_code == 422 and no_budget.json()["field"] == "options.w_max"  # before the delta's check
    stale = post_step(live, sid, {"version": 1, "applied": []}, {})
    assert stale.status_code == 409 and (stale.json()["got"], stale.json()["expected"]) == ("1", "3")


def test_a_failed_re_creation_after_a_409_leaves_a_session_that_recovers(live: LiveService) -> None:
    """The 409's old session is deleted first; if the re-creation then fails, the client still
    knows its session, and the next step (a 404 now) re-creates it."""
    embeddings, lod, positions = snapshot(128, seed=14)
    copies = [np.full_like(embeddings, np.nan), embeddings]  # the first re-creation is refused (422)
    with FocusClient(live.url) as client, FocusSession(client, w_max=128, snapshot=lambda: copies.pop(0)) as s:
        s.open(embeddings, lod, positions)
        sid = s.state.session_id
        assert post_step(live, sid, {"version": 1, "applied": []}, {}).status_code == 200  # the client is stale
        with pytest.raises(FocusError) as error:
            s.step(applied=[])
        assert error.value.status == 422 and s.state.session_id == sid
        assert live.http.get(f"/v1/sessions/{sid}").status_code == 404  # deleted all the same
        again = s.step(applied=[])
        assert again.version == 1 and again.session_id != sid and s.resyncs == 2


def test_client_without_a_snapshot_surfaces_the_404(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(64, seed=8)
    with FocusClient(live.url) as client, FocusSession(client, w_max=64) as session:
        session.open(embeddings, lod, positions)
        live.http.delete(f"/v1/sessions/{session.state.session_id}")
        with pytest.raises(FocusError) as error:
            session.step(applied=[])
        assert error.value.status == 404 and session.state.version == 1


def test_async_session_steps_and_recovers(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(128, seed=9)

    async def run() -> tuple[int, int, int]:
        async with AsyncFocusClient(live.url) as client, AsyncFocusSession(client, w_max=120) as session:
            result = await session.open(embeddings, lod, positions)
            result = await session.step(created=created_for(result), applied=None)
            sid = session.state.session_id
            assert post_step(live, sid, {"version": 2, "applied": []}, {}).status_code == 200  # now stale here
            again = await session.step(applied=[], embeddings=np.zeros((session.lod.size, D), np.float16))
            assert again.version == 1 and again.session_id != sid  # re-created after the 409…
            return result.version or 0, session.resyncs, live.http.get(f"/v1/sessions/{sid}").status_code

    assert asyncio.run(run()) == (2, 1, 404)  # …and the old one deleted


def test_steps_and_sessions_are_counted(live: LiveService) -> None:
    before = live.metrics()
    embeddings, lod, positions = snapshot(100, seed=10)
    with FocusClient(live.url) as client, FocusSession(client, w_max=100) as session:
        result = session.open(embeddings, lod, positions)
        for _ in range(3):
            result = session.step(created=created_for(result), applied=None)
        sid = session.state.session_id
        await_placements(live)  # the last answer's too: the bytes held are settled
        info = live.http.get(f"/v1/sessions/{sid}").json()
        assert info["placed"]  # so the rows set aside are in both figures compared below
        held = info["bytes"]
        during = live.metrics()
    after = live.metrics()
    assert during["lensnet_sessions_created_total"] - before.get("lensnet_sessions_created_total", 0) == 1
    assert during["lensnet_session_steps_total"] - before.get("lensnet_session_steps_total", 0) == 3
    assert during["lensnet_sessions_active"] - after["lensnet_sessions_active"] == 1  # closed: deleted
    assert during["lensnet_session_bytes"] - after["lensnet_session_bytes"] == held
    key = 'lensnet_request_duration_seconds_count{endpoint="/v1/sessions/{id}/focus",status="200"}'
    assert during[key] - before.get(key, 0) == 3


def test_bounds_evict_least_recently_used_and_refuse_what_never_fits() -> None:
    service = LiveService("--max-sessions", "3", "--session-memory-bytes", str(1 << 20), "--session-ttl-s", "2")
    service.wait_ready()
    try:
        with FocusClient(service.url) as client:
            small = [FocusSession(client, w_max=64) for _ in range(4)]
            for i, session in enumerate(small):
                session.open(*snapshot(64, seed=i))
            samples = service.metrics()
            assert samples['lensnet_session_evictions_total{reason="count"}'] == 1
            assert samples["lensnet_sessions_active"] == 3
            assert service.http.get(f"/v1/sessions/{small[0].state.session_id}").status_code == 404
            big = FocusSession(client, w_max=1000)
            big.open(*snapshot(1000, seed=9))  # ~1 MB: every other session goes to make room
            samples = service.metrics()
            assert samples['lensnet_session_evictions_total{reason="memory"}'] == 3
            assert samples["lensnet_sessions_active"] == 1 and samples["lensnet_session_bytes"] <= 1 << 20
            with pytest.raises(FocusError) as error:
                FocusSession(client, w_max=1100).open(*snapshot(1100, seed=9))
            assert error.value.status == 413 and error.value.field == "session"
            broken = snapshot(600, seed=9)  # would fit only once `big` went, and is refused: `big` stays
            broken[0][5, 0] = np.nan
            with pytest.raises(FocusError) as error:
                FocusSession(client, w_max=600).open(*broken)
            assert error.value.status == 422
            samples = service.metrics()
            assert samples['lensnet_session_evictions_total{reason="memory"}'] == 3
            assert samples["lensnet_sessions_active"] == 1
            time.sleep(1.0)
            assert service.http.get(f"/v1/sessions/{big.state.session_id}").status_code == 200  # a look, not a use
            # No session call from here: the idle session expires, and the gauges follow.
            wait_for_metric(service, 'lensnet_session_evictions_total{reason="ttl"}', 1, timeout=10)
            samples = service.metrics()
            assert samples["lensnet_sessions_active"] == 0 and samples["lensnet_session_bytes"] == 0
    finally:
        assert service.stop() == 0


def placed_and_plain(service: LiveService, client: FocusClient) -> tuple[FocusSession, int, FocusSession]:
    """Two sessions on `service`: one whose rows are placed (and the bytes its placement set aside),
    then one with no edits (nothing to place)."""
    placed = FocusSession(client, w_max=290)
    first = placed.open(*snapshot(300, seed=4))
    await_placements(service)
    assert service.http.get(f"/v1/sessions/{placed.state.session_id}").json()["placed"]
    plain = FocusSession(client, w_max=600, tau_expand=1.0, tau_collapse=1.0)  # scores never reach ±1
    assert not plain.open(*snapshot(600, seed=9)).edits
    row = np.dtype(service.http.get("/v1/model").json()["input_dtype"]).itemsize * D  # the graph's dtype
    return placed, sum(edit.removed for edit in first.edits) * row, plain


def test_a_creation_that_needs_room_undoes_a_placement_instead_of_evicting() -> None:
    """Rows set aside by a placement are a cache: a creation that needs their bytes undoes the
    placement (counted) rather than evict a session."""
    sizes = LiveService().wait_ready()  # the same sessions without a tight bound: their sizes
    try:
        with FocusClient(sizes.url) as client:
            placed, aside, plain = placed_and_plain(sizes, client)
            held = [sizes.http.get(f"/v1/sessions/{s.state.session_id}").json()["bytes"] for s in (placed, plain)]
    finally:
        assert sizes.stop() == 0
    bound = sum(held) - aside // 2  # both fit only once the placement is undone
    service = LiveService("--session-memory-bytes", str(bound)).wait_ready()
    try:
        with FocusClient(service.url) as client:
            placed, _, plain = placed_and_plain(service, client)
            m = await_placements(service)
            assert m["lensnet_session_placements_undone_total"] == 1 and m["lensnet_sessions_active"] == 2
            assert sum(m[f'lensnet_session_evictions_total{{reason="{r}"}}'] for r in ("count", "memory", "ttl")) == 0
            info = service.http.get(f"/v1/sessions/{placed.state.session_id}").json()
            assert not info["placed"] and info["bytes"] == held[0] - aside
            assert m["lensnet_session_bytes"] == held[1] + held[0] - aside <= bound
    finally:
        assert service.stop() == 0


def test_several_workers_on_one_port_never_answer_wrong() -> None:
    """A session lives in one worker. Over one keep-alive connection every call reaches it; with a
    new connection per call, calls land on either worker: 404s are answered by re-creating the
    session, and every answer still equals /v1/focus for the caller's WC."""
    service = LiveService("--workers", "2").wait_ready()
    try:
        embeddings, lod, positions = snapshot(200, seed=11)
        fresh = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
        with FocusClient(service.url) as sticky, FocusClient(service.url, transport=fresh) as hopping:
            for client, label in ((sticky, "keep-alive"), (hopping, "new connections")):
                wc = {"embeddings": embeddings}
                history = History()
                session = FocusSession(client, w_max=190, snapshot=lambda wc=wc: wc["embeddings"])  # type: ignore[misc]
                result = session.open(embeddings, lod, positions)
                for step in range(8):
                    created = created_for(result, step)
                    append = tail_append(session.lod, session.positions, 4, step)
                    wc["embeddings"] = np.concatenate(
                        [edit_rows(wc["embeddings"], result.edits, created), append["append_embeddings"]]
                    )
                    history.record(result.edits)
                    result = session.step(created=created, **append, return_scores=True)
                    stateless = sticky.focus(wc["embeddings"], session.lod, session.positions, w_max=190,
                                             history=history, return_scores=True)  # fmt: skip
                    assert result.edits == stateless.edits, label
                    assert np.array_equal(result.scores, stateless.scores), label
                if client is sticky:
                    assert session.resyncs == 0  # one connection, one worker: no ping-pong
    finally:
        assert service.stop() == 0


def test_a_look_at_a_session_is_not_a_use(live: LiveService) -> None:
    """GET reports how long the session has been idle, and reading it does not reset that."""
    embeddings, lod, positions = snapshot(64, seed=15)
    with FocusClient(live.url) as client, FocusSession(client, w_max=64) as session:
        session.open(embeddings, lod, positions)
        time.sleep(0.3)
        path = f"/v1/sessions/{session.state.session_id}"
        first, second = live.http.get(path).json(), live.http.get(path).json()
        assert first["idle_s"] >= 0.3 and second["idle_s"] >= first["idle_s"]


def test_the_client_keeps_the_history_the_service_keeps(live: LiveService) -> None:
    """Past 16 steps (the stateless History's default horizon) the session client still holds every
    entry the service holds for cooldown, so a re-creation would carry all of them."""
    embeddings, lod, positions = snapshot(256, seed=16)
    with FocusClient(live.url) as client, FocusSession(client, w_max=200, tau_expand=0.05) as session:
        result = session.open(embeddings, lod, positions)
        for step in range(24):
            append = tail_append(session.lod, session.positions, 4, step)
            result = session.step(created=created_for(result, step), **append)
        held = live.http.get(f"/v1/sessions/{session.state.session_id}").json()["history_entries"]
        entries = session.state.history.entries()
    assert max(entry["age"] for entry in entries) > 16 and len(entries) == held


def test_the_memory_bound_counts_the_edits_an_answer_may_keep() -> None:
    """A session's answer keeps up to max_edits edits (EDIT_BYTES each): a creation or a step that
    would only fit without them is refused (413), the same WC with few edits is not."""
    service = LiveService("--session-memory-bytes", str(1 << 20)).wait_ready()
    try:
        with FocusClient(service.url) as client:
            wc = snapshot(850, seed=17)  # ~0.86 MB of fp32 rows and metadata: fits, but not with 1,024 edits' room
            with pytest.raises(FocusError) as error:
                FocusSession(client, w_max=850, max_edits=1024).open(*wc)
            assert error.value.status == 413 and error.value.field == "session"
            session = FocusSession(client, w_max=850, max_edits=8)
            session.open(*wc)
            with pytest.raises(FocusError) as error:
                session.step(applied=[], max_edits=1024)
            assert error.value.status == 413 and error.value.field == "session"
            assert session.step(applied=[]).version == 2
    finally:
        assert service.stop() == 0


def test_the_idle_sweep_outlives_a_failing_expiry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure inside one sweep (a metrics callback's bug) is logged, and the sweeps go on."""
    from service.http import app

    class Store:
        ttl_s, sweeps = 0.0, 0

        def sweep(self) -> None:
            self.sweeps += 1
            if self.sweeps == 1:
                raise RuntimeError("a failing gauge")

    monkeypatch.setattr(app, "SWEEP_MIN_S", 0.01)
    store = Store()

    async def run() -> None:
        task = asyncio.create_task(app._sweep(store))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(run())
    assert store.sweeps >= 3 and "expiring idle sessions failed" in caplog.text
