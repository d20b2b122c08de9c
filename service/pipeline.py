"""The request path as one synchronous function per endpoint (run off the event loop):

    body → decode/validate → score (ONNX Runtime) → allocate → encode, telemetry on the side.

The stateless endpoints are snapshot → decision functions. Focus sessions (`open_session`,
`step_session`) keep a WC per caller in `service.core.sessions`: a step decodes its delta, plans
it against the session (checked like a full snapshot), applies it (`apply`, undoable; the rows
were placed for the last answer's edits after it went out, `Reply.after`), then runs the same
stages as /v1/focus, and commits only once the answer is encoded, so a failed step leaves the
session as it was. Each stage ends on the call's stage clock. A `deadline` (perf_counter
time) passed by the end of the model stage gives 504, with nothing recorded as returned.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lensnet_client import frame
from lensnet_client import oip as oip_request
from lensnet_client.layout import POSITION_LIMIT, Layout, SnapshotError, synthetic_layout
from model_export.artifact import Manifest

from .core import codec, oip, problems, sessions
from .core.allocator import (
    MAX_COOLDOWN_STEPS,
    MAX_EDITS_LIMIT,
    Aggregation,
    Allocation,
    AllocatorOptions,
    Cooldown,
    HistoryItem,
    OptionsError,
    allocate,
    check_layout,
    cooldown_keys,
)
from .core.stages import StageClock
from .metrics import Metrics
from .policy import PolicyHealth
from .runtime import Scorer
from .shadow import ShadowScorer

log = logging.getLogger("lensnet.pipeline")
Fields = TypeVar("Fields", bound=BaseModel)
MAX_HISTORY = 1024  # entries; the client's History keeps at most this many
# Embedding magnitudes every precision serves: the fp16 graph's input range. Beyond it the fp32
# graph may still give finite scores (then they are answered); when it overflows instead, the
# input is refused (422), so only inputs within it can be a model fault (500 model-error).
SERVED_MAGNITUDE = float(np.finfo(np.float16).max)


class FocusOptions(BaseModel):
    """Allocator options; omitted ones take the allocator defaults (README, "The allocator"). The
    bounds are the allocator's, stated here too so that the OpenAPI document shows them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    w_max: int = Field(ge=1, description="WC budget in entries (required); over it, the least useful blocks collapse")
    tau_expand: float | None = Field(None, gt=0, le=1, description="expand when score >= tau_expand (0.5)")
    tau_collapse: float | None = Field(None, gt=0, le=1, description="collapse when block score <= -tau_collapse (0.5)")
    max_edits: int | None = Field(None, ge=1, le=MAX_EDITS_LIMIT, description="edits per step (8)")
    aggregation: Aggregation | None = Field(None, description="block score from children: mean | max | min (mean)")
    protect_recent: int | None = Field(None, ge=0, description="newest tokens never collapsed (0)")
    cooldown_steps: int | None = Field(
        None, ge=0, le=MAX_COOLDOWN_STEPS, description="hysteresis window in focus steps (2)"
    )


class HistoryEntry(BaseModel):
    """An edit applied in an earlier step (the client's `History` helper keeps these)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    action: Literal["expand", "collapse"]
    # The bounds are checked with the history (allocator.cooldown_keys); the schema states them.
    lod: int = Field(
        description="level of the gist node the edit removed (expand) or created (collapse), 1 … max LOD",
        json_schema_extra={"minimum": 1},
    )
    position: int = Field(
        description="that node's span start, in tokens (a multiple of B**lod)",
        json_schema_extra={"minimum": 0, "exclusiveMaximum": POSITION_LIMIT},
    )
    age: int = Field(description="focus steps ago (1 = the previous step)", json_schema_extra={"minimum": 1})


class FocusFields(BaseModel):
    """The non-array fields of a /v1/focus request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    options: FocusOptions
    history: list[HistoryEntry] = Field(default_factory=list, max_length=MAX_HISTORY)
    return_scores: bool = False


def _step_schema(schema: dict[str, Any]) -> None:
    """StepOptions in OpenAPI: no option has a default of its own (omitted: the session's), `null`
    is the allocator default, and `w_max` is never null."""
    for name, field in schema["properties"].items():
        field.pop("default", None)
        if name == "w_max":
            field.update(next(kind for kind in field.pop("anyOf") if kind.get("type") == "integer"))
        else:
            field["description"] += "; omitted: the session's, null: the allocator default"


class StepOptions(FocusOptions):
    """A session step's option overrides: omitted ones keep the session's (its creation options);
    `null` takes the allocator default instead, whatever the session's (a client that re-created
    its session with one step's overrides puts its defaults back this way)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_step_schema)
    w_max: int | None = Field(None, ge=1, description="WC budget in entries (the session's when omitted)")

    def over(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The options of this step: `defaults` (the session's) with these set over them."""
        given = self.model_dump(include=self.model_fields_set)
        if "w_max" in given and given["w_max"] is None:
            raise problems.invalid("options.w_max", "an integer >= 1 (the session's when omitted)", "null")
        chosen = {**defaults, **given}
        return {name: value for name, value in chosen.items() if value is not None}


class StepFields(BaseModel):
    """The non-array fields of a session step (POST /v1/sessions/{id}/focus)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: int = Field(description="the session's current version (the last answer's)")
    applied: list[int] | None = Field(
        None, max_length=MAX_EDITS_LIMIT, description="indices into the last answer's edits that were applied (all)"
    )
    trim_head: int = Field(0, ge=0, description="entries dropped from the head, after the applied edits")
    options: StepOptions = Field(default_factory=StepOptions)
    return_scores: bool = False


class ScoreFields(BaseModel):
    """/v1/score takes the arrays only."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OutputParameters(BaseModel):
    """A requested output's parameters (v2)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    binary_data: bool | None = Field(None, description="binary tensor data extension: this output as raw bytes")


class RequestedOutput(BaseModel):
    """A v2 `$request_output`: the model has one output, `scores`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Literal["scores"]
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class InferParameters(BaseModel):
    """A v2 request's parameters: only the binary tensor data extension's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    binary_data_output: bool = Field(False, description="every output as raw bytes unless it says otherwise")


class InferFields(BaseModel):
    """The non-tensor fields of a v2 `$inference_request` (scoring only: allocation is /v1/focus).
    Other request parameters (Triton's `timeout`, `priority`, `sequence_*`) are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    parameters: InferParameters = Field(default_factory=InferParameters)
    outputs: list[RequestedOutput] = Field(default_factory=list, max_length=1)

    @property
    def binary(self) -> bool:
        """Whether `scores` goes back as binary data (the output's own setting wins)."""
        chosen = self.outputs[0].parameters.binary_data if self.outputs else None
        return self.parameters.binary_data_output if chosen is None else chosen


def _fields(model: type[Fields], fields: dict[str, Any]) -> Fields:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise validation_problem(exc, model) from exc


def validation_problem(exc: ValidationError, model: type[BaseModel]) -> problems.Problem:
    """The 422 naming the first invalid field of `model`'s validation error, in the service's words."""
    error = exc.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    where = where or "body"
    got = repr(error.get("input"))[:80] if error["type"] != "missing" else "nothing"
    return problems.invalid(where, _expected(model, error), got)


# What a field of each kind must be, in the service's words rather than pydantic's.
_KINDS: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_EXPECTED = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "model_type": "an object", "dict_type": "an object", "list_type": "a list",
}  # fmt: skip
_BOUNDS = {
    "greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"), "less_than": ("<", "lt"),
}  # fmt: skip


def _expected(model: type[BaseModel], error: Any) -> str:
    """`expected` for a pydantic error on `model`: what the field at `error["loc"]` must be."""
    kind, context = error["type"], error.get("ctx") or {}
    parent: Any = model
    for part in error["loc"][:-1]:  # the model holding the field (list indices keep the item model)
        parent = _item_model(parent.model_fields[part].annotation) if isinstance(part, str) else parent
    name = error["loc"][-1] if error["loc"] else None
    if kind == "missing":
        return _describe(parent.model_fields[name].annotation)
    if kind == "extra_forbidden":
        known = ", ".join(parent.model_fields)
        return f"one of the fields {known}" if known else "no fields besides the arrays"
    if kind == "literal_error":
        return f"one of {context.get('expected')}"
    if kind == "too_long":
        return f"at most {context.get('max_length')} items"
    if kind in _BOUNDS:  # the field's whole range, not only the bound it missed
        metadata = parent.model_fields[name].metadata
        return " and ".join(f"{sign} {getattr(m, key)}" for sign, key in _BOUNDS.values() for m in metadata
                            if getattr(m, key, None) is not None)  # fmt: skip
    return _EXPECTED.get(kind, error["msg"])


def _item_model(annotation: Any) -> Any:
    """A model annotation as is; `list[Model]` as `Model`."""
    args = [arg for arg in get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return args[0] if args else annotation


def _describe(annotation: Any) -> str:
    """A field's type in words: an object with its required fields, or a plain kind."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        required = [name for name, field in annotation.model_fields.items() if field.is_required()]
        return "an object with " + ", ".join(required) if required else "an object"
    return _KINDS.get(annotation, str(annotation))


class Pipeline:
    """The endpoints over one model. `metrics` None records nothing (the warm-up's pipeline);
    `policy` None gives focus answers no decision_id (the warm-up's too)."""

    def __init__(
        self,
        scorer: Scorer,
        manifest: Manifest,
        metrics: Metrics | None,
        max_entries: int,
        store: sessions.SessionStore,
        policy: PolicyHealth | None = None,
    ) -> None:
        self.scorer, self.manifest, self.metrics, self.max_entries = scorer, manifest, metrics, max_entries
        self.store = store
        self.policy = policy
        self.shadow: ShadowScorer | None = None  # set once a --shadow-model-dir model has loaded
        self.config = manifest.config
        self.model = {
            "name": manifest.model.name,
            "version": manifest.model.version,
            "precision": scorer.precision,
            "provider": scorer.provider,
        }

    # -- stages ------------------------------------------------------------------------------

    def _decode(self, reader: codec.BodyReader, model: type[Fields]) -> tuple[codec.DecodedRequest, Fields, Layout]:
        request = reader.finish()
        fields = _fields(model, request.fields)
        snapshot = request.snapshot
        try:
            layout = check_layout(snapshot.lod, snapshot.positions, self.config.block_size, self.config.max_lod)
        except SnapshotError as exc:
            raise _snapshot_problem(exc) from exc
        return request, fields, layout

    def _score(self, snapshot: codec.Snapshot, layout: Layout, deadline: float | None) -> np.ndarray:
        try:
            scores, non_finite = self.scorer.score(snapshot.embeddings, layout.lod, layout.positions)
        except Exception as exc:  # ONNX Runtime failed (out of memory, device error …)
            if self.metrics:
                self.metrics.model_errors.inc()
            log.exception("inference failed")
            raise problems.Problem(500, "model-error", "Model error", "inference failed; see the service log") from exc
        if deadline is not None and time.perf_counter() > deadline:  # before any telemetry: nothing returned
            raise problems.Problem(
                504, "deadline-exceeded", "Deadline exceeded", "the model finished after the deadline"
            )
        if non_finite.any():  # the graph checks its input: no extra pass over N x D on the hot path
            row = int(np.argmax(non_finite))
            got = "NaN or inf"
            sent, served = np.finfo(snapshot.sent_dtype), np.finfo(snapshot.embeddings.dtype)
            if sent.max > served.max:  # the conversion to the graph's dtype turned it into inf
                got += f" (or a value beyond {served.dtype.name}'s range, ±{float(served.max):.6g})"
            raise problems.invalid(f"embeddings[{row}]", "finite values", got, index=row)
        if not np.isfinite(scores).all():
            _refuse_beyond_served_range(snapshot.embeddings)  # the client's input overflowed inside the graph
            if self.metrics:
                self.metrics.model_errors.inc()
            raise problems.Problem(500, "model-error", "Model error", "the model produced non-finite scores")
        return scores

    def _document(self, timings: dict[str, float]) -> dict[str, Any]:
        return {"model": self.model, "timings_ms": {k: round(v * 1e3, 4) for k, v in timings.items()}}

    def _allocator_inputs(
        self, chosen: dict[str, Any], history: Sequence[HistoryItem] | Callable[[int], Sequence[HistoryItem]]
    ) -> tuple[AllocatorOptions, Cooldown]:
        """Options and history, validated before the model runs (a bad one must not cost an inference).
        `history` may be a function of the cooldown window (a session's: only the recent entries)."""
        try:
            options = AllocatorOptions(block_size=self.config.block_size, max_lod=self.config.max_lod, **chosen)
        except OptionsError as exc:
            raise problems.invalid(f"options.{exc.field}", exc.expected, repr(exc.got)) from exc
        if callable(history):
            history = history(options.cooldown_steps)
        try:
            return options, cooldown_keys(history, options)
        except SnapshotError as exc:
            raise _snapshot_problem(exc) from exc

    def _decide(
        self, call: Call, stage: StageClock, snapshot: codec.Snapshot, layout: Layout, inputs: tuple[AllocatorOptions,
        Cooldown], return_scores: bool, style: codec.ArrayStyle, extra: dict[str, Any],
    ) -> tuple[Allocation, Reply]:  # fmt: skip
        """The stages after decoding, shared by /v1/focus and session calls: model, allocate, telemetry
        (with the shadow's sample and the decision id), encode."""
        scores = self._score(snapshot, layout, call.deadline)
        stage.done("model")
        allocation = allocate(layout, scores, *inputs)
        stage.done("allocate")
        if self.shadow:  # hands over the arrays (copied if sampled), or drops the sample: never waits
            self.shadow.offer(snapshot.embeddings, layout, *inputs, scores, allocation)
        if self.metrics:
            self.metrics.observe_scores(scores, layout.lod)
            self.metrics.observe_allocation(allocation)
        decision = self.decide(allocation, layout, scores, inputs[0], snapshot.embeddings)
        stage.done("telemetry")
        document = self._document(call.clock.timings) | _allocation_document(allocation) | extra | decision
        arrays = {"scores": scores} if return_scores else {}
        content = codec.encode_response(document, arrays, call.respond_as, style)
        stage.done("encode")
        return allocation, Reply(content, call.respond_as, {})

    def _session(self, session_id: str) -> sessions.Session:
        session = self.store.get(session_id)
        if session is None:
            self._resync("not_found")
            raise _not_found(session_id)
        return session

    def _resync(self, reason: str) -> None:
        if self.metrics:
            self.metrics.session_resyncs.labels(reason=reason).inc()

    def _memory_problem(self, nbytes: int) -> problems.Problem:
        limit = f"{self.store.memory_bytes} bytes of session state (--session-memory-bytes)"
        return problems.too_large("session", limit, f"{nbytes} bytes")

    def warmup(self, sizes: list[int]) -> None:
        """A focus request per size, end to end (a frame with a history, the model, the allocator,
        encoding), a one-entry JSON one and a one-entry binary v2 inference request, so the first
        real requests pay for no allocation, tuning or first-call imports (np.unique's alone costs
        8 ms)."""
        rng = np.random.default_rng(0)
        cfg = self.config
        history = [{"action": "collapse", "lod": 1, "position": 0, "age": 1}]
        tiny = json.dumps({"options": {"w_max": 1}, "history": history, "embeddings": [[0.0] * cfg.embed_dim],
                           "lod": [0], "positions": [0]}).encode()  # fmt: skip
        bodies = [(codec.JSON, tiny)]
        for n in sizes:
            lod, positions = synthetic_layout(n, cfg.block_size, cfg.max_lod, rng)
            embeddings = rng.standard_normal((n, cfg.embed_dim)).astype(np.float16)
            arrays = {"embeddings": embeddings, "lod": lod, "positions": positions}
            bodies.append((codec.FRAME, frame.pack({"options": {"w_max": n}, "history": history}, arrays)))
        for media, body in bodies:
            reader = codec.reader(media, cfg.embed_dim, self.max_entries, self.scorer.input_dtype, len(body), 0)
            reader.feed(body, more=False)
            reader.close()
            self.focus(Call(reader, media, None, StageClock(time.perf_counter())))
        one = {"embeddings": np.zeros((1, cfg.embed_dim), np.float16), "lod": np.zeros(1, np.int64),
               "positions": np.zeros(1, np.int64)}  # fmt: skip
        body, headers = oip_request.pack(one)
        length = int(headers[oip.HEADER_LENGTH])
        reader = oip.InferReader(cfg.embed_dim, self.max_entries, self.scorer.input_dtype, len(body), length, 0)
        reader.feed(body, more=False)
        reader.close()
        self.infer(Call(reader, codec.JSON, None, StageClock(time.perf_counter())))
        self._warm_session(min(64, self.max_entries), rng)

    def _warm_session(self, n: int, rng: np.random.Generator) -> None:
        """One small session, created and stepped once (all edits applied, 16 entries appended):
        the session path's first-call costs (the model's, per size, are paid above)."""
        cfg = self.config
        lod, positions = synthetic_layout(n, cfg.block_size, cfg.max_lod, rng)
        arrays = {"embeddings": rng.standard_normal((n, cfg.embed_dim)).astype(np.float16), "lod": lod,
                  "positions": positions}  # fmt: skip
        body = frame.pack({"options": {"w_max": n}}, arrays)
        answer, _ = frame.unpack(self.open_session(self._warm_call(body, codec.SNAPSHOT, "warm")).content)
        created = sum(edit["added"] for edit in answer["edits"])
        start = int(positions[-1]) + cfg.block_size ** int(lod[-1])
        delta = {
            "created": rng.standard_normal((created, cfg.embed_dim)).astype(np.float16),
            "append_embeddings": rng.standard_normal((16, cfg.embed_dim)).astype(np.float16),
            "append_lod": np.zeros(16, dtype=np.int64),
            "append_positions": np.arange(start, start + 16, dtype=np.int64),
        }
        self.step_session(self._warm_call(frame.pack({"version": 1}, delta), codec.DELTA, "warm"))
        self.delete_session("warm")

    def _warm_call(self, body: bytes, schema: codec.Schema, session_id: str) -> Call:
        cfg = self.config
        reader = codec.reader(codec.FRAME, cfg.embed_dim, self.max_entries, self.scorer.input_dtype, len(body), 0,
                              schema)  # fmt: skip
        reader.feed(body, more=False)
        reader.close()
        return Call(reader, codec.FRAME, None, StageClock(time.perf_counter()), session_id)

    # -- endpoints --------------------------------------------------------------------------

    def focus(self, call: Call) -> Reply:
        stage = call.clock
        request, fields, layout = self._decode(call.reader, FocusFields)
        inputs = self._allocator_inputs(fields.options.model_dump(exclude_none=True), _history(fields))
        stage.done("decode")
        return self._decide(call, stage, request.snapshot, layout, inputs, fields.return_scores, request.style, {})[1]

    def open_session(self, call: Call) -> Reply:
        """POST /v1/sessions: a /v1/focus call whose WC (and options, history) the process keeps
        as session `call.session`, version 1."""
        stage = call.clock
        request, fields, layout = self._decode(call.reader, FocusFields)
        chosen, history = fields.options.model_dump(exclude_none=True), _history(fields)
        inputs = self._allocator_inputs(chosen, history)
        rows = sessions.Rows(request.snapshot.embeddings)
        session = sessions.Session(call.session or "", rows, layout, chosen, sessions.stamped(history))
        held = sessions.held_bytes(rows.nbytes, layout, len(session.history), inputs[0].max_edits)  # with its answer
        if not self.store.fits(None, held):
            raise self._memory_problem(held)
        stage.done("decode")
        extra = {"session_id": session.id, "version": 1}
        allocation, reply = self._decide(
            call, stage, request.snapshot, layout, inputs, fields.return_scores, request.style, extra
        )
        session.edits = allocation.edits
        self.store.add(session)
        if self.metrics:
            self.metrics.session_creates.inc()
        stage.done("apply")  # keeping the session
        return reply._replace(after=functools.partial(self.place, session))

    def step_session(self, call: Call) -> Reply:
        """POST /v1/sessions/{id}/focus: apply the delta to the session's WC and answer like
        /v1/focus for the result; all or nothing."""
        stage = call.clock
        session = self._session(call.session or "")  # first: a gone session is a 404 whatever the body
        request = call.reader.finish()
        fields = _fields(StepFields, request.fields)
        with self._stepping(session, fields.version, stage):
            if fields.version != session.version:
                self._resync("version")
                raise _conflict(session, fields.version, f"version {fields.version} is not the session's current one")
            chosen = fields.options.over(session.options)  # a null w_max is refused before any planning
            delta = self._delta(request, fields)
            try:
                planned = sessions.plan(session, delta, self.config.embed_dim)
            except SnapshotError as exc:
                raise _snapshot_problem(exc) from exc
            except sessions.DeltaError as exc:
                raise problems.invalid(exc.field, exc.expected, exc.got, index=exc.index) from exc
            n = planned.layout.lod.size
            if n > self.max_entries:
                raise problems.too_large("resulting WC", f"{self.max_entries} entries", f"{n} entries")
            version = session.version + 1
            inputs = self._allocator_inputs(chosen, lambda window: sessions.ages(planned.history, version, window))
            growth = sessions.step_growth(session, planned, inputs[0].max_edits)
            if not self.store.fits(session, growth):
                raise self._memory_problem(session.nbytes + growth)
            stage.done("decode")
            step = None
            try:
                step = sessions.stage(session, delta, planned)  # as before any placement if it fails
                stage.done("apply")
                snapshot = codec.Snapshot(step.embeddings, planned.layout.lod, planned.layout.positions, "float32")
                extra = {"session_id": session.id, "version": session.version + 1}
                allocation, reply = self._decide(
                    call, stage, snapshot, planned.layout, inputs, fields.return_scores, request.style, extra
                )
            except BaseException:
                if step is not None:
                    step.rollback()
                self.store.update(session)  # a placement the step took is gone, rolled back or not
                raise
            step.commit(allocation.edits)
            self.store.update(session)  # under the session's lock: its size cannot change meanwhile
        if self.metrics:
            self.metrics.session_steps.inc()
        stage.done("apply")  # committing the step
        return reply._replace(after=functools.partial(self.place, session))

    @contextlib.contextmanager
    def _stepping(self, session: sessions.Session, version: int, stage: StageClock) -> Iterator[None]:
        """Hold `session` for one step: 409 while another step holds it; a placement of its rows
        (which starts no more once a step waits) is waited for, in the `apply` stage."""
        if not session.stepping.acquire(blocking=False):
            self._resync("version")
            raise _conflict(session, version, "another step of this session is in progress")
        try:
            if not session.lock.acquire(blocking=False):
                stage.done("decode")
                session.lock.acquire()
                stage.done("apply")
            try:
                yield
            finally:
                session.lock.release()
        finally:
            session.stepping.release()

    def place(self, session: sessions.Session) -> None:
        """After a session call's answer, on an inference thread: place the rows for its edits
        (`sessions.place`), unless a step holds or awaits the session (`busy`), it is gone, or the
        rows it sets aside do not fit the memory bound's free bytes (reserved before the move, so
        a placement never evicts another session)."""
        began, outcome = time.perf_counter(), "busy"
        if session.lock.acquire(blocking=False):
            try:
                if not session.stepping.locked():
                    outcome = sessions.place(session, functools.partial(self.store.reserve, session))
            except Exception:  # a bug or no memory: the next step applies the edits itself
                outcome = "error"
                log.exception("placing session %s's rows failed", session.id)
                self.store.update(session)  # the bytes reserved, if any, go back
            finally:
                session.lock.release()
        if self.metrics:
            self.metrics.session_placements.labels(outcome=outcome).inc()
            if outcome == "placed":
                self.metrics.session_placement_seconds.observe(time.perf_counter() - began)

    def _delta(self, request: codec.DecodedRequest, fields: StepFields) -> sessions.Delta:
        arrays, d, dtype = request.arrays, self.config.embed_dim, self.scorer.input_dtype
        rows = {name: arrays.get(name, np.empty((0, d), dtype)) for name in ("created", "append_embeddings")}
        k = rows["append_embeddings"].shape[0]
        lod, positions = (arrays.get(name, np.empty(k, np.int64)) for name in ("append_lod", "append_positions"))
        return sessions.Delta(fields.applied, rows["created"], fields.trim_head, rows["append_embeddings"], lod,
                              positions)  # fmt: skip

    def session_info(self, session_id: str) -> dict[str, Any]:
        """GET /v1/sessions/{id}: what the session holds (a look, not a resync: a 404 is not counted)."""
        session = self.store.peek(session_id)
        if session is None:
            raise _not_found(session_id)
        now = time.monotonic()
        return {
            "session_id": session.id,
            "version": session.version,
            "n": int(session.layout.lod.size),
            "bytes": session.nbytes,
            "age_s": round(now - session.created_at, 3),
            "idle_s": round(now - session.used_at, 3),
            "options": session.options,
            "history_entries": len(session.history),
            "placed": session.placed is not None,
        }

    def delete_session(self, session_id: str) -> None:
        """DELETE /v1/sessions/{id}."""
        if not self.store.remove(session_id):
            raise _not_found(session_id)

    def decide(
        self,
        allocation: Allocation,
        layout: Layout,
        scores: np.ndarray,
        options: AllocatorOptions,
        embeddings: np.ndarray | None = None,
    ) -> dict[str, str]:
        """`{"decision_id": …}` for an answer carrying `allocation`'s edits, made from `scores` (raw)
        over `layout` with `options`: remembered for POST /v1/feedback and, when sampled, traced.
        Every endpoint that returns edits calls this. Empty without a policy (the warm-up)."""
        if self.policy is None:
            return {}
        return {
            "decision_id": self.policy.decide(allocation, layout.lod, layout.positions, scores, options, embeddings)
        }

    def score(self, call: Call) -> Reply:
        request, _, scores, stage = self._scores(call, ScoreFields)
        content = codec.encode_response(
            self._document(call.clock.timings), {"scores": scores}, call.respond_as, request.style
        )
        stage.done("encode")
        return Reply(content, call.respond_as, {})

    def infer(self, call: Call) -> Reply:
        """Open Inference Protocol scoring: the same stages as `score`, answered as an `$inference_response`."""
        _, fields, scores, stage = self._scores(call, InferFields)
        content, header_length = oip.encode_response(self.model, fields.id, scores, fields.binary)
        stage.done("encode")
        if header_length is None:
            return Reply(content, codec.JSON, {})
        return Reply(content, oip.BINARY, {oip.HEADER_LENGTH: str(header_length)})

    def _scores(self, call: Call, model: type[Fields]) -> tuple[codec.DecodedRequest, Fields, np.ndarray, StageClock]:
        """decode → model → telemetry for the scoring endpoints; the stage timer goes on to `encode`."""
        stage = call.clock
        request, fields, layout = self._decode(call.reader, model)
        stage.done("decode")
        scores = self._score(request.snapshot, layout, call.deadline)
        stage.done("model")
        if self.metrics:
            self.metrics.observe_scores(scores, layout.lod)
        stage.done("telemetry")
        return request, fields, scores, stage


@dataclass(frozen=True, slots=True)
class Call:
    """One endpoint call: the request body's reader (the body is read; a frame's arrays are
    already in place), the answer's media type, an optional deadline (perf_counter time), and the
    request's stage clock, which the pipeline's stages go on."""

    reader: codec.BodyReader
    respond_as: str
    deadline: float | None
    clock: StageClock
    session: str | None = None  # the session a session call creates or steps


class Reply(NamedTuple):
    """An endpoint's answer: the body, its media type, any headers besides Server-Timing, and work
    to run after it on an inference thread (a session's placement), not awaited by the request."""

    content: bytes
    media_type: str
    headers: dict[str, str]
    after: Callable[[], None] | None = None


def _refuse_beyond_served_range(embeddings: np.ndarray) -> None:
    """422 for the first row holding a value beyond the served range, if any. Only runs once the
    scores came out non-finite from finite inputs, so the hot path pays nothing for it."""
    peaks = np.abs(embeddings).max(axis=1)
    beyond = np.flatnonzero(peaks > SERVED_MAGNITUDE)
    if beyond.size:
        row = int(beyond[0])
        expected = f"values within ±{SERVED_MAGNITUDE:g} (the range served on every precision)"
        raise problems.invalid(f"embeddings[{row}]", expected, f"a value of {float(peaks[row]):.3g}", index=row)


def _history(fields: FocusFields) -> list[HistoryItem]:
    return [HistoryItem(**entry.model_dump()) for entry in fields.history]


def _not_found(session_id: str) -> problems.Problem:
    return problems.Problem(
        404, "session-not-found", "Session not found",
        f"no session {session_id!r} in this process (never created, deleted, evicted, or held by another replica "
        "or worker): create it again from the full snapshot",
        session_id=session_id,
    )  # fmt: skip


def _conflict(session: sessions.Session, sent: int, why: str) -> problems.Problem:
    return problems.Problem(
        409, "session-version-conflict", "Session version conflict",
        f"{why}: the session is at version {session.version}; create it again from the full snapshot",
        field="version", expected=str(session.version), got=str(sent), current_version=session.version,
    )  # fmt: skip


def _snapshot_problem(exc: SnapshotError) -> problems.Problem:
    return problems.invalid(exc.field, exc.expected, str(exc.got), str(exc), rule=exc.rule, index=exc.index)


def _allocation_document(allocation: Allocation) -> dict[str, Any]:
    c = allocation.counters
    return {
        "length_before": allocation.length_before,
        "length_after": allocation.length_after,
        "budget_met": allocation.budget_met,
        "budget_note": allocation.budget_note,
        "edits": [edit._asdict() for edit in allocation.edits],
        "counters": {
            "candidates": {"expand": c.candidates_expand, "collapse": c.candidates_collapse},
            "clamped": {"expand": c.clamped_expand, "collapse": c.clamped_collapse},
            "rejected": c.rejected,
        },
    }
