"""Session state without HTTP: in-place row splices and their undo, delta planning errors, the
server-side history, and the store's bounds (count, memory, idle TTL)."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lensnet_client import Edit, History, SnapshotError, edit_rows, frame, synthetic_layout
from lensnet_client.layout import apply_step
from service.core import codec, problems
from service.core.allocator import AllocatorOptions, HistoryItem, allocate, check_layout
from service.core.sessions import (
    APPEND_ROOM,
    EDIT_BYTES,
    HISTORY_ENTRY_BYTES,
    MAX_COOLDOWN_STEPS,
    Delta,
    DeltaError,
    Rows,
    Session,
    SessionStore,
    ages,
    held_bytes,
    place,
    plan,
    record,
    splice_layout,
    stage,
    stamped,
    step_growth,
    unplace,
)
from service.pipeline import Pipeline

D = 3


@st.composite
def splice_steps(draw: st.DrawFn) -> list[tuple[list[tuple[int, int, int]], int, int, bool]]:
    """Steps as (splices (index, removed, inserted), trim, appended, rolled back) over a WC whose length is tracked."""
    n = first = draw(st.integers(1, 40))
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        splices, cursor = [], 0
        for index in sorted(draw(st.lists(st.integers(0, n), max_size=4, unique=True))):
            if index < cursor:
                continue
            removed = draw(st.integers(0, min(3, n - index)))
            splices.append((index, removed, draw(st.integers(0, 4))))
            cursor = index + removed
        total = n + sum(inserted - removed for _, removed, inserted in splices)
        appended = draw(st.integers(0, 70))
        trim = draw(st.integers(0, total + appended)) if draw(st.booleans()) else 0
        undo = draw(st.booleans())
        steps.append((splices, trim, appended, undo))
        if not undo:
            n = total + appended - trim
    return [(first, 0, 0, False), *steps]  # type: ignore[list-item]


@settings(max_examples=300, deadline=None)
@given(splice_steps(), st.integers(0, 2**16))
def test_rows_splice_in_place_like_concatenate_and_undo_exactly(steps: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (n, *_), *steps = steps
    expected = rng.standard_normal((n, D)).astype(np.float32)
    rows = Rows(expected.copy())
    for splices, trim, appended, undo in steps:
        pieces, cursor, planned = [], 0, []
        for index, removed, inserted in splices:
            new = rng.standard_normal((inserted, D)).astype(np.float32)
            pieces += [expected[cursor:index], new]
            planned.append((index, removed, new))
            cursor = index + removed
        tail = rng.standard_normal((appended, D)).astype(np.float32)
        result = np.concatenate([*pieces, expected[cursor:], tail])[trim:]
        before = rows.array.copy()
        record_ = rows.stage(planned, trim, tail)
        assert np.array_equal(rows.array, result)
        if undo:
            record_.apply()
            assert np.array_equal(rows.array, before)
        else:
            expected = result
            rows.shrink()
            assert np.array_equal(rows.array, expected)


def test_rows_grow_by_half_and_keep_appends_amortised() -> None:
    rows = Rows(np.zeros((100, D), dtype=np.float32))
    assert rows.growth(100) == 0 and rows.growth(101) > 0
    copies = 0
    for _ in range(200):
        if rows.growth(rows.length + 16):
            copies += 1
        rows.stage([], 0, np.ones((16, D), dtype=np.float32))
    assert rows.length == 100 + 200 * 16
    assert copies <= 8  # capacity x1.5 each time: a handful of reallocations, not one per step
    assert rows.buffer.shape[0] < 2 * rows.length


def test_an_edit_moves_the_rows_on_its_shorter_side_when_the_buffer_has_room_there() -> None:
    rows = Rows(np.arange(200 * D, dtype=np.float32).reshape(200, D))
    rows.stage([], 0, np.ones((1, D), np.float32))  # one row more than it holds: reallocated, room on both sides
    expected = rows.array.copy()
    near_head = [(10, 1, np.ones((4, D), np.float32))]  # +3 rows at 10: the 10 head rows move, not the 190 after
    undo = rows.stage(near_head, 0, np.empty((0, D), np.float32))
    assert sum(count for _, _, count in undo.moves) == 10
    assert np.array_equal(rows.array, np.concatenate([expected[:10], np.ones((4, D), np.float32), expected[11:]]))
    undo.apply()
    assert np.array_equal(rows.array, expected)
    near_tail = [(191, 1, np.ones((4, D), np.float32))]
    assert sum(count for _, _, count in rows.stage(near_tail, 0, np.empty((0, D), np.float32)).moves) == 9


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 300), st.integers(0, 2**16), st.integers(0, 40), st.integers(0, 8))
def test_splice_layout_equals_apply_step_for_the_last_answers_edits(n: int, seed: int, trim: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    lod, positions = synthetic_layout(n, 4, 2, rng)
    layout = check_layout(lod, positions, 4, 2)
    options = AllocatorOptions(4, 2, w_max=int(rng.integers(1, 2 * n)), tau_expand=0.2, tau_collapse=0.2)
    edits = allocate(layout, rng.uniform(-1, 1, n).astype(np.float32), options).edits
    applied = sorted(rng.choice(len(edits), int(rng.integers(0, len(edits) + 1)), replace=False).tolist())
    chosen = [edits[i] for i in applied]
    trim = min(trim, n + sum(e.added - e.removed for e in chosen))
    end = int(positions[-1]) + 4 ** int(lod[-1])
    tail_lod, tail_positions = np.zeros(k, np.int32), np.arange(end, end + k, dtype=np.uint32)
    expected = apply_step(lod, positions, edits, applied, trim, tail_lod, tail_positions, 4)
    got = splice_layout(layout, chosen, trim, tail_lod, tail_positions)
    assert all(a.dtype == np.int64 and np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def session_with(n: int, edits: tuple[Edit, ...] = (), seed: int = 0) -> Session:
    rng = np.random.default_rng(seed)
    lod, positions = synthetic_layout(n, 4, 2, rng)
    rows = rng.standard_normal((n, D)).astype(np.float32)
    return Session("s", Rows(rows), check_layout(lod, positions, 4, 2), {"w_max": n}, (), edits)


def delta(**parts: object) -> Delta:
    values: dict = {"applied": None, "created": np.empty((0, D), np.float32), "trim_head": 0,
                    "append_embeddings": np.empty((0, D), np.float32), "append_lod": np.empty(0, np.int64),
                    "append_positions": np.empty(0, np.int64)}  # fmt: skip
    return Delta(**(values | parts))


def test_a_delta_that_breaks_the_layout_names_the_rule_and_index_in_the_resulting_wc() -> None:
    session = session_with(20)
    end = int(session.layout.positions[-1]) + 4 ** int(session.layout.lod[-1])
    with pytest.raises(SnapshotError) as error:
        plan(session, delta(append_embeddings=np.zeros((2, D), np.float32), append_lod=np.array([0, 0]),
                            append_positions=np.array([end, end + 2])), D)  # fmt: skip
    assert (error.value.rule, error.value.index) == ("contiguity", 21)


def test_delta_errors_for_rows_indices_and_trim() -> None:
    session = session_with(20)
    with pytest.raises(SnapshotError, match="applied"):
        plan(session, delta(applied=[0]), D)  # no edits in the last answer
    with pytest.raises(SnapshotError, match="trim_head"):
        plan(session, delta(trim_head=21), D)
    with pytest.raises(DeltaError, match=r"created.shape"):
        plan(session, delta(created=np.zeros((1, D), np.float32)), D)
    bad = np.zeros((2, D), np.float32)
    bad[1, 2] = np.inf
    end = int(session.layout.positions[-1]) + 4 ** int(session.layout.lod[-1])
    with pytest.raises(DeltaError) as error:
        plan(session, delta(append_embeddings=bad, append_lod=np.array([0, 0]),
                            append_positions=np.array([end, end + 1])), D)  # fmt: skip
    assert (error.value.field, error.value.index) == ("append_embeddings[1]", 1)


def test_a_staged_step_rolls_back_to_the_exact_session() -> None:
    lod, positions = synthetic_layout(20, 4, 2, np.random.default_rng(0))
    level1 = int(np.flatnonzero(lod == 1)[0])
    expand = Edit("expand", level1, 1, 4, 1, 0, int(positions[level1]), 4, 0.9, "threshold")
    session = session_with(20, (expand,))
    before = (session.rows.array.copy(), session.layout, session.history, session.version)
    created = np.ones((4, D), np.float32)
    step = stage(session, delta(created=created, trim_head=2), plan(session, delta(created=created, trim_head=2), D))
    assert session.rows.length == 21
    step.rollback()
    assert np.array_equal(session.rows.array, before[0])
    assert (session.layout, session.history, session.version) == before[1:]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**16), st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.integers(0, 6)),
       min_size=1, max_size=12))  # fmt: skip
def test_rows_placed_between_steps_give_every_step_the_same_wc(seed: int, steps: list) -> None:
    """Whether the rows were placed for the last answer's edits or not, a step applying all of them,
    a subset, or failing (rolled back) leaves exactly the rows a caller's own copy has."""
    rng = np.random.default_rng(seed)
    session = session_with(int(rng.integers(8, 120)), seed=seed)
    expected, placements = session.rows.array.copy(), 0
    for placed, subset, fails, appended in steps:
        options = AllocatorOptions(4, 2, w_max=int(rng.integers(1, 2 * session.layout.lod.size)), tau_expand=0.1,
                                   tau_collapse=0.1)  # fmt: skip
        session.edits = allocate(session.layout, rng.uniform(-1, 1, session.layout.lod.size).astype(np.float32),
                                 options).edits  # fmt: skip
        spare_after = 0  # rows free after the WC once placed
        if placed:
            length = session.rows.length + sum(edit.added - edit.removed for edit in session.edits)
            # The buffer grows first when it would not keep APPEND_ROOM rows free (a new session's keeps none);
            # refused, the placement asks for the set-aside rows alone when the rows fit the buffer as it is.
            growth = session.rows.growth(length + APPEND_ROOM)
            aside = sum(edit.removed for edit in session.edits) * D * 4
            free = int(rng.choice([growth + aside - 1, growth + aside, aside - 1, aside, 1 << 30]))
            asked: list[int] = []
            held = session.nbytes
            whole = growth + aside <= free
            retry = not whole and growth > 0 and session.rows.growth(length) == 0
            fits = bool(session.edits) and (whole or (retry and aside <= free))
            outcome = place(session, lambda nbytes, asked=asked, free=free: asked.append(nbytes) or (  # type: ignore[misc]
                None if nbytes <= free else "memory"))  # fmt: skip
            assert (outcome == "placed") is fits and (session.placed is not None) is fits
            assert asked == ([growth + aside] + [aside] * retry if session.edits else [])  # reserved before the move
            taken = growth + aside if whole else aside
            assert session.nbytes == held + (taken if fits else 0)  # the growth and the rows set aside are counted
            rows = session.rows
            spare_after = rows.buffer.shape[0] - rows.start - rows.length
            if fits:  # room for the next appends after the WC, as far as the buffer allows
                assert spare_after >= min(APPEND_ROOM, rows.buffer.shape[0] - rows.length)
            placements += fits
        chosen = sorted(rng.choice(len(session.edits), int(rng.integers(0, len(session.edits) + 1)),
                                   replace=False).tolist()) if subset else None  # fmt: skip
        applied = [session.edits[i] for i in (range(len(session.edits)) if chosen is None else chosen)]
        created = rng.standard_normal((sum(edit.added for edit in applied), D)).astype(np.float32)
        end = int(session.layout.positions[-1]) + 4 ** int(session.layout.lod[-1])
        tail = rng.standard_normal((appended, D)).astype(np.float32)
        step_delta = delta(
            applied=chosen,
            created=created,
            append_embeddings=tail,
            append_lod=np.zeros(appended, np.int64),
            append_positions=np.arange(end, end + appended),
        )
        step = stage(session, step_delta, plan(session, step_delta, D))
        result = np.concatenate([edit_rows(expected, applied, created), tail])
        assert np.array_equal(step.embeddings, result)
        if session.edits and chosen is None and step.placed is not None and appended <= spare_after:
            assert not step.undo.moves  # a placed step applying every edit moves no row
        if fails:
            step.rollback()
            assert np.array_equal(session.rows.array, expected)
        else:
            step.commit(())
            expected = result
        assert session.placed is None  # a step uses its placement or undoes it
    event("placed", payload=placements > 0)


def test_a_placed_step_that_fails_while_staging_leaves_the_session_as_it_was() -> None:
    """No memory for the appended rows' new buffer (say) after the rows were placed: the session is
    back to its rows before the placement, and the same step then applies once, not twice."""
    session = session_with(40, seed=3)
    rng = np.random.default_rng(3)
    options = AllocatorOptions(4, 2, w_max=80, tau_expand=0.1, tau_collapse=0.1)
    session.rows.stage([], 0, rng.standard_normal((30, D)).astype(np.float32))  # room to place in
    session.layout = check_layout(*synthetic_layout(70, 4, 2, np.random.default_rng(3)), 4, 2)
    session.edits = allocate(session.layout, rng.uniform(-1, 1, 70).astype(np.float32), options).edits
    expected_rows = session.rows.array.copy()
    assert session.edits and place(session, lambda nbytes: None) == "placed"
    created = rng.standard_normal((sum(edit.added for edit in session.edits), D)).astype(np.float32)
    grown = session.rows.buffer.shape[0] + 1  # appends past the buffer: a new one is needed
    tail = rng.standard_normal((grown, D)).astype(np.float32)
    end = int(session.layout.positions[-1]) + 4 ** int(session.layout.lod[-1])
    step_delta = delta(created=created, append_embeddings=tail, append_lod=np.zeros(grown, np.int64),
                       append_positions=np.arange(end, end + grown))  # fmt: skip
    planned = plan(session, step_delta, D)

    def no_memory(*_: object) -> None:
        raise MemoryError

    session.rows._reallocate = no_memory  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        stage(session, step_delta, planned)
    del session.rows._reallocate
    assert session.placed is None and np.array_equal(session.rows.array, expected_rows)
    step = stage(session, step_delta, plan(session, step_delta, D))
    assert np.array_equal(step.embeddings, np.concatenate([edit_rows(expected_rows, session.edits, created), tail]))


def test_server_history_matches_the_client_history() -> None:
    start = [HistoryItem("expand", 1, 64, 2), HistoryItem("collapse", 2, 0, 1)]
    client, server = History(horizon=5000), stamped(start)
    client._entries = [{"action": h.action, "lod": h.lod, "position": h.position, "age": h.age} for h in start[::-1]]
    rng = np.random.default_rng(1)
    for version in range(2, 40):
        edits = [Edit("collapse", 0, 4, 1, 0, 1, int(p) * 4, 4, -0.9, "threshold") for p in rng.integers(0, 99, 3)]
        client.record(edits)
        server = record(server, edits, version)
        assert [HistoryItem(**entry) for entry in client.entries()] == ages(server, version, 5000)
    assert ages(server, 39, 2) == [HistoryItem(**entry) for entry in client.entries()[:6]]  # the cooldown window


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_evicts_least_recently_used_beyond_count_memory_and_ttl() -> None:
    evicted: list[str] = []
    changes: list[tuple[int, int]] = []
    clock = Clock()
    store = SessionStore(3, 10_000, 60.0, on_evict=evicted.append, clock=clock,
                         on_change=lambda count, nbytes: changes.append((count, nbytes)))  # fmt: skip
    sessions = [session_with(20, seed=i) for i in range(5)]
    for i, session in enumerate(sessions[:3]):
        session.id = f"s{i}"
        store.add(session)
    assert store.get("s0") is sessions[0]  # s0 is now the most recently used
    sessions[3].id = "s3"
    store.add(sessions[3])
    assert evicted == ["count"] and store.get("s1") is None and len(store) == 3
    per = sessions[0].nbytes
    assert store.bytes == 3 * per
    assert changes[-1] == (3, 3 * per)
    store.memory_bytes = 3 * per - 1
    assert store.fits(sessions[0], 0) and len(store) == 3  # it could fit, but a check evicts nothing…
    store.update(sessions[0])  # …the call that succeeded does: the least recently used other one goes
    assert evicted == ["count", "memory"] and store.get("s2") is None and store.bytes == 2 * per
    assert changes[-1] == (2, 2 * per)
    assert not store.fits(None, store.memory_bytes + 1)  # could never fit
    assert len(store) == 2
    clock.now = 30.0
    assert store.peek("s3") is sessions[3]  # a look, not a use: s3 still expires at 60
    clock.now = 61.0
    store.sweep()  # no call needed to expire them
    assert evicted == ["count", "memory", "ttl", "ttl"] and store.get("s0") is None
    assert store.bytes == 0 and len(store) == 0 and changes[-1] == (0, 0)
    assert not store.remove("s3")


def placeable(seed: int) -> Session:
    """A session whose rows can be placed: a buffer with room, and edits that collapse (set rows aside)."""
    session = session_with(40, seed=seed)
    rng = np.random.default_rng(seed)
    session.rows.stage([], 0, np.zeros((30, D), np.float32))  # room beyond the 40 rows…
    session.rows.length = 40  # …that are not part of the WC
    session.edits = allocate(session.layout, rng.uniform(-1, 1, 40).astype(np.float32),
                             AllocatorOptions(4, 2, w_max=30, tau_expand=0.1, tau_collapse=0.1)).edits  # fmt: skip
    assert any(edit.removed for edit in session.edits)
    return session


def test_a_placement_reserves_free_bytes_and_never_evicts() -> None:
    """`reserve` accounts the set-aside rows' bytes up front, or refuses them (memory, gone), evicting nothing."""
    evicted: list[str] = []
    store = SessionStore(10, 10**9, 60.0, on_evict=evicted.append)
    a, b = placeable(1), placeable(2)
    a.id, b.id = "a", "b"
    store.add(a)
    store.add(b)
    asked: list[int] = []
    assert place(a, lambda nbytes: asked.append(nbytes) or "memory") == "memory"  # type: ignore[func-returns-value]
    assert asked[0] >= sum(edit.removed for edit in a.edits) * D * 4  # at least the rows set aside
    store.memory_bytes = store.bytes + asked[0] - 1  # one byte short of the free bytes it needs
    before = a.rows.array.copy()
    assert place(a, lambda nbytes: store.reserve(a, nbytes)) == "memory"
    assert a.placed is None and np.array_equal(a.rows.array, before) and store.bytes == a.nbytes + b.nbytes
    store.memory_bytes += 1
    assert place(a, lambda nbytes: store.reserve(a, nbytes)) == "placed"
    assert store.held["a"] == a.nbytes and store.bytes == a.nbytes + b.nbytes == store.memory_bytes
    assert evicted == [] and len(store) == 2
    store.remove("b")
    assert place(b, lambda nbytes: store.reserve(b, nbytes)) == "gone" and b.placed is None


def test_a_new_sessions_placement_grows_its_buffer_so_that_the_next_step_does_not() -> None:
    """A new session's buffer holds its rows and no more: the placement moves them to one with
    room (off the request path), and a step appending up to APPEND_ROOM rows reallocates nothing."""
    session = session_with(60, seed=6)
    session.edits = allocate(session.layout, np.random.default_rng(6).uniform(-1, 1, 60).astype(np.float32),
                             AllocatorOptions(4, 2, w_max=60, tau_expand=0.1, tau_collapse=0.1)).edits  # fmt: skip
    assert session.edits and session.rows.buffer.shape[0] == 60
    wc = session.rows.array.copy()
    assert place(session, lambda nbytes: None) == "placed"
    buffer = session.rows.buffer
    created = np.ones((sum(edit.added for edit in session.edits), D), np.float32)
    end = int(session.layout.positions[-1]) + 4 ** int(session.layout.lod[-1])
    tail = np.full((APPEND_ROOM, D), 2.0, np.float32)
    step_delta = delta(created=created, append_embeddings=tail, append_lod=np.zeros(APPEND_ROOM, np.int64),
                       append_positions=np.arange(end, end + APPEND_ROOM))  # fmt: skip
    step = stage(session, step_delta, plan(session, step_delta, D))
    assert session.rows.buffer is buffer  # no reallocation on the step
    assert np.array_equal(step.embeddings, np.concatenate([edit_rows(wc, session.edits, created), tail]))


def test_evicting_for_memory_undoes_placements_before_dropping_sessions() -> None:
    """A placement is a cache: when a call needs room, the least recently used placements are undone
    (rows back as they were) before any session goes; one whose session is busy is not touched."""
    evicted: list[str] = []
    undone: list[None] = []
    store = SessionStore(10, 10**9, 60.0, on_evict=evicted.append, on_unplace=lambda: undone.append(None))
    a, b, c = placeable(1), placeable(2), placeable(3)
    for session, sid in ((a, "a"), (b, "b"), (c, "c")):
        session.id = sid
        store.add(session)
    wcs = {s.id: s.rows.array.copy() for s in (a, b)}
    for s in (a, b):
        assert place(s, lambda nbytes, s=s: store.reserve(s, nbytes)) == "placed"
    aside = {s.id: s.placed.nbytes for s in (a, b)}  # type: ignore[union-attr]
    store.memory_bytes = store.bytes - aside["a"]  # c grows: undoing a's placement is enough
    store.update(c)
    assert undone == [None] and evicted == [] and a.placed is None and b.placed is not None
    assert np.array_equal(a.rows.array, wcs["a"]) and store.held["a"] == a.nbytes
    assert store.bytes == a.nbytes + b.nbytes + c.nbytes <= store.memory_bytes
    store.memory_bytes = 10**9
    assert place(a, lambda nbytes: store.reserve(a, nbytes)) == "placed"
    store.memory_bytes = store.bytes - a.aside - b.aside - 1  # undoing both would not do: a goes, b keeps its own
    store.update(c)
    assert evicted == ["memory"] and len(undone) == 1 and b.placed is not None and store.get("a") is None
    assert store.bytes == b.nbytes + c.nbytes <= store.memory_bytes
    with b.lock:  # undoing b's placement would do, but a step holds it: b goes whole
        store.memory_bytes = store.bytes - b.aside
        store.update(c)
    assert evicted == ["memory", "memory"] and len(undone) == 1 and len(store) == 1
    assert b.placed is not None  # untouched: its lock holder decides (a dropped session's step fails to update)
    unplace(b)
    assert b.placed is None and np.array_equal(b.rows.array, wcs["b"])


def test_a_busy_sessions_placement_does_not_count_as_undoable() -> None:
    """Undoing only the free placements cannot make the room here: the oldest session goes at once,
    and no placement is undone for nothing (counting the busy one's would undo the oldest's first)."""
    evicted: list[str] = []
    undone: list[None] = []
    store = SessionStore(10, 10**9, 60.0, on_evict=evicted.append, on_unplace=lambda: undone.append(None))
    x, y, z = placeable(1), placeable(2), placeable(3)
    for session, sid in ((x, "x"), (y, "y"), (z, "z")):
        session.id = sid
        store.add(session)
    for s in (x, y):
        assert place(s, lambda nbytes, s=s: store.reserve(s, nbytes)) == "placed"
    with y.lock:  # a step holds y
        store.memory_bytes = store.bytes - x.aside - y.aside  # undoing both would do; x's alone would not
        store.update(z)
    assert evicted == ["memory"] and undone == [] and store.get("x") is None
    assert y.placed is not None and store.bytes == y.nbytes + z.nbytes <= store.memory_bytes


def test_a_placement_asks_no_bytes_for_a_session_idle_past_its_ttl() -> None:
    clock = Clock()
    evicted: list[str] = []
    store = SessionStore(10, 10**9, 60.0, on_evict=evicted.append, clock=clock)
    session = placeable(4)
    store.add(session)
    clock.now = 61.0
    assert place(session, lambda nbytes: store.reserve(session, nbytes)) == "gone"
    assert evicted == ["ttl"] and session.placed is None and store.bytes == 0


def test_a_placement_that_fails_after_its_reservation_gives_the_bytes_back() -> None:
    """`Pipeline.place`: no memory for the grown buffer after the bytes were reserved: counted
    `error`, and the store holds what the session holds again."""
    store = SessionStore(10, 10**9, 60.0)
    session = session_with(60, seed=6)  # a new session's buffer: the placement grows it
    session.edits = allocate(session.layout, np.random.default_rng(6).uniform(-1, 1, 60).astype(np.float32),
                             AllocatorOptions(4, 2, w_max=60, tau_expand=0.1, tau_collapse=0.1)).edits  # fmt: skip
    store.add(session)
    held = store.bytes

    def no_memory(*_: object) -> None:
        raise MemoryError

    session.rows.grow = no_memory  # type: ignore[method-assign]
    counted: list[str] = []
    metrics = SimpleNamespace(session_placements=SimpleNamespace(
        labels=lambda outcome: SimpleNamespace(inc=lambda: counted.append(outcome))))  # fmt: skip
    Pipeline.place(SimpleNamespace(store=store, metrics=metrics), session)  # type: ignore[arg-type]
    assert counted == ["error"] and session.placed is None
    assert store.bytes == store.held["s"] == session.nbytes == held


def test_a_sessions_bytes_read_its_placement_once() -> None:
    """GET reads `nbytes` without the session's lock: a step consuming the placement between two
    reads of `placed` must not break it (it answered 500)."""
    session = placeable(4)
    assert place(session, lambda nbytes: None) == "placed"
    aside = session.placed.nbytes  # type: ignore[union-attr]
    bare = held_bytes(session.rows.nbytes, session.layout, len(session.history), len(session.edits))

    class Racing(Session):
        def __getattribute__(self, name: str) -> object:
            value = object.__getattribute__(self, name)
            if name == "placed":  # the step takes the placement right after this read
                object.__setattr__(self, "placed", None)
            return value

    racing = Racing(**{f: getattr(session, f) for f in ("id", "rows", "layout", "options", "history", "edits")})
    racing.placed = session.placed
    assert racing.nbytes == bare + aside
    assert racing.nbytes == bare  # read again: consumed


def test_a_commit_keeps_its_rows_when_the_smaller_buffer_cannot_be_had() -> None:
    """Shrinking after many trims is an economy: without memory for it the committed step stands
    (it raised after the version had advanced)."""
    session = session_with(40, seed=5)
    session.rows.stage([], 0, np.zeros((400, D), np.float32))  # a buffer for 440 rows and more…
    session.rows.length = 40  # …holding the 40-entry WC
    big = session.rows.buffer.shape[0]
    step_delta = delta(applied=[], trim_head=35)  # 5 rows left: the buffer is more than 4x too large
    step = stage(session, step_delta, plan(session, step_delta, D))
    kept = step.embeddings.copy()

    def no_memory(*_: object) -> None:
        raise MemoryError

    session.rows._reallocate = no_memory  # type: ignore[method-assign]
    step.commit(())
    assert session.version == 2 and session.rows.buffer.shape[0] == big and np.array_equal(session.rows.array, kept)
    del session.rows._reallocate
    step = stage(session, delta(applied=[]), plan(session, delta(applied=[]), D))
    step.commit(())
    assert session.rows.buffer.shape[0] < big and np.array_equal(session.rows.array, kept)  # the next one shrinks


def test_rows_adopt_a_writable_array_and_copy_a_read_only_one() -> None:
    owned = np.zeros((4, D), np.float32)
    assert Rows(owned).buffer is owned
    frozen = np.frombuffer(bytes(4 * D * 4), dtype=np.float32).reshape(4, D)  # a base64 body's array
    rows = Rows(frozen)
    assert rows.buffer is not frozen and rows.buffer.flags.writeable
    rows.stage([], 0, np.ones((2, D), np.float32))
    assert rows.array.shape == (6, D)


def test_edit_rows_refuses_created_rows_that_do_not_match() -> None:
    edit = Edit("expand", 1, 1, 4, 1, 0, 4, 4, 0.9, "threshold")
    rows = np.arange(3 * D, dtype=np.float32).reshape(3, D)
    assert edit_rows(rows, [edit], np.zeros((4, D), np.float32)).shape == (6, D)
    with pytest.raises(ValueError, match="create 4 rows, got 3"):
        edit_rows(rows, [edit], np.zeros((3, D), np.float32))


@pytest.mark.parametrize("stream_min", [0, 1 << 30])  # decoded while it arrives / whole, in the inference thread
def test_a_delta_frame_decodes_like_a_snapshot_frame(stream_min: int) -> None:
    rng = np.random.default_rng(3)
    arrays = {"created": rng.standard_normal((5, 8)).astype(np.float16),
              "append_embeddings": rng.standard_normal((3, 8)).astype(np.float16),
              "append_lod": np.zeros(3, np.int8), "append_positions": np.arange(100, 103)}  # fmt: skip
    body = frame.pack({"version": 4, "applied": [0, 2]}, arrays)
    reader = codec.reader(codec.FRAME, 8, 64, np.dtype(np.float32), len(body), stream_min, codec.DELTA)
    for start in range(0, len(body), 7):
        reader.feed(body[start : start + 7], more=start + 7 < len(body))
    reader.close()
    decoded = reader.finish()
    assert decoded.fields == {"version": 4, "applied": [0, 2]}
    for name, array in arrays.items():
        expected = array.astype(np.float32) if array.dtype == np.float16 else array
        assert decoded.arrays[name].dtype == expected.dtype and np.array_equal(decoded.arrays[name], expected)
    empty = frame.pack({"version": 1}, {})
    reader = codec.reader(codec.FRAME, 8, 64, np.dtype(np.float32), len(empty), stream_min, codec.DELTA)
    reader.feed(empty, more=False)
    reader.close()
    assert reader.finish().arrays == {}


def test_a_delta_needs_all_three_append_arrays() -> None:
    body = frame.pack({"version": 1}, {"append_embeddings": np.zeros((2, 8), np.float16)})
    reader = codec.reader(codec.FRAME, 8, 64, np.dtype(np.float32), len(body), 0, codec.DELTA)
    with pytest.raises(problems.Problem) as error:
        reader.feed(body, more=False)
    assert error.value.status == 422 and error.value.extensions["field"] == "append_lod"


def test_a_sessions_bytes_count_its_history_and_edits_at_what_they_cost() -> None:
    """The memory bound covers what a caller chooses besides rows: up to 1,024 history entries
    (about 150 kB a session, measured here) and the last answer's edits."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    items = [HistoryItem("expand", 1, 10**12 + 32 * k, 2 + k % 900) for k in range(1024)]  # as a request gives them
    history = stamped(items)
    del items
    held_history = tracemalloc.get_traced_memory()[0] - before
    edits = tuple(Edit("expand", 10**6 + k, 1, 4, 1, 0, 4 * k + 10**9, 4, k / 1e3, "threshold") for k in range(64))
    held_edits = tracemalloc.get_traced_memory()[0] - before - held_history
    tracemalloc.stop()
    assert held_history <= len(history) * HISTORY_ENTRY_BYTES and held_edits <= len(edits) * EDIT_BYTES
    bare = session_with(32)
    full = session_with(32)
    full.history, full.edits = history, edits
    assert full.nbytes - bare.nbytes == 1024 * HISTORY_ENTRY_BYTES + 64 * EDIT_BYTES


def test_a_creations_history_keeps_only_what_a_cooldown_can_reach() -> None:
    items = [HistoryItem("collapse", 1, 4 * k, age) for k, age in enumerate((1, MAX_COOLDOWN_STEPS - 1,
                                                                            MAX_COOLDOWN_STEPS, 10**6))]  # fmt: skip
    kept = stamped(items)
    assert [2 - entry.version for entry in kept] == [1, MAX_COOLDOWN_STEPS - 1]  # ages as of version 1
    assert ages(kept, 2, MAX_COOLDOWN_STEPS) == [HistoryItem("collapse", 1, 0, 2),
                                                 HistoryItem("collapse", 1, 4, MAX_COOLDOWN_STEPS)]  # fmt: skip


def test_a_steps_growth_counts_rows_metadata_history_and_the_answers_edits() -> None:
    bare = session_with(40)
    options = AllocatorOptions(4, 2, w_max=20, max_edits=3)
    (edit, *_) = allocate(bare.layout, np.random.default_rng(2).uniform(-1, 1, 40).astype(np.float32), options).edits
    session = session_with(40, edits=(edit,))
    created = np.zeros((edit.added, D), np.float32)
    planned = plan(session, delta(applied=[0], created=created), D)
    rows = session.rows.growth(planned.length)
    metadata = 16 * (planned.layout.lod.size - session.layout.lod.size)  # int64 lod and position per entry
    assert len(planned.history) == len(session.history) + 1 and metadata != 0
    assert step_growth(session, planned, 8) == rows + metadata + HISTORY_ENTRY_BYTES + 7 * EDIT_BYTES
    trimmed = plan(session, delta(applied=[], trim_head=30), D)  # frees 30 entries' metadata, keeps no edits
    assert step_growth(session, trimmed, 0) == -16 * 30 - EDIT_BYTES
    kept = (trimmed.layout.lod, trimmed.layout.positions)
    assert all(a.base is None or a.base.nbytes == a.nbytes for a in kept)  # no view keeps the trimmed alive
