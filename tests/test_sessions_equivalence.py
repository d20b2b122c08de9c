"""The sessions' core promise, over real HTTP and the real ONNX session: a session step answers
exactly what /v1/focus answers for the same resulting WC and the equivalent history, over random
sequences of steps (applied subsets of edits, head trims, appends, option overrides)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensnet_client import Edit, FocusClient, FocusResult, FocusSession, History, apply_edits, edit_rows

from .live import LiveService, snapshot

D, B = 256, 32


@pytest.fixture(scope="module")
def client() -> Iterator[FocusClient]:
    service = LiveService("--max-entries", "1024").wait_ready()
    with FocusClient(service.url, timeout=60) as focus_client:
        yield focus_client
    assert service.stop() == 0


class Reference:
    """The caller's own copy of the WC (embeddings included), edited with numpy only."""

    def __init__(self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> None:
        self.embeddings, self.lod, self.positions = embeddings, lod, positions

    def step(
        self, edits: list[Edit], created: np.ndarray, trim: int, rows: np.ndarray, lod: np.ndarray, pos: np.ndarray
    ) -> None:
        new_lod, new_pos = apply_edits(self.lod, self.positions, edits, B)
        self.embeddings = np.concatenate([edit_rows(self.embeddings, edits, created), rows])[trim:]
        self.lod = np.concatenate([new_lod[trim:], lod])
        self.positions = np.concatenate([new_pos[trim:], pos])


def assert_same_answer(session: FocusResult, stateless: FocusResult) -> None:
    assert session.edits == stateless.edits
    assert session.counters == stateless.counters
    assert (session.length_before, session.length_after) == (stateless.length_before, stateless.length_after)
    assert (session.budget_met, session.budget_note) == (stateless.budget_met, stateless.budget_note)
    assert session.scores is not None and stateless.scores is not None
    assert np.array_equal(session.scores, stateless.scores)


step_plans = st.lists(
    st.fixed_dictionaries(
        {
            "subset": st.one_of(st.none(), st.lists(st.integers(0, 15), max_size=8, unique=True)),
            "trim": st.integers(0, 40),
            "append": st.integers(0, 40),
            "w_max": st.one_of(st.none(), st.integers(60, 500)),
        }
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(40, 400),
    seed=st.integers(0, 2**16),
    w_max=st.integers(60, 450),
    cooldown=st.integers(0, 3),
    protect=st.sampled_from([0, 64]),
    plans=step_plans,
)
def test_session_steps_answer_like_stateless_focus(
    client: FocusClient, n: int, seed: int, w_max: int, cooldown: int, protect: int, plans: list[dict[str, Any]]
) -> None:
    rng = np.random.default_rng(seed)
    reference = Reference(*snapshot(n, seed=seed))
    options = {"max_edits": 8, "cooldown_steps": cooldown, "protect_recent": protect, "tau_expand": 0.3}
    history = History()
    with FocusSession(client, w_max=w_max, **options) as session:
        result = session.open(reference.embeddings, reference.lod, reference.positions, return_scores=True)
        stateless = client.focus(*vars(reference).values(), w_max=w_max, history=history, return_scores=True, **options)
        assert_same_answer(result, stateless)
        for plan in plans:
            edits = result.edits
            applied = None if plan["subset"] is None else sorted(i for i in plan["subset"] if i < len(edits))
            chosen = [edits[i] for i in (range(len(edits)) if applied is None else applied)]
            created = rng.standard_normal((sum(e.added for e in chosen), D)).astype(np.float16)
            k = plan["append"]
            end = int(reference.positions[-1]) + B ** int(reference.lod[-1])
            rows = rng.standard_normal((k, D)).astype(np.float16)
            lod, pos = np.zeros(k, np.int64), np.arange(end, end + k, dtype=np.int64)
            kept = reference.lod.size + sum(e.added - e.removed for e in chosen)
            trim = min(plan["trim"], kept - 1)
            step_w_max = plan["w_max"] or w_max
            result = session.step(
                created=created, append_embeddings=rows, append_lod=lod, append_positions=pos, applied=applied,
                trim_head=trim, return_scores=True, w_max=step_w_max,
            )  # fmt: skip
            reference.step(chosen, created, trim, rows, lod, pos)
            history.record(chosen)
            assert np.array_equal(session.lod, reference.lod) and np.array_equal(session.positions, reference.positions)
            stateless = client.focus(
                *vars(reference).values(), w_max=step_w_max, history=history, return_scores=True, **options
            )
            assert_same_answer(result, stateless)
        assert session.resyncs == 0  # every step was a delta
