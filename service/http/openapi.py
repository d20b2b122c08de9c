"""OpenAPI documentation (/docs) for the endpoints that read their bodies themselves.

/v1/focus and /v1/score are plain ASGI endpoints that accept two content types and decode arrays
without pydantic (that would take seconds for 8k × D lists), so their operations and
request/response schemas are declared here and added to the generated document.
"""

from __future__ import annotations

from typing import Any, Literal, get_type_hints

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, create_model

from lensnet_client.frame import MEDIA_TYPE as FRAME
from lensnet_client.layout import Edit

from ..core.allocator import REJECT_REASONS
from ..core.codec import EMBEDDING_DTYPES, INDEX_DTYPES
from ..core.problems import MEDIA_TYPE as PROBLEM
from ..pipeline import FocusFields, StepFields


class ArrayObject(BaseModel):
    """A numeric array as base64 of its little-endian bytes."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal[EMBEDDING_DTYPES + INDEX_DTYPES]  # type: ignore[valid-type]
    shape: list[int]
    data: str = Field(description="base64")


Embeddings = list[list[float]] | ArrayObject
Integers = list[int] | ArrayObject


class SnapshotArrays(BaseModel):
    embeddings: Embeddings = Field(description="[N, D] float16 or float32 (D = the model's, see /v1/model)")
    lod: Integers = Field(description="[N] level of detail of each entry, 0 … max LOD")
    positions: Integers = Field(description="[N] span start of each entry, in tokens")


class FocusRequest(SnapshotArrays, FocusFields):
    """A WC snapshot plus allocator options."""


class DeltaArrays(BaseModel):
    created: Embeddings | None = Field(None, description="[M, D] rows the applied edits create, in edit order")
    append_embeddings: Embeddings | None = Field(None, description="[K, D] entries appended at the tail")
    append_lod: Integers | None = Field(None, description="[K]")
    append_positions: Integers | None = Field(None, description="[K], continuing the WC")


class StepRequest(DeltaArrays, StepFields):
    """A session step: the applied edits (with the rows they create), a head trim, appended entries."""


class ScoreRequest(SnapshotArrays):
    """A WC snapshot."""


class ModelRef(BaseModel):
    name: str
    version: str
    precision: Literal["fp32", "fp16"]
    provider: str


EditDoc = create_model("Edit", **{name: (kind, ...) for name, kind in get_type_hints(Edit).items()})  # type: ignore[call-overload]
Rejected = create_model("Rejected", **{reason: (int, ...) for reason in REJECT_REASONS})  # type: ignore[call-overload]


class Counters(BaseModel):
    candidates: dict[Literal["expand", "collapse"], int]
    clamped: dict[Literal["expand", "collapse"], int] = Field(description="scores that asked for an illegal action")
    rejected: Rejected  # type: ignore[valid-type]


class ScoreResponse(BaseModel):
    model: ModelRef
    timings_ms: dict[str, float] = Field(description="receive, queue, decode, model, allocate, telemetry")
    scores: list[float] | ArrayObject = Field(description="[N] in [-1, 1], float32")


class FocusResponse(BaseModel):
    model: ModelRef
    timings_ms: dict[str, float]
    length_before: int
    length_after: int
    budget_met: bool
    budget_note: str | None = Field(description="why the WC is still over w_max, when it is")
    edits: list[EditDoc] = Field(description="disjoint, ordered by index; apply from the last to the first")  # type: ignore[valid-type]
    counters: Counters
    scores: list[float] | ArrayObject | None = Field(None, description="only with return_scores")


class SessionResponse(FocusResponse):
    session_id: str
    version: int = Field(description="the session's version after this answer (send it with the next step)")


class SessionInfo(BaseModel):
    session_id: str
    version: int
    n: int
    bytes: int
    age_s: float
    idle_s: float
    options: dict[str, Any]
    history_entries: int


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    field: str | None = None
    expected: str | None = None
    got: str | None = None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


SESSION_ERRORS = ((404, "session not found: create it again"), (409, "version conflict (current_version)"))


def _operation(
    name: str, summary: str, request: type[BaseModel], response: type[BaseModel], status: str = "200",
    session: bool = False,
) -> dict[str, Any]:  # fmt: skip
    frame_body = {"schema": {"type": "string", "format": "binary"}, "example": "(see README: binary frame)"}
    errors = {
        str(code): {"description": text, "content": {PROBLEM: {"schema": _ref(Problem)}}}
        for code, text in (
            (400, "malformed body or header"), (406, "unacceptable Accept"), (413, "body or N too large"),
            (415, "unsupported Content-Type"), (422, "invalid field: shape, dtype, layout, option, non-finite"),
            (429, "overloaded (Retry-After)"), (500, "model error"), (503, "not ready or shutting down (Retry-After)"),
            (504, "deadline exceeded"),
        ) + (SESSION_ERRORS if session else ())
    }  # fmt: skip
    return {
        "summary": summary,
        "operationId": name,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(request)}, FRAME: frame_body},
        },
        "parameters": [
            *([SESSION_ID] if session else []),
            {
                "name": "X-Request-Timeout-Ms",
                "in": "header",
                "required": False,
                "schema": {"type": "number"},
                "description": "deadline in ms from arrival; a request that cannot make it gets 504",
            },
        ],
        "responses": {
            status: {
                "description": "OK (Server-Timing header: per-stage milliseconds)",
                "content": {"application/json": {"schema": _ref(response)}, FRAME: frame_body},
            },
            **errors,
        },
    }


SESSION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
OPERATIONS = {
    "/v1/focus": _operation(
        "focus", "Score a WC snapshot and return legal, budgeted edits", FocusRequest, FocusResponse
    ),
    "/v1/score": _operation(
        "score", "Score a WC snapshot (no allocation), for analysis and A/B checks", ScoreRequest, ScoreResponse
    ),
    "/v1/sessions": _operation(
        "open_session",
        "Create a focus session from a full WC snapshot (answers like /v1/focus)",
        FocusRequest,
        SessionResponse,
        status="201",
    ),
    "/v1/sessions/{id}/focus": _operation(
        "step_session",
        "Apply a delta to the session's WC and answer like /v1/focus for the result",
        StepRequest,
        SessionResponse,
        session=True,
    ),
}
MANAGEMENT = {
    "get": {"summary": "What the session holds", "operationId": "session_info", "parameters": [SESSION_ID],
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": _ref(SessionInfo)}}},
                          "404": {"description": "session not found"}}},
    "delete": {"summary": "Delete the session", "operationId": "delete_session", "parameters": [SESSION_ID],
               "responses": {"204": {"description": "deleted"}, "404": {"description": "session not found"}}},
}  # fmt: skip


def install(app: FastAPI) -> None:
    """Add the operations and schemas above to the generated OpenAPI document."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            scoring = {path: {"post": operation} for path, operation in OPERATIONS.items()}
            document["paths"] = scoring | {"/v1/sessions/{id}": MANAGEMENT} | document["paths"]
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            models = (
                FocusRequest,
                ScoreRequest,
                FocusResponse,
                ScoreResponse,
                StepRequest,
                SessionResponse,
                SessionInfo,
            )
            for model in (*models, Problem):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
