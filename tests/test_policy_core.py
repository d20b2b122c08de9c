"""The pure policy-health pieces: exact rolling correlations and the bounded decision memory."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from pydantic import ValidationError
from scipy import stats

from lensnet_client.layout import Edit
from service.core.correlation import PolicyCorrelation, RollingWindow, average_ranks, benefit, pearson, spearman
from service.core.decisions import CAUSES, RESULTS, DecisionMemory, Matched
from service.metrics import DELTA_NLL_EDGES, Metrics
from service.policy import EDIT_CAP, FeedbackBody


def edits(*specs: tuple[str, int, float, str]) -> tuple[Edit, ...]:
    """Edits as the allocator returns them: (action, LOD acted on, driving score, cause)."""
    made = []
    for k, (action, lod, score, cause) in enumerate(specs):
        expand = action == "expand"
        made.append(Edit(action, k * 32, 1 if expand else 32, 32 if expand else 1, lod, lod - 1 if expand else lod + 1,
                         k * 1024, 32**lod, score, cause))  # fmt: skip
    return tuple(made)


def match(memory: DecisionMemory, pairs: list[tuple[str, int]], now: float) -> tuple[list[str], Matched]:
    """`DecisionMemory.match` on (decision_id, edit) pairs, its result codes as names."""
    codes, matched = memory.match([d for d, _ in pairs], np.array([e for _, e in pairs], dtype=np.int64), now)
    return [RESULTS[c] for c in codes], matched


# --- correlations -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0.8, -0.8, 0.05])
def test_correlations_match_numpy_and_scipy(k: float) -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 5000)
    y = k * x + rng.normal(0, 0.3, x.size)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.copysign(1, spearman(x, y)) == math.copysign(1, k)


def test_ranks_and_spearman_with_ties_match_scipy() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 7, 400).astype(float)  # heavy ties, as float32 block scores give
    y = np.round(x * 0.5 + rng.normal(0, 1, x.size), 1)
    np.testing.assert_array_equal(average_ranks(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_undefined_correlations_are_nan() -> None:
    assert math.isnan(pearson(np.array([0.3]), np.array([1.0])))
    assert math.isnan(pearson(np.ones(10), np.arange(10.0)))
    assert math.isnan(spearman(np.arange(10.0), np.full(10, 2.0)))


def test_count_window_keeps_the_newest_samples_in_order() -> None:
    window = RollingWindow(5)
    window.add(np.arange(3.0), -np.arange(3.0), now=0)
    window.add(np.arange(3.0, 7.0), -np.arange(3.0, 7.0), now=1)
    x, y = window.samples(now=1e9)  # no age limit
    np.testing.assert_array_equal(x, [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(y, -x)
    window.add(np.arange(10.0, 20.0), np.zeros(10), now=2)  # a batch larger than the window
    np.testing.assert_array_equal(window.samples(2)[0], [15, 16, 17, 18, 19])


def test_time_window_forgets_old_samples_and_stays_bounded() -> None:
    window = RollingWindow(4, max_age_s=10)
    window.add(np.array([1.0, 2.0]), np.zeros(2), now=0)
    window.add(np.array([3.0]), np.zeros(1), now=5)
    np.testing.assert_array_equal(window.samples(now=9)[0], [1, 2, 3])
    np.testing.assert_array_equal(window.samples(now=12)[0], [3])  # the first two are 12 s old
    assert window.samples(now=16)[0].size == 0
    window.add(np.arange(6.0), np.zeros(6), now=20)
    np.testing.assert_array_equal(window.samples(now=20)[0], [2, 3, 4, 5])  # capacity 4


def test_policy_windows_split_by_action_and_match_scipy_on_the_window() -> None:
    """y = k·x + noise fed in batches; every window's figures equal numpy/scipy on exactly its samples."""
    rng = np.random.default_rng(5)
    windows = PolicyCorrelation(count=300, seconds=50, time_capacity=10_000)
    xs, ys, expands, times = [], [], [], []
    for step in range(20):
        expand = rng.random(80) < 0.4
        x = rng.uniform(-1, 1, 80)
        delta = -np.where(expand, 1, -1) * (0.5 * x + rng.normal(0, 0.2, 80))  # benefit = 0.5 x + noise
        y = benefit(expand, delta)
        windows.add(expand, x, y, now=step * 10.0)
        for kept, value in zip((xs, ys, expands, times), (x, y, expand, np.full(80, step * 10.0)), strict=True):
            kept.append(value)
    x, y, expand, t = (np.concatenate(a) for a in (xs, ys, expands, times))
    now = 195.0
    for c in windows.compute(now):
        chosen = np.ones(x.size, bool) if c.action == "all" else expand == (c.action == "expand")
        xa, ya, ta = x[chosen], y[chosen], t[chosen]
        if c.window == "count":
            xa, ya = xa[-300:], ya[-300:]
        else:
            xa, ya = xa[ta > now - 50], ya[ta > now - 50]
        assert c.samples == xa.size > 50
        assert c.pearson == pytest.approx(stats.pearsonr(xa, ya).statistic, abs=1e-6)
        assert c.spearman == pytest.approx(stats.spearmanr(xa, ya).statistic, abs=1e-6)
        assert c.pearson > 0.5


def test_benefit_sign_per_action() -> None:
    """Expanding helped when NLL fell; collapsing lost something when NLL rose."""
    np.testing.assert_array_equal(benefit(np.array([True, False]), np.array([-0.2, 0.2])), [0.2, 0.2])


# --- the decision memory ------------------------------------------------------------------------


def test_decisions_match_each_edit_once_with_what_feedback_needs() -> None:
    memory = DecisionMemory(capacity=10, max_age_s=60, tag="abcd")
    made = edits(("expand", 2, 0.75, "threshold"), ("collapse", 0, -0.5, "budget"), ("collapse", 1, 0.25, "make_room"))
    first = memory.remember(made, now=0)
    empty = memory.remember((), now=0)
    assert first == "abcd-0" and empty == "abcd-1"
    results, matched = match(memory,
        [(first, 2), (first, 0), (first, 3), (first, 1 << 62), (empty, 0), (first, 0), ("abcd-2", 0), ("zzzz-0", 0),
         ("abcd-xyz", 0), ("", 0), ("abcd-00", 0), ("abcd- 1", 0), ("abcd-+1", 0), ("abcd-0_1", 0), ("abcd-0x0", 0),
         ("ABCD-0", 0), ("abcd-", 0)], now=1,
    )  # fmt: skip
    assert results == ["matched", "matched", "bad_index", "bad_index", "bad_index", "duplicate",
                       "unknown_decision", "unknown_decision", "unknown_decision", "unknown_decision",
                       "unknown_decision", "unknown_decision", "unknown_decision", "unknown_decision",
                       "unknown_decision", "unknown_decision", "unknown_decision"]  # fmt: skip
    np.testing.assert_array_equal(matched.item, [0, 1])
    np.testing.assert_array_equal(matched.expand, [False, True])
    np.testing.assert_array_equal(matched.lod, [1, 2])
    np.testing.assert_array_equal(matched.score, [0.25, 0.75])
    assert [CAUSES[c] for c in matched.cause] == ["make_room", "threshold"]
    assert match(memory, [(first, 1)], now=2)[0] == ["matched"]


def test_decisions_are_bounded_by_count_and_age() -> None:
    memory = DecisionMemory(capacity=3, max_age_s=10, tag="7")
    ids = [memory.remember(edits(("expand", 1, 0.9, "threshold")), now=float(k)) for k in range(5)]
    assert len(memory) == 3
    assert match(memory, [(i, 0) for i in ids], now=5)[0] == [
        "expired_decision", "expired_decision", "matched", "matched", "matched"
    ]  # fmt: skip
    late = memory.remember(edits(("expand", 1, 0.9, "threshold")), now=13.5)  # drops the decisions of t < 3.5
    assert len(memory) == 2 and match(memory, [(ids[3], 0), (late, 0)], now=13.5)[0] == ["expired_decision", "matched"]
    assert match(memory, [(late, 0)], now=30)[0] == ["expired_decision"] and len(memory) == 0


def test_a_pair_twice_in_one_batch_matches_once_the_first_time() -> None:
    memory = DecisionMemory(capacity=4, max_age_s=60, tag="1")
    made = memory.remember(edits(("expand", 1, 0.5, "threshold"), ("expand", 1, 0.6, "threshold")), now=0)
    results, matched = match(memory, [(made, 1), (made, 0), (made, 1), (made, 0)], now=0)
    assert results == ["matched", "matched", "duplicate", "duplicate"]
    np.testing.assert_array_equal(matched.item, [0, 1])
    np.testing.assert_array_equal(matched.score, np.float32([0.6, 0.5]))


@pytest.mark.parametrize("sizes", [[5000] + [1] * 9, [1] * 30 + [5000, 7000] + [2] * 40])
def test_edit_storage_grows_and_shrinks_and_keeps_every_held_decision_intact(sizes: list[int]) -> None:
    """Decisions of very different sizes through a small memory: the edit ring resizes (up past
    the largest decision held, back down once it is forgotten) and every held decision still
    answers with its own edits; the forgotten ones are expired."""
    memory = DecisionMemory(capacity=8, max_age_s=1e9, tag="2")
    rng = np.random.default_rng(7)
    made, slots = [], []
    for size in sizes:
        specs = [("expand" if rng.random() < 0.5 else "collapse", int(rng.integers(0, 3)),
                  float(np.float32(rng.uniform(-1, 1))), CAUSES[int(rng.integers(0, 3))])
                 for _ in range(size)]  # fmt: skip
        made.append((memory.remember(edits(*specs), now=0), specs))
        slots.append(memory._edits.mask + 1)
    assert max(slots) >= sum(sorted(sizes)[-2:])  # grown to hold the two largest at once
    for k, (decision, specs) in enumerate(made):
        results, matched = match(memory, [(decision, i) for i in range(len(specs))], now=0)
        if k < len(made) - 8:
            assert set(results) == {"expired_decision"}
            continue
        assert set(results) == {"matched"}
        assert matched.expand.tolist() == [a == "expand" for a, _, _, _ in specs]
        assert matched.lod.tolist() == [lod for _, lod, _, _ in specs]
        assert matched.score.tolist() == [score for _, _, score, _ in specs]
        assert [CAUSES[c] for c in matched.cause] == [cause for _, _, _, cause in specs]
    assert slots[-1] == 4096 < max(slots)  # back to the least once the large decisions are forgotten


# --- metrics ------------------------------------------------------------------------------------


def test_bulk_delta_nll_observation_matches_one_by_one_observe() -> None:
    rng = np.random.default_rng(6)
    metrics = Metrics(budget_s=0.003, max_lod=2)
    memory = DecisionMemory(1000, 60)
    specs = [(("expand", int(lod), 0.6, "threshold") if lod else ("collapse", 0, -0.6, "threshold"))
             for lod in rng.integers(0, 3, 600)]  # fmt: skip
    ids = [memory.remember(edits(spec), now=0) for spec in specs]
    results, matched = match(memory, [(i, 0) for i in ids], now=0)
    delta = rng.normal(0, 0.2, matched.item.size)
    metrics.observe_feedback({"matched": len(results)}, matched, delta)

    registry = CollectorRegistry()
    reference = Histogram("lensnet_feedback_delta_nll", "x", ["action", "lod"], buckets=DELTA_NLL_EDGES,
                          registry=registry)  # fmt: skip
    for value, expand, lod in zip(delta.tolist(), matched.expand.tolist(), matched.lod.tolist(), strict=True):
        reference.labels(action="expand" if expand else "collapse", lod=str(lod)).observe(value)

    def samples(text: bytes) -> dict[str, float]:
        lines = [line for line in text.decode().splitlines() if line.startswith("lensnet_feedback_delta_nll_")]
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines) if float(value)}

    assert samples(metrics.render()) == samples(generate_latest(registry))
    assert 'lensnet_feedback_items_total{result="matched"} 600.0' in metrics.render().decode()


# --- the feedback body --------------------------------------------------------------------------

ITEM = '{"decision_id": "ab-1f", "edit": 3, "delta_nll": -0.25}'
BODIES = [
    f'{{"items": [{ITEM}]}}', f'{{"items": [{ITEM}, {ITEM}, {ITEM}]}}', f' {{"items": [{ITEM}]}}\n',
    '{"items": [{"delta_nll": 1, "edit": 0, "decision_id": "x"}]}',  # key order, an int ΔNLL
    '{"items": [{"decision_id": "a", "decision_id": "b", "edit": 0, "delta_nll": 0.5}]}',  # the last one counts
    '{"items": [{"decision_id": "' + "a" * 64 + '", "edit": 100000000000000000000000, "delta_nll": 1e-300}]}',
    '{"items": [{"decision_id": "\\u00e9t\\u00e9", "edit": 1, "delta_nll": 2}]}',
    # invalid: each must raise the model's own error
    f'{{"items": [{ITEM}] * 6}}', '{"items": []}', f'{{"items": [{ITEM}], "more": 1}}', '[1]', '{"items": {}}',
    '{"items": [[1, 2, 3]]}', '{"items": [{"decision_id": "a", "edit": 0}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": 1, "x": 1}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "x": 1}]}',
    '{"items": [{"decision_id": 1, "edit": 0, "delta_nll": 1}]}',
    '{"items": [{"decision_id": "a", "edit": true, "delta_nll": 1}]}',
    '{"items": [{"decision_id": "a", "edit": 1.0, "delta_nll": 1}]}',
    '{"items": [{"decision_id": "a", "edit": -1, "delta_nll": 1}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": "1"}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": true}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": NaN}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": 1e999}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": 1' + "0" * 400 + "}]}",
    '{"items": [{"decision_id": "' + "a" * 65 + '", "edit": 0, "delta_nll": 1}]}',
    '{"items": [{"decision_id": "\\ud800", "edit": 0, "delta_nll": 1}]}', '{"items": [', "",
    # where a JSON parser's limits lie: 64-bit integers, float rounding, nesting depth
    *(f'{{"items": [{{"decision_id": "a", "edit": {edit}, "delta_nll": 1}}]}}'
      for edit in (2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, "-0", "0e0")),
    *(f'{{"items": [{{"decision_id": "a", "edit": 0, "delta_nll": {value}}}]}}'
      for value in ("2.2250738585072011e-308", "5e-324", "1.7976931348623157e308", "-0.0", "-0", "-0e0",
                    "9007199254740993", "0.1000000000000000055511151231257827", "1e-400", "-1E+2", 2**64,
                    -(2**63) - 1)),
    '{"items": [' + "[" * 2000 + "]" * 2000 + "]}",
    # the C reader's own edges: white space, escapes, raw bytes, number grammar, trailing bytes
    '\t{\r\n"items"\t:\n[ {"decision_id"\n:\t"a" ,"edit" : 7 , "delta_nll":-2.5E-3 } ]\n}\t',
    '{"items": [{"decision\\u005fid": "a", "edit": 0, "delta_nll": 1}]}',  # an escaped key
    *(f'{{"items": [{{"decision_id": "{raw}", "edit": 0, "delta_nll": 1}}]}}'
      for raw in ('a\\"b', "a\x7fb", "a\tb", "")),
    '{"items": [{"decision_id": "a", "edit": 0, "edit": 1, "delta_nll": 1}]}',
    # a repeated field in place of a missing one: three fields, but not the three the model needs
    '{"items": [{"decision_id": "a", "decision_id": "b", "edit": 0}]}',
    '{"items": [{"decision_id": "a", "edit": 0, "edit": 1}]}',
    '{"items": [{"delta_nll": 1, "edit": 0, "delta_nll": 2}]}',
    '{"items": [{"decision_id": "été", "edit": 0, "delta_nll": 1}]}',  # raw UTF-8, not an escape
    *(f'{{"items": [{{"decision_id": "a", "edit": {edit}, "delta_nll": 1}}]}}' for edit in ("01", "+1", "1e5")),
    *(f'{{"items": [{{"decision_id": "a", "edit": 0, "delta_nll": {value}}}]}}'
      for value in ("1.", ".5", "-", "1e", "0x10", "0." + "1" * 70)),
    *(f'{{"items": [{{"decision_id": "a", "edit": {edit}, "delta_nll": 1}}]}}'
      for edit in (10**17, 10**18 - 1, 10**18, 10**19, 2**62, 2**62 + 1)),
    *(f'{{"items": [{ITEM}{tail}' for tail in (",]}", "]} x", "]}{}", "]", "]}\x00", "], }")),
    '{"items": [{}]}', '{"items": [{"decision_id": "a", "edit": 0, "delta_nll": 1,}]}',
]  # fmt: skip


@pytest.mark.parametrize("text", [*BODIES, "\ufeff" + BODIES[0]])
def test_bulk_feedback_parser_accepts_exactly_what_the_model_accepts(text: str) -> None:
    """Every body parses to the model's own items, or raises the model's own first error."""
    assert_parsed_like_the_model(text)


def assert_parsed_like_the_model(text: str) -> None:
    body = FeedbackBody(max_items=5)
    raw = text.encode()
    try:
        items = body.model.model_validate_json(raw).items
    except ValidationError as expected:
        with pytest.raises(ValidationError) as raised:
            body.parse(raw)
        assert [(e["type"], e["loc"], e["msg"]) for e in raised.value.errors()] == [
            (e["type"], e["loc"], e["msg"]) for e in expected.errors()
        ]
        return
    batch = body.parse(raw)
    assert batch.decision_id == [item.decision_id for item in items]
    assert batch.edit.tolist() == [min(item.edit, EDIT_CAP) for item in items]
    # bit for bit: a -0 must come out as the model reads it (the integer 0, so +0.0)
    assert batch.delta_nll.tobytes() == np.array([item.delta_nll for item in items], dtype=np.float64).tobytes()


JSON_PIECES = st.sampled_from(
    ['{', '}', '[', ']', ',', ':', ' ', '\n', '"items"', '"decision_id"', '"edit"', '"delta_nll"', '"x"', '"ab-1f"',
     '"é"', '"\\u0041"', "0", "7", "-1", "1.5", "-0.25e-3", "1E400", "00", "true", "null", "NaN", "9" * 20]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.text("0123456789abcdef-", max_size=20), st.integers(-2, 2**64), st.floats()), max_size=7),
    st.lists(st.tuples(st.integers(0, 400), JSON_PIECES), max_size=3),
    st.integers(0, 2),
)
def test_bulk_feedback_parser_agrees_with_the_model_on_mutated_bodies(
    items: list[tuple[str, int, float]], edits: list[tuple[int, str]], spacing: int
) -> None:
    """Bodies written like a stack would (in three spacings), some with pieces of JSON spliced in:
    the parser's answer is the model's, item for item, or the model's own first error."""
    separators = [(",", ":"), (", ", ": "), (",\n  ", " :\t")][spacing]
    listed = [{"decision_id": d, "edit": e, "delta_nll": v} for d, e, v in items]
    text = json.dumps({"items": listed}, separators=separators)
    for at, piece in edits:
        at = at % (len(text) + 1)
        text = text[:at] + piece + text[at:]
    assert_parsed_like_the_model(text)


def test_bulk_feedback_parser_takes_the_usual_body_without_the_model() -> None:
    """A plain valid body never reaches the per-item model (the cost the bulk check exists to avoid)."""
    body = FeedbackBody(max_items=500)
    body.model = None  # type: ignore[assignment]
    raw = json.dumps({"items": [{"decision_id": f"ab-{k:x}", "edit": k % 7, "delta_nll": k / 3} for k in range(500)]})
    batch = body.parse(raw.encode())
    assert batch.decision_id[-1] == "ab-1f3" and batch.edit[-1] == 499 % 7 and batch.delta_nll[-1] == 499 / 3
