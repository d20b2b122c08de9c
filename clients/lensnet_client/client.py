"""Sync and async clients for the focus service: numpy arrays in, typed results out.

The binary frame format is the default (raw array bytes, no base64, no number parsing); JSON
(arrays as base64 objects) is there for debugging. 429/503 answers and connection failures are
retried with exponential backoff, honouring `Retry-After`; a wait longer than `max_backoff` is
not taken (the error is raised instead), so a retry never silently blows the caller's step budget.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from . import frame
from .layout import Edit

Format = Literal["binary", "json"]
RETRY_STATUSES = (429, 503)


class FocusError(Exception):
    """The service answered with an error: `status` and the RFC 9457 `problem` body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status}: {problem.get('detail') or problem.get('title') or 'error'}")
        self.status, self.problem = status, problem
        self.field: str | None = problem.get("field")


@dataclass(frozen=True)
class ScoreResult:
    scores: np.ndarray
    model: dict[str, str]
    timings_ms: dict[str, float]
    """Server stages, from the body (receive … telemetry)."""
    server_timing: dict[str, float] = field(repr=False)
    """All server stages incl. encode and total, from the Server-Timing header (ms)."""


@dataclass(frozen=True)
class FocusResult:
    edits: tuple[Edit, ...]
    """Disjoint, ordered by index; `layout.apply_edits` applies them to lod/positions."""
    length_before: int
    length_after: int
    budget_met: bool
    budget_note: str | None
    counters: dict[str, Any]
    model: dict[str, str]
    timings_ms: dict[str, float]
    server_timing: dict[str, float] = field(repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    decision_id: str | None = None
    """Names this decision in `feedback` (the measured ΔNLL of its edits)."""
    session_id: str | None = None
    """Session calls only: the session and its version after this answer."""
    version: int | None = None


class History:
    """The recent edits a caller applied, for the allocator's hysteresis (`cooldown_steps`).

    After applying a step's edits, call `record(result.edits)`; pass the `History` as the next
    `focus(..., history=...)`. Entries older than `horizon` steps are dropped (keep it >= the
    `cooldown_steps` you use).
    """

    MAX_ENTRIES = 1024  # the service accepts at most this many

    def __init__(self, horizon: int = 16) -> None:
        self.horizon = horizon
        self._entries: list[dict[str, Any]] = []

    def record(self, edits: Iterable[Edit]) -> None:
        """One focus step happened and these edits were applied."""
        aged = [{**entry, "age": entry["age"] + 1} for entry in self._entries if entry["age"] < self.horizon]
        fresh = [{"action": e.action, "lod": e.node_lod, "position": e.position, "age": 1} for e in edits]
        self._entries = (fresh + aged)[: self.MAX_ENTRIES]  # newest first

    def entries(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._entries]

    def copy(self) -> History:
        twin = History(self.horizon)
        twin._entries = self.entries()
        return twin


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`decode;dur=0.3, model;dur=1.2` → {"decode": 0.3, "model": 1.2} (milliseconds)."""
    timings = {}
    for item in (header or "").split(","):
        name, _, params = item.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                timings[name] = float(value)
    return timings


def _index_array(values: object, name: str) -> np.ndarray:
    """Integer metadata as sent: int8 for small values (lod), int64 otherwise; never a lossy cast
    (a float or out-of-range value would turn a caller bug into a valid-looking snapshot)."""
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name}: expected integers, got dtype {array.dtype}")
    if array.size and array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: values beyond int64")
    small = array.size and array.min() >= 0 and array.max() <= np.iinfo(np.int8).max
    return array.astype(np.int8 if small else np.int64)


def _float_array(values: object) -> np.ndarray:
    """Embeddings as sent: float16 or float32 kept, anything else as float32."""
    array = np.asarray(values)
    return array if array.dtype in (np.float16, np.float32) else array.astype(np.float32)


def _array_json(array: np.ndarray) -> dict[str, Any]:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode()}


def _from_json(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        raw = base64.b64decode(value["data"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"]).newbyteorder("<")).reshape(value["shape"])
    return np.asarray(value, dtype=np.float32)


class _Protocol:
    """Request building and response parsing shared by both clients (no I/O)."""

    def __init__(self, fmt: Format, retries: int, backoff: float, max_backoff: float) -> None:
        if fmt not in ("binary", "json"):
            raise ValueError(f"format must be 'binary' or 'json', got {fmt!r}")
        self.format, self.retries, self.backoff, self.max_backoff = fmt, retries, backoff, max_backoff
        self.media_type = frame.MEDIA_TYPE if fmt == "binary" else "application/json"

    def build(
        self,
        embeddings: np.ndarray,
        lod: np.ndarray,
        positions: np.ndarray,
        fields: dict[str, Any],
        deadline_ms: float | None,
    ) -> tuple[bytes, dict[str, str]]:
        arrays = {
            "embeddings": _float_array(embeddings),
            "lod": _index_array(lod, "lod"),
            "positions": _index_array(positions, "positions"),
        }
        return self.pack(arrays, fields, deadline_ms)

    def pack(
        self, arrays: dict[str, np.ndarray], fields: dict[str, Any], deadline_ms: float | None
    ) -> tuple[bytes, dict[str, str]]:
        """A body of `fields` and `arrays` in this client's format, and its headers."""
        if self.format == "binary":
            content = frame.pack(fields, arrays)
        else:
            content = json.dumps({**fields, **{k: _array_json(v) for k, v in arrays.items()}}).encode()
        headers = {"content-type": self.media_type, "accept": self.media_type}
        if deadline_ms is not None:
            headers["x-request-timeout-ms"] = str(deadline_ms)
        return content, headers

    def document(self, response: httpx.Response) -> tuple[dict[str, Any], np.ndarray | None]:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:200]}
            raise FocusError(response.status_code, problem)
        if response.headers.get("content-type", "").startswith(frame.MEDIA_TYPE):
            document, arrays = frame.unpack(response.content)
            return document, arrays.get("scores")
        document = response.json()
        scores = document.pop("scores", None)
        return document, None if scores is None else _from_json(scores)

    def focus_result(self, response: httpx.Response) -> FocusResult:
        document, scores = self.document(response)
        return FocusResult(
            edits=tuple(Edit(**edit) for edit in document["edits"]),
            length_before=document["length_before"],
            length_after=document["length_after"],
            budget_met=document["budget_met"],
            budget_note=document["budget_note"],
            counters=document["counters"],
            model=document["model"],
            timings_ms=document["timings_ms"],
            server_timing=parse_server_timing(response.headers.get("server-timing")),
            scores=scores,
            decision_id=document.get("decision_id"),
            session_id=document.get("session_id"),
            version=document.get("version"),
        )

    def feedback_request(self, items: Iterable[tuple[str, int, float]]) -> tuple[bytes, dict[str, str]]:
        """The body of one /v1/feedback call: (decision_id, edit index, delta_nll) per item."""
        body = {"items": [{"decision_id": d, "edit": int(e), "delta_nll": float(v)} for d, e, v in items]}
        return json.dumps(body).encode(), {"content-type": "application/json"}

    def score_result(self, response: httpx.Response) -> ScoreResult:
        document, scores = self.document(response)
        if scores is None:
            raise FocusError(response.status_code, {"detail": "the response carried no scores"})
        return ScoreResult(
            scores,
            document["model"],
            document["timings_ms"],
            parse_server_timing(response.headers.get("server-timing")),
        )

    def focus_request(
        self,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
        w_max: int,
        options: Mapping[str, Any],
        history: History | Sequence[Mapping[str, Any]] | None,
        return_scores: bool,
        deadline_ms: float | None,
    ) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one /v1/focus call (options left out stay server defaults)."""
        entries = history.entries() if isinstance(history, History) else [dict(h) for h in history or ()]
        chosen = {key: value for key, value in options.items() if value is not None}
        fields = {"options": {"w_max": w_max, **chosen}, "history": entries, "return_scores": return_scores}
        return self.build(*arrays, fields, deadline_ms)

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to stop retrying."""
        if attempt >= self.retries or (response is not None and response.status_code not in RETRY_STATUSES):
            return None
        delay = self.backoff * 2**attempt
        retry_after = response.headers.get("retry-after", "") if response is not None else ""
        if retry_after.replace(".", "", 1).isdigit():  # seconds; an HTTP-date keeps the backoff
            delay = max(delay, float(retry_after))
        return delay if delay <= self.max_backoff else None


class FocusClient:
    """Blocking client. `FocusClient("http://127.0.0.1:8000").focus(emb, lod, pos, w_max=8000)`."""

    def __init__(
        self,
        base_url: str,
        *,
        format: Format = "binary",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.01,
        max_backoff: float = 2.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.protocol = _Protocol(format, retries, backoff, max_backoff)
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> FocusClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = self.http.post(path, content=content, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if (delay := self.protocol.retry_delay(attempt, None)) is None:
                    raise
                response = None
            else:
                if (delay := self.protocol.retry_delay(attempt, response)) is None:
                    return response
            time.sleep(delay)
            attempt += 1

    def focus(
        self,
        embeddings: np.ndarray,
        lod: np.ndarray,
        positions: np.ndarray,
        *,
        w_max: int,
        history: History | Sequence[Mapping[str, Any]] | None = None,
        return_scores: bool = False,
        deadline_ms: float | None = None,
        **options: Any,
    ) -> FocusResult:
        """One focus step. `options`: tau_expand, tau_collapse, max_edits, aggregation,
        protect_recent, cooldown_steps (server defaults when omitted)."""
        request = self.protocol.focus_request(
            (embeddings, lod, positions), w_max, options, history, return_scores, deadline_ms
        )
        return self.protocol.focus_result(self._post("/v1/focus", *request))

    def score(
        self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, *, deadline_ms: float | None = None
    ) -> ScoreResult:
        request = self.protocol.build(embeddings, lod, positions, {}, deadline_ms)
        return self.protocol.score_result(self._post("/v1/score", *request))

    def feedback(self, items: Iterable[tuple[str, int, float]]) -> list[str]:
        """Send measured ΔNLLs, (decision_id, edit index, delta_nll) per item (README: Policy health);
        one result per item: matched, unknown_decision, expired_decision, bad_index or duplicate."""
        return self.protocol.document(self._post("/v1/feedback", *self.protocol.feedback_request(items)))[0]["results"]

    def model(self) -> dict[str, Any]:
        response = self.http.get("/v1/model")
        return self.protocol.document(response)[0]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class AsyncFocusClient:
    """The asyncio twin of `FocusClient` (same arguments, awaitable methods)."""

    def __init__(
        self,
        base_url: str,
        *,
        format: Format = "binary",
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.01,
        max_backoff: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.protocol = _Protocol(format, retries, backoff, max_backoff)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncFocusClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response: httpx.Response | None = await self.http.post(path, content=content, headers=headers)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if (delay := self.protocol.retry_delay(attempt, None)) is None:
                    raise
                response = None
            else:
                if (delay := self.protocol.retry_delay(attempt, response)) is None:
                    return response
            await asyncio.sleep(delay)
            attempt += 1

    async def focus(
        self,
        embeddings: np.ndarray,
        lod: np.ndarray,
        positions: np.ndarray,
        *,
        w_max: int,
        history: History | Sequence[Mapping[str, Any]] | None = None,
        return_scores: bool = False,
        deadline_ms: float | None = None,
        **options: Any,
    ) -> FocusResult:
        request = self.protocol.focus_request(
            (embeddings, lod, positions), w_max, options, history, return_scores, deadline_ms
        )
        return self.protocol.focus_result(await self._post("/v1/focus", *request))

    async def score(
        self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, *, deadline_ms: float | None = None
    ) -> ScoreResult:
        request = self.protocol.build(embeddings, lod, positions, {}, deadline_ms)
        return self.protocol.score_result(await self._post("/v1/score", *request))

    async def feedback(self, items: Iterable[tuple[str, int, float]]) -> list[str]:
        request = self.protocol.feedback_request(items)
        return self.protocol.document(await self._post("/v1/feedback", *request))[0]["results"]

    async def model(self) -> dict[str, Any]:
        return self.protocol.document(await self.http.get("/v1/model"))[0]

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False
