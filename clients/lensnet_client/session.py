"""Focus sessions: the service keeps the working context, each step sends only what changed.

    session = FocusSession(client, w_max=8000, snapshot=lambda: my_wc_embeddings())
    result = session.open(embeddings, lod, positions)                      # one full upload
    result = session.step(created=rows_for(result.edits), append_embeddings=new, append_lod=...,
                          append_positions=...)                             # a delta per step

The session mirrors the service: it applies the applied edits, the head trim and the appended
entries to its own `lod`/`positions` with the same rule (`layout.apply_step`) and records the
applied edits in its `History`. When the service answers 404 (the session was evicted, expired,
or lives in another process) or 409 (versions disagree, e.g. an answer was lost), the step is
answered anyway by re-creating the session from the caller's full embeddings (`snapshot()` or
the step's `embeddings=`) with that history: one full upload, never a wrong answer. Every step
sends all options, so a re-created session answers exactly as the old one would have; one
re-created with a step's overrides (its answer must follow them) gets `null` for them on later
steps (the service's default, as the old session had). A 409 re-creation first deletes the old
session (it still holds a WC on that process).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import httpx
import numpy as np

from .client import AsyncFocusClient, FocusClient, FocusError, FocusResult, History, _float_array, _index_array
from .layout import Edit, apply_step

ROUTING_HEADER = "x-lensnet-session"
"""Sent on every session call with a key fixed per session object: an ingress that hashes it
(consistent hashing) sends all of a session's calls, the creation included, to one replica."""
RESYNC_STATUSES = (404, 409)
MAX_HISTORY_STEPS = 1024
"""Steps of history a session keeps by default: the service's largest `cooldown_steps`, so a
re-created session gets every entry the old one could still use (both keep at most 1,024)."""
Snapshot = Callable[[], np.ndarray]


class _Pending(NamedTuple):
    """A step's resulting WC metadata and history, adopted once the service answered; for a
    creation, its options (the service session's defaults from then on)."""

    lod: np.ndarray
    positions: np.ndarray
    history: History
    defaults: dict[str, Any] | None = None


class _SessionState:
    """What both session classes keep and send (no I/O)."""

    def __init__(
        self, protocol: Any, w_max: int, options: Mapping[str, Any], snapshot: Snapshot | None, horizon: int
    ) -> None:
        self.protocol, self.snapshot = protocol, snapshot
        self.options = {"w_max": w_max, **{k: v for k, v in options.items() if v is not None}}
        self.defaults = dict(self.options)  # what the service's session holds as its options
        self.history = History(max(horizon, self.options.get("cooldown_steps", 0)))
        self.routing_key = secrets.token_urlsafe(12)
        self.session_id: str | None = None
        self.version = 0
        self.lod = self.positions = np.empty(0, dtype=np.int64)
        self.edits: tuple[Edit, ...] = ()
        self.resyncs = 0

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        return {**headers, ROUTING_HEADER: self.routing_key}

    def deletion(self) -> dict[str, Any]:
        """The DELETE of the service's session, as httpx keywords: its path and routing header."""
        return {"url": f"/v1/sessions/{self.session_id}", "headers": self.headers({})}

    def create(
        self, embeddings: np.ndarray, pending: _Pending, overrides: Mapping[str, Any], return_scores: bool,
        deadline_ms: float | None,
    ) -> tuple[bytes, dict[str, str], _Pending]:  # fmt: skip
        options = self.chosen(overrides)
        w_max = options.pop("w_max")
        content, headers = self.protocol.focus_request(
            (embeddings, pending.lod, pending.positions), w_max, options, pending.history, return_scores, deadline_ms
        )
        return content, self.headers(headers), pending._replace(defaults={"w_max": w_max, **options})

    def chosen(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """This call's options: the session's, `overrides` over them (a larger `cooldown_steps`
        also lengthens the history kept, so a re-creation carries all it needs)."""
        options = {**self.options, **{k: v for k, v in overrides.items() if v is not None}}
        self.history.horizon = max(self.history.horizon, options.get("cooldown_steps", 0))
        return options

    def opening(self, lod: np.ndarray, positions: np.ndarray, history: History | None) -> _Pending:
        return _Pending(np.asarray(lod, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                        (history or self.history).copy())  # fmt: skip

    def step(
        self, created: np.ndarray | None, append: tuple[object, object, object] | None, applied: Sequence[int] | None,
        trim_head: int, overrides: Mapping[str, Any], return_scores: bool, deadline_ms: float | None,
    ) -> tuple[bytes, dict[str, str], _Pending]:  # fmt: skip
        """The delta body, and the WC it leads to (ValueError/SnapshotError before anything is sent)."""
        if self.session_id is None:
            raise RuntimeError("open() the session first")
        append_embeddings, append_lod, append_positions = append or (None, [], [])
        block = max((max(edit.added, edit.removed) for edit in self.edits), default=2)  # B, as every edit says
        lod, positions = apply_step(
            self.lod, self.positions, self.edits, applied, trim_head, _index_array(append_lod, "append_lod"),
            _index_array(append_positions, "append_positions"), block,
        )  # fmt: skip
        options = self.chosen(overrides)  # first: it may lengthen the history kept
        options |= {k: None for k in self.defaults if k not in options}  # null: the service's default
        chosen = range(len(self.edits)) if applied is None else applied
        history = self.history.copy()
        history.record([self.edits[i] for i in sorted(chosen)])
        arrays = {}
        if created is not None and np.asarray(created).size:
            arrays["created"] = _float_array(created)
        if append is not None:
            arrays |= {
                "append_embeddings": _float_array(append_embeddings),
                "append_lod": _index_array(append_lod, "append_lod"),
                "append_positions": _index_array(append_positions, "append_positions"),
            }
        fields: dict[str, Any] = {"version": self.version, "trim_head": trim_head, "options": options,
                                  "return_scores": return_scores}  # fmt: skip
        if applied is not None:
            fields["applied"] = list(applied)
        content, headers = self.protocol.pack(arrays, fields, deadline_ms)
        return content, self.headers(headers), _Pending(lod, positions, history)

    def full_embeddings(self, given: np.ndarray | None, pending: _Pending, error: FocusError) -> np.ndarray:
        """The caller's full embeddings for a re-creation (the error again when there are none)."""
        embeddings = given if given is not None else self.snapshot() if self.snapshot else None
        if embeddings is None:
            raise error
        if np.shape(embeddings)[0] != pending.lod.size:
            raise ValueError(f"snapshot: expected {pending.lod.size} rows (the WC after this step), got "
                             f"{np.shape(embeddings)[0]}")  # fmt: skip
        return embeddings

    def adopt(self, result: FocusResult, pending: _Pending) -> FocusResult:
        self.session_id, self.version = result.session_id, result.version or 0
        if pending.defaults is not None:
            self.defaults = pending.defaults
        self.lod, self.positions, self.history, self.edits = (
            pending.lod,
            pending.positions,
            pending.history,
            result.edits,
        )
        return result


class FocusSession:
    """A focus session over a `FocusClient`: `open` once with the full WC, then `step` with deltas.

    `snapshot` (optional): returns the caller's full [N, D] embeddings of the current WC (after
    the step being sent), for re-creating the session after a 404/409; a step may pass
    `embeddings=` instead. `history_horizon`: steps of history kept (default: all a cooldown can
    reach; a smaller one is raised to the largest `cooldown_steps` used, from then on).
    """

    def __init__(
        self, client: FocusClient, *, w_max: int, snapshot: Snapshot | None = None,
        history_horizon: int = MAX_HISTORY_STEPS, **options: Any,
    ) -> None:  # fmt: skip
        self.client = client
        self.state = _SessionState(client.protocol, w_max, options, snapshot, history_horizon)

    def __enter__(self) -> FocusSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:  # the caller's error is the one to see, not a failed clean-up
            with contextlib.suppress(httpx.HTTPError):
                self.close()

    @property
    def lod(self) -> np.ndarray:
        """The WC's metadata as of the last answer (what its edits index)."""
        return self.state.lod

    @property
    def positions(self) -> np.ndarray:
        return self.state.positions

    @property
    def resyncs(self) -> int:
        """Steps answered by re-creating the session (404/409)."""
        return self.state.resyncs

    def open(
        self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, *, history: History | None = None,
        return_scores: bool = False, deadline_ms: float | None = None,
    ) -> FocusResult:  # fmt: skip
        """Create the session from a full WC (the answer is /v1/focus's for it)."""
        content, headers, pending = self.state.create(
            embeddings, self.state.opening(lod, positions, history), {}, return_scores, deadline_ms
        )
        return self.state.adopt(self.client.protocol.focus_result(self.client._post("/v1/sessions", content, headers)),
                                pending)  # fmt: skip

    def step(
        self, *, created: np.ndarray | None = None, append_embeddings: np.ndarray | None = None,
        append_lod: object = (), append_positions: object = (), applied: Sequence[int] | None = None,
        trim_head: int = 0, embeddings: np.ndarray | None = None, return_scores: bool = False,
        deadline_ms: float | None = None, **overrides: Any,
    ) -> FocusResult:  # fmt: skip
        """One focus step: `applied` edits of the last answer (None = all) with the rows they
        create (`created`, in edit order), `trim_head` entries dropped, entries appended.
        `overrides`: options for this step only."""
        state = self.state
        append = None if append_embeddings is None else (append_embeddings, append_lod, append_positions)
        content, headers, pending = state.step(
            created, append, applied, trim_head, overrides, return_scores, deadline_ms
        )
        response = self.client._post(f"/v1/sessions/{state.session_id}/focus", content, headers)
        try:
            return state.adopt(self.client.protocol.focus_result(response), pending)
        except FocusError as error:
            if error.status not in RESYNC_STATUSES:
                raise
            full, status = state.full_embeddings(embeddings, pending, error), error.status
        state.resyncs += 1
        if status == 409:  # the old session still holds a WC there: free it, but keep its id until replaced
            with contextlib.suppress(httpx.HTTPError):
                self.client.http.delete(**state.deletion())
        content, headers, pending = state.create(full, pending, overrides, return_scores, deadline_ms)
        return state.adopt(self.client.protocol.focus_result(self.client._post("/v1/sessions", content, headers)),
                           pending)  # fmt: skip

    def close(self) -> None:
        """Delete the session on the service (nothing if it is already gone)."""
        if self.state.session_id is not None:
            self.client.http.delete(**self.state.deletion())
            self.state.session_id = None


class AsyncFocusSession:
    """The asyncio twin of `FocusSession` (same arguments, awaitable methods)."""

    def __init__(
        self, client: AsyncFocusClient, *, w_max: int, snapshot: Snapshot | None = None,
        history_horizon: int = MAX_HISTORY_STEPS, **options: Any,
    ) -> None:  # fmt: skip
        self.client = client
        self.state = _SessionState(client.protocol, w_max, options, snapshot, history_horizon)

    async def __aenter__(self) -> AsyncFocusSession:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            await self.close()
        else:  # the caller's error is the one to see, not a failed clean-up
            with contextlib.suppress(httpx.HTTPError):
                await self.close()

    @property
    def lod(self) -> np.ndarray:
        return self.state.lod

    @property
    def positions(self) -> np.ndarray:
        return self.state.positions

    @property
    def resyncs(self) -> int:
        return self.state.resyncs

    async def open(
        self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, *, history: History | None = None,
        return_scores: bool = False, deadline_ms: float | None = None,
    ) -> FocusResult:  # fmt: skip
        content, headers, pending = self.state.create(
            embeddings, self.state.opening(lod, positions, history), {}, return_scores, deadline_ms
        )
        response = await self.client._post("/v1/sessions", content, headers)
        return self.state.adopt(self.client.protocol.focus_result(response), pending)

    async def step(
        self, *, created: np.ndarray | None = None, append_embeddings: np.ndarray | None = None,
        append_lod: object = (), append_positions: object = (), applied: Sequence[int] | None = None,
        trim_head: int = 0, embeddings: np.ndarray | None = None, return_scores: bool = False,
        deadline_ms: float | None = None, **overrides: Any,
    ) -> FocusResult:  # fmt: skip
        state = self.state
        append = None if append_embeddings is None else (append_embeddings, append_lod, append_positions)
        content, headers, pending = state.step(
            created, append, applied, trim_head, overrides, return_scores, deadline_ms
        )
        response = await self.client._post(f"/v1/sessions/{state.session_id}/focus", content, headers)
        try:
            return state.adopt(self.client.protocol.focus_result(response), pending)
        except FocusError as error:
            if error.status not in RESYNC_STATUSES:
                raise
            full, status = state.full_embeddings(embeddings, pending, error), error.status
        state.resyncs += 1
        if status == 409:  # the old session still holds a WC there: free it, but keep its id until replaced
            with contextlib.suppress(httpx.HTTPError):
                await self.client.http.delete(**state.deletion())
        content, headers, pending = state.create(full, pending, overrides, return_scores, deadline_ms)
        response = await self.client._post("/v1/sessions", content, headers)
        return state.adopt(self.client.protocol.focus_result(response), pending)

    async def close(self) -> None:
        if self.state.session_id is not None:
            await self.client.http.delete(**self.state.deletion())
            self.state.session_id = None
