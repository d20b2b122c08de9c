"""Incremental focus sessions, the pure part: a session's working context held server-side, one
step's delta applied to it all-or-nothing, and the bounded store the sessions live in.

A step applies (in this order) the edits of the previous answer that the stack applied, with the
rows they create; a head trim; the entries appended at the tail (`lensnet_client.layout.apply_step`
states the metadata rule, shared with the client; `splice_layout` is its fast form for the
session's own edits). The embeddings live in `Rows`: a buffer with spare capacity on both sides,
changed in place (a trim moves nothing, appends cost O(K·D); edits move the kept rows between
them, one `memmove` per segment that cannot stay, and the rows are placed so that the most stay)
with an undo record, so a step that fails after its rows were staged (a model error, a missed
deadline) leaves the session exactly as it was. The moves are the one O(N·D) cost a step with
edits has: edits spread over the WC shift most rows. So they are made ahead, between steps
(`place`, on an inference thread once the answer is out): the rows go where applying all of the
answer's edits leaves them, and a step that applies them all (the usual case) only writes the
created rows into their places; one applying a subset puts back the rows of the edits it leaves
out (moving what a step with that many edits moves). The `apply` stage of benchmarks/sessions.py
times what stays on the request path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from lensnet_client.layout import Edit, Layout, apply_step

from .allocator import MAX_COOLDOWN_STEPS, HistoryItem, check_layout

MAX_HISTORY = 1024  # entries kept for cooldown, newest first (as the client's History)
HISTORY_ENTRY_BYTES, EDIT_BYTES = 192, 256
"""What one kept history entry (a `Stamped`) and one kept edit cost in memory, counted against the
bound (measured at ~156 and ~227 B on CPython 3.11; tests/test_sessions_core.py checks them)."""
EvictionReason = Literal["count", "memory", "ttl"]
PlaceOutcome = Literal["placed", "none", "memory", "gone"]
APPEND_ROOM = 64
"""Rows a buffer keeps spare beyond half its length (`_capacity`), and a placement keeps free for the
next step's appends (growing the buffer ahead of the step when they would not fit)."""


class Rows:
    """[N, D] rows, contiguous, at `buffer[start : start + length]`, with spare capacity on both
    sides; capacity grows by half when a step does not fit (amortised O(D) per appended row) and
    shrinks once it is 4x too large."""

    def __init__(self, rows: np.ndarray) -> None:
        self.buffer = np.require(rows, requirements=["C", "W"])  # adopted, not copied, when it can be
        self.start, self.length = 0, rows.shape[0]

    @property
    def array(self) -> np.ndarray:
        return self.buffer[self.start : self.start + self.length]

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def growth(self, length: int) -> int:
        """Extra bytes a step producing `length` rows (before its trim) needs beyond what is held."""
        if length <= self.buffer.shape[0]:
            return 0
        return _capacity(length) * self.buffer[0].nbytes - self.nbytes

    def stage(
        self, splices: Sequence[tuple[int, int, np.ndarray]], trim: int, append: np.ndarray, tail_room: int = 0
    ) -> Undo:
        """Replace `removed` rows at `index` by `rows` for each (index, removed, rows) (ascending,
        disjoint), then drop `trim` rows from the head and append `append`, keeping up to
        `tail_room` rows free after them when the buffer has room (a placement's, for the next
        step's appends). Returns the undo."""
        undo = Undo(self, self.buffer, self.start, self.length)
        pieces: list[tuple[int, int, np.ndarray | None]] = []  # (old start, old end) or inserted rows
        cursor = 0
        for index, removed, rows in splices:
            pieces.append((cursor, index, None))
            pieces.append((0, 0, rows))
            cursor = index + removed
        pieces.append((cursor, self.length, None))
        pieces.append((0, 0, append))
        total = sum(end - begin if rows is None else rows.shape[0] for begin, end, rows in pieces)
        if total <= self.buffer.shape[0]:
            shift = self._shift(pieces, total, tail_room)
            self._in_place(pieces, splices, undo, shift)
            self.start += shift + trim
        else:
            self._reallocate(pieces, trim, total - trim)
        self.length = total - trim
        return undo

    def _shift(self, pieces: list[tuple[int, int, np.ndarray | None]], total: int, tail_room: int) -> int:
        """Where the step's rows begin, relative to `start`: the offset that leaves the most kept
        rows where they are (edits shift only the rows between them, in either direction), within
        the buffer and up to `tail_room` rows short of its end; when none can stay, the one
        centring the rows (room on both sides), or nearer the head if the tail room needs it."""
        stays: dict[int, int] = {}  # shift that leaves a kept segment in place -> rows it leaves
        at = 0
        for begin, end, rows in pieces:
            if rows is None:
                stays[begin - at] = stays.get(begin - at, 0) + end - begin
                at += end - begin
            else:
                at += rows.shape[0]
        spare = self.buffer.shape[0] - total
        lowest, highest = -self.start, spare - min(tail_room, spare) - self.start
        fitting = [shift for shift in stays if lowest <= shift <= highest]
        if fitting:
            return max(fitting, key=stays.__getitem__)
        return min(spare // 2 - self.start, highest)

    def _in_place(
        self, pieces: list[tuple[int, int, np.ndarray | None]], splices: Sequence[tuple[int, int, np.ndarray]],
        undo: Undo, shift: int,
    ) -> None:  # fmt: skip
        """Kept segments move by memmove (left-movers left to right, then right-movers right to
        left: no move overwrites a segment not yet moved); the removed rows are saved for the undo."""
        base, target = self.start, self.start + shift
        for index, removed, _ in splices:
            undo.saved.append((base + index, self.buffer[base + index : base + index + removed].copy()))
        moves, inserts, at = [], [], 0
        for begin, end, rows in pieces:
            if rows is not None:
                inserts.append((target + at, rows))
                at += rows.shape[0]
                continue
            if base + begin != target + at and end > begin:
                moves.append((target + at, base + begin, end - begin))
            at += end - begin
        left = [move for move in moves if move[0] < move[1]]
        right = [move for move in reversed(moves) if move[0] > move[1]]
        for dst, src, count in left + right:
            self._move(dst, src, count)
            undo.moves.append((dst, src, count))
        for dst, rows in inserts:
            self.buffer[dst : dst + rows.shape[0]] = rows

    def grow(self, length: int) -> None:
        """Move the rows to a buffer with room for `length` rows and more (`_capacity`): made ahead
        of a step that needs it, so that the step does not reallocate. The WC does not change."""
        self._reallocate([(0, self.length, None)], 0, self.length, _capacity(length))

    def _reallocate(
        self, pieces: list[tuple[int, int, np.ndarray | None]], skip: int, length: int, capacity: int | None = None
    ) -> None:
        """Gather the pieces (the first `skip` rows left out) into a new buffer of `capacity` rows
        (by default `length`'s, with room to grow on both sides)."""
        capacity = _capacity(length) if capacity is None else capacity
        buffer = np.empty((capacity, *self.buffer.shape[1:]), dtype=self.buffer.dtype)
        start = (buffer.shape[0] - length) // 2
        at = start - skip
        for begin, end, rows in pieces:
            source = self.array[begin:end] if rows is None else rows
            lo = max(0, start - at)
            if lo < source.shape[0]:
                buffer[at + lo : at + source.shape[0]] = source[lo:]
            at += source.shape[0]
        self.buffer, self.start = buffer, start

    def _move(self, dst: int, src: int, count: int) -> None:
        row = self.buffer[0].nbytes
        address = self.buffer.ctypes.data
        ctypes.memmove(address + dst * row, address + src * row, count * row)

    def shrink(self) -> None:
        """Give memory back once the buffer holds 4x more rows than used (after many trims). Without
        memory for the smaller buffer the rows stay where they are: a later step tries again."""
        if self.buffer.shape[0] > 4 * _capacity(self.length):
            with contextlib.suppress(MemoryError):  # _reallocate changes nothing before its copy is complete
                self._reallocate([(0, self.length, None)], 0, self.length)


def _capacity(length: int) -> int:
    return length + length // 2 + APPEND_ROOM


@dataclass(slots=True)
class Undo:
    """What `Rows.stage` changed, to put back: the buffer (replaced when it grew), the moves
    made, the rows they overwrote."""

    rows: Rows
    buffer: np.ndarray
    start: int
    length: int
    moves: list[tuple[int, int, int]] = field(default_factory=list)  # (dst, src, count), in order
    saved: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (row, the removed rows) per splice, in order

    @property
    def nbytes(self) -> int:
        """The rows set aside (the buffer is the session's, counted there)."""
        return sum(rows.nbytes for _, rows in self.saved)

    def apply(self) -> None:
        rows = self.rows
        if rows.buffer is self.buffer:
            for dst, src, count in reversed(self.moves):
                rows._move(src, dst, count)
            for at, saved in self.saved:
                rows.buffer[at : at + saved.shape[0]] = saved
        rows.buffer, rows.start, rows.length = self.buffer, self.start, self.length


class DeltaError(ValueError):
    """A step's delta does not fit the session: `field`, what was `expected`, what was `got`."""

    def __init__(self, field: str, expected: str, got: str, index: int | None = None) -> None:
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field, self.expected, self.got, self.index = field, expected, got, index


@dataclass(frozen=True, slots=True)
class Delta:
    """One step's change to a session's WC (arrays already in the graph's dtype / integers)."""

    applied: Sequence[int] | None  # indices into the previous answer's edits; None = all
    created: np.ndarray  # [M, D]: the rows the applied edits create, in edit order
    trim_head: int
    append_embeddings: np.ndarray  # [K, D]
    append_lod: np.ndarray  # [K]
    append_positions: np.ndarray  # [K]


@dataclass(eq=False)
class Session:
    """A WC held for a caller: rows and metadata, the allocator defaults, the cooldown history,
    the last answer's edits (what the next step's `applied` indexes), and its version."""

    id: str
    rows: Rows
    layout: Layout
    options: dict[str, object]
    history: tuple[Stamped, ...]
    edits: tuple[Edit, ...] = ()
    version: int = 1
    created_at: float = field(default_factory=time.monotonic)
    used_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the rows: a step's or a placement's
    stepping: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a step's claim (a second: 409)
    placed: Undo | None = None  # the rows are placed for all of `edits` (`place`): how to undo it

    @property
    def nbytes(self) -> int:
        """Bytes held (`held_bytes`), and the rows a placement set aside."""
        return held_bytes(self.rows.nbytes, self.layout, len(self.history), len(self.edits)) + self.aside

    @property
    def aside(self) -> int:
        """Bytes of the rows a placement set aside. Read without the lock (GET, the store), so
        `placed` is read once: a step may consume the placement meanwhile."""
        placed = self.placed
        return 0 if placed is None else placed.nbytes


def held_bytes(rows_bytes: int, layout: Layout, history: int, edits: int) -> int:
    """Bytes a session holds with `rows_bytes` of row buffer, `layout`'s metadata, `history` kept
    entries and `edits` kept edits (small each, but a caller chooses up to 1,024 history entries)."""
    metadata = layout.lod.nbytes + layout.positions.nbytes
    return rows_bytes + metadata + history * HISTORY_ENTRY_BYTES + edits * EDIT_BYTES


@dataclass(slots=True)
class Step:
    """A staged step: the resulting WC is in place (`embeddings`, `layout`), the session's
    version and history are not yet changed; `commit` or `rollback` ends it."""

    session: Session
    layout: Layout
    history: tuple[Stamped, ...]
    undo: Undo
    placed: Undo | None = None  # the placement the step used, undone after `undo` on a rollback

    @property
    def embeddings(self) -> np.ndarray:
        return self.session.rows.array

    def commit(self, edits: tuple[Edit, ...]) -> None:
        s = self.session
        s.layout, s.history, s.edits, s.version = self.layout, self.history, edits, s.version + 1
        s.rows.shrink()

    def rollback(self) -> None:
        self.undo.apply()
        if self.placed is not None:
            self.placed.apply()


class Plan(NamedTuple):
    """A checked delta: the resulting WC's metadata, the row splices and the edits applied."""

    layout: Layout
    splices: list[tuple[int, int, np.ndarray]]  # (index, removed, created rows), ascending
    applied: list[Edit]
    history: tuple[Stamped, ...]  # after this step (what its cooldown sees)
    length: int  # rows before the head trim


def plan(session: Session, delta: Delta, embed_dim: int) -> Plan:
    """Check a delta against the session without changing it: `SnapshotError` names the rule and
    the index in the resulting WC (the same rules as a full snapshot), `DeltaError` rows that do not fit."""
    old, edits = session.layout, session.edits
    chosen = range(len(edits)) if delta.applied is None else delta.applied
    indices = sorted(set(chosen))
    applied = [edits[i] for i in indices if 0 <= i < len(edits)]
    kept = old.lod.size + sum(edit.added - edit.removed for edit in applied)
    if len(applied) != len(chosen) or not 0 <= delta.trim_head <= kept:
        apply_step(old.lod, old.positions, edits, delta.applied, delta.trim_head, delta.append_lod,
                   delta.append_positions, old.block_size)  # fmt: skip
        raise AssertionError("plan: apply_step accepted indices or a trim that plan refuses")
    need = sum(edit.added for edit in applied)
    if delta.created.shape != (need, embed_dim):
        expected = f"[{need}, {embed_dim}] (the rows the {len(applied)} applied edits create)"
        raise DeltaError("created.shape", expected, str(list(delta.created.shape)))
    for name, rows in (("created", delta.created), ("append_embeddings", delta.append_embeddings)):
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise DeltaError(f"{name}[{row}]", "finite values", "NaN or inf", row)
    if delta.trim_head == kept and not delta.append_lod.size:
        raise DeltaError("trim_head", f"< {kept} when nothing is appended (a WC keeps an entry)", str(kept))
    lod, positions = splice_layout(old, applied, delta.trim_head, delta.append_lod, delta.append_positions)
    layout = check_layout(lod, positions, old.block_size, old.max_lod)
    splices, at = [], 0
    for edit in applied:
        splices.append((edit.index, edit.removed, delta.created[at : at + edit.added]))
        at += edit.added
    history = record(session.history, applied, session.version + 1)
    return Plan(layout, splices, applied, history, kept + delta.append_lod.size)


def splice_layout(
    old: Layout, applied: Sequence[Edit], trim: int, append_lod: np.ndarray, append_positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`apply_step`'s metadata for edits that are the session's own last answer on `old` (so
    they match it, and need not be checked entry by entry as `apply_edits` does): one
    concatenation per array. The result is checked like any snapshot (`check_layout`)."""
    lods: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    cursor = 0
    for edit in applied:
        created_lod, offsets = _created(old.block_size, edit.action, edit.lod_after, edit.added)
        lods += [old.lod[cursor : edit.index], created_lod]
        positions += [old.positions[cursor : edit.index], offsets + edit.position]
        cursor = edit.index + edit.removed
    lods += [old.lod[cursor:], append_lod]
    positions += [old.positions[cursor:], append_positions]
    lod, position = np.concatenate(lods, dtype=np.int64), np.concatenate(positions, dtype=np.int64)
    return (lod[trim:].copy(), position[trim:].copy()) if trim else (lod, position)  # no view holds the trimmed


def step_growth(session: Session, planned: Plan, max_edits: int) -> int:
    """Bytes a planned step may add to the session (negative: it frees some): rows beyond its
    buffer, metadata, history, and the answer's edits (at most `max_edits`)."""
    rows = session.rows.nbytes + session.rows.growth(planned.length)
    return held_bytes(rows, planned.layout, len(planned.history), max_edits) - session.nbytes


def stage(session: Session, delta: Delta, planned: Plan) -> Step:
    """Apply a planned delta to the session's rows (undoable); `commit` or `rollback` ends it. If
    it fails, the session is as it was before any placement (`placed` is undone). Rows placed for
    the last answer's edits (`place`) are spliced from where they are: an applied edit's created
    rows fill its place, an edit not applied gets back the rows it removed (its entry in the
    placement's `saved`)."""
    rows, placed = session.rows, session.placed
    if placed is None:
        undo = rows.stage(planned.splices, delta.trim_head, delta.append_embeddings)
        return Step(session, planned.layout, planned.history, undo)
    session.placed = None
    filling = {index: new_rows for index, _, new_rows in planned.splices}  # edit indices are unique
    splices, shift = [], 0  # shift: of the old WC's rows after the edits so far, once placed
    try:
        for edit, (_, removed) in zip(session.edits, placed.saved, strict=True):  # one saved per edit
            at = edit.index + shift
            if edit.index in filling:
                rows.array[at : at + edit.added] = filling[edit.index]
            else:
                splices.append((at, edit.added, removed))
            shift += edit.added - edit.removed
        undo = rows.stage(splices, delta.trim_head, delta.append_embeddings)
    except BaseException:
        placed.apply()  # back to the rows before the placement (`session.placed` is None already)
        raise
    return Step(session, planned.layout, planned.history, undo, placed)


def place(session: Session, reserve: Callable[[int], PlaceOutcome | None]) -> PlaceOutcome:
    """Between steps, holding the session's lock: move its rows to where applying every edit of
    its last answer leaves them (zeros where the created rows go), with `APPEND_ROOM` rows free
    after them for the next step's appends, in a buffer grown first if it lacks them (a new
    session's has none). Not done (the outcome says why) when there are no edits or the rows are
    placed already (`none`), or when `reserve(nbytes)`, asked for the bytes of that growth and of
    the rows the edits remove (set aside for a step that does not apply them all), refuses them
    (its outcome): then, if the rows fit the buffer as it is, for the set-aside rows alone."""
    rows, edits = session.rows, session.edits
    if session.placed is not None or not edits:
        return "none"
    length = rows.length + sum(edit.added - edit.removed for edit in edits)
    aside = sum(edit.removed for edit in edits) * rows.buffer[0].nbytes
    growth = rows.growth(length + APPEND_ROOM)
    refused = reserve(growth + aside)
    if refused == "memory" and growth and not rows.growth(length):
        growth, refused = 0, reserve(aside)
    if refused is not None:
        return refused
    if growth:
        rows.grow(length + APPEND_ROOM)
    zero = np.zeros((1, *rows.buffer.shape[1:]), rows.buffer.dtype)
    splices = [(edit.index, edit.removed, np.broadcast_to(zero, (edit.added, *zero.shape[1:]))) for edit in edits]
    session.placed = rows.stage(splices, 0, zero[:0], tail_room=APPEND_ROOM)
    return "placed"


def unplace(session: Session) -> None:
    """Undo `place` (holding the session's lock): the rows go back to the last answer's WC and
    the rows set aside are freed."""
    placed, session.placed = session.placed, None
    if placed is not None:
        placed.apply()


@functools.cache
def _created(block_size: int, action: str, lod_after: int, added: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries an edit creates: their LODs, and their positions less the edit's (read-only)."""
    span = block_size**lod_after if action == "expand" else 0
    lods, offsets = np.full(added, lod_after, np.int64), span * np.arange(added, dtype=np.int64)
    lods.flags.writeable = offsets.flags.writeable = False
    return lods, offsets


class Stamped(NamedTuple):
    """A history entry: the node an applied edit touched, and the session version of the step that applied it."""

    action: str
    lod: int
    position: int
    version: int


def stamped(history: Sequence[HistoryItem]) -> tuple[Stamped, ...]:
    """A creation's history (ages as of version 1), newest first; entries older than any cooldown
    window can look back are not kept."""
    recent = [item for item in history if item.age < MAX_COOLDOWN_STEPS]
    ordered = sorted(recent, key=lambda item: item.age)[:MAX_HISTORY]
    return tuple(Stamped(item.action, item.lod, item.position, 2 - item.age) for item in ordered)


def record(history: tuple[Stamped, ...], applied: Sequence[Edit], version: int) -> tuple[Stamped, ...]:
    """The history after the step that produced `version` applied `applied` (as the client's
    `History.record`: newest first, at most MAX_HISTORY, nothing older than the cooldown horizon).
    Entries keep their stamp, so a step costs O(edits), not O(history)."""
    fresh = tuple(Stamped(edit.action, edit.node_lod, edit.position, version) for edit in applied)
    kept = history[: MAX_HISTORY - len(fresh)]
    cut = len(kept)
    while cut and version - kept[cut - 1].version + 1 > MAX_COOLDOWN_STEPS:
        cut -= 1
    return fresh + kept[:cut]


def ages(history: tuple[Stamped, ...], version: int, window: int) -> list[HistoryItem]:
    """The entries at most `window` steps old at the step producing `version`, as the allocator's history."""
    recent = []
    for entry in history:
        age = version - entry.version + 1
        if age > window:
            break
        recent.append(HistoryItem(entry.action, entry.lod, entry.position, age))  # type: ignore[arg-type]
    return recent


class SessionStore:
    """The sessions of one process, least recently used first. Bounds: `max_sessions`,
    `memory_bytes` (`Session.nbytes` held), `ttl_s` idle; beyond one, the least recently used go
    (`on_evict(reason)` is told). Others are evicted only for a call that succeeded (`add`,
    `update`): a refused one changes no other caller's session. Where undoing placements (`place`:
    their set-aside rows are a cache) can make the room, they are undone instead, least recently
    used first (`on_unplace()` is told); a placement itself only takes free bytes (`reserve`).
    `on_change(sessions, bytes)` hears every change, expiries included. Thread-safe; the lock
    order is a session's lock, then the store's (the store only tries sessions' locks)."""

    def __init__(
        self, max_sessions: int, memory_bytes: int, ttl_s: float,
        on_evict: Callable[[EvictionReason], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int, int], None] = lambda sessions, nbytes: None,
        on_unplace: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.max_sessions, self.memory_bytes, self.ttl_s = max_sessions, memory_bytes, ttl_s
        self.on_evict, self.clock, self.on_change, self.on_unplace = on_evict, clock, on_change, on_unplace
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.held: dict[str, int] = {}  # bytes accounted per session
        self.bytes = 0
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> Session | None:
        """The live session (now the most recently used), or None: unknown, deleted or evicted."""
        with self.lock:
            self._expire()
            session = self.sessions.get(session_id)
            if session is not None:
                session.used_at = self.clock()
                self.sessions.move_to_end(session_id)
            return session

    def peek(self, session_id: str) -> Session | None:
        """`get` without counting as use: a look (a monitor's GET) keeps no session alive."""
        with self.lock:
            self._expire()
            return self.sessions.get(session_id)

    def fits(self, session: Session | None, extra: int) -> bool:
        """Whether `extra` more bytes for `session` (None: a new one) could fit the memory bound,
        once others are evicted; nothing is evicted here (`add`/`update` do, after the call succeeded)."""
        own = self.held.get(session.id, 0) if session else 0
        return own + extra <= self.memory_bytes

    def reserve(self, session: Session, nbytes: int) -> Literal["gone", "memory"] | None:
        """Account `nbytes` more for `session` now if they fit the free bytes (None), evicting
        nothing: `memory` if they do not, `gone` if it was deleted or evicted. The caller holds the
        session's lock, and makes `session.nbytes` match (or calls `update` if it cannot)."""
        with self.lock:
            self._expire()
            if self.sessions.get(session.id) is not session:
                return "gone"
            if self.bytes + nbytes > self.memory_bytes:
                return "memory"
            self.held[session.id] += nbytes
            self.bytes += nbytes
            self.on_change(len(self.sessions), self.bytes)
            return None

    def sweep(self) -> None:
        """Drop the sessions idle past the TTL now (calls do it too; this frees them without calls)."""
        with self.lock:
            self._expire()

    def add(self, session: Session) -> None:
        with self.lock:
            session.used_at = self.clock()
            self.sessions[session.id] = session
            self._account(session)
            self._evict_to(self.memory_bytes, keep=session.id)
            while len(self.sessions) > self.max_sessions:
                self._drop(next(iter(self.sessions)), "count")
            self.on_change(len(self.sessions), self.bytes)

    def update(self, session: Session) -> None:
        """Account the session's size again (after a step, committed or not, or a placement that
        failed), evicting others if it grew past the bound; a session no longer held is ignored."""
        with self.lock:
            if session.id in self.sessions:
                self._account(session)
                self._evict_to(self.memory_bytes, keep=session.id)
                self.on_change(len(self.sessions), self.bytes)

    def remove(self, session_id: str) -> bool:
        with self.lock:
            self._expire()
            if session_id not in self.sessions:
                return False
            self._drop(session_id, None)
            return True

    def _account(self, session: Session) -> None:
        nbytes = session.nbytes
        self.bytes += nbytes - self.held.get(session.id, 0)
        self.held[session.id] = nbytes

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl_s
        while self.sessions and next(iter(self.sessions.values())).used_at < horizon:
            self._drop(next(iter(self.sessions)), "ttl")

    def _evict_to(self, limit: int, keep: str | None) -> None:
        """Evict the least recently used sessions but `keep` until the bytes held are within
        `limit`, first undoing placements (a cache) where undoing those left could get there."""
        self._expire()
        if self.bytes <= limit:  # the usual case, on every step: nothing to read
            return
        others = [session for session_id, session in self.sessions.items() if session_id != keep]
        # Read once (they may change meanwhile); a busy session's placement cannot be undone now.
        asides = [0 if session.lock.locked() else session.aside for session in others]
        undoable = sum(asides)
        while others and self.bytes - undoable > limit:  # undoing all would not do: the oldest go
            undoable -= asides.pop(0)
            self._drop(others.pop(0).id, "memory")
        for session in others:
            if self.bytes <= limit:
                return
            self._unplace(session)
        for session in others:  # a placement whose session was busy could not be undone
            if self.bytes <= limit:
                return
            self._drop(session.id, "memory")

    def _unplace(self, session: Session) -> None:
        """Undo `session`'s placement if it has one and its lock is free (a step or a placement
        holding it would wait for the store's lock: trying, not waiting, keeps the lock order)."""
        if session.placed is None or not session.lock.acquire(blocking=False):
            return
        try:
            if session.placed is not None:
                unplace(session)
                self._account(session)
                self.on_unplace()
        finally:
            session.lock.release()

    def _drop(self, session_id: str, reason: EvictionReason | None) -> None:
        del self.sessions[session_id]
        self.bytes -= self.held.pop(session_id)
        if reason:
            self.on_evict(reason)
        self.on_change(len(self.sessions), self.bytes)
