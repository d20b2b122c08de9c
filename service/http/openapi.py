"""OpenAPI documentation (/docs) for the endpoints that read their bodies themselves.

/v1/focus, /v1/score and the session routes are plain ASGI endpoints that accept two content
types and decode arrays without pydantic (that would take seconds for 8k × D lists), and
/v1/feedback reads its batches in bulk, so their operations and request/response schemas are
declared here and added to the generated document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_type_hints

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, create_model

from lensnet_client.frame import MEDIA_TYPE as FRAME
from lensnet_client.layout import POSITION_LIMIT, Edit

from ..core.allocator import REJECT_REASONS
from ..core.codec import EMBEDDING_DTYPES, INDEX_DTYPES
from ..core.problems import MEDIA_TYPE as PROBLEM
from ..pipeline import FocusFields, StepFields
from ..policy import FeedbackResponse


class ArrayObject(BaseModel):
    """A numeric array as base64 of its little-endian bytes."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal[EMBEDDING_DTYPES + INDEX_DTYPES]  # type: ignore[valid-type]
    shape: list[int]
    data: str = Field(description="base64")


# N >= 1 entries (and D >= 1 values each), as the service requires.
Embeddings = Annotated[list[Annotated[list[float], Field(min_length=1)]], Field(min_length=1)] | ArrayObject
Integers = Annotated[list[int], Field(min_length=1)] | ArrayObject


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
    decision_id: str = Field(description="names this decision in POST /v1/feedback (README: Policy health)")
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
    placed: bool = Field(description="the rows are placed for applying every edit of the last answer")


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


ERRORS = {
    400: "malformed body or header", 405: "method other than POST (Allow)", 406: "unacceptable Accept",
    408: "request body too slow (the connection is closed)", 413: "body or N too large",
    415: "unsupported Content-Type", 422: "invalid field: shape, dtype, layout, option, non-finite",
    429: "overloaded (Retry-After)", 500: "internal or model error", 503: "not ready or shutting down (Retry-After)",
    504: "deadline exceeded", 404: "session not found: create it again", 409: "version conflict (current_version)",
}  # fmt: skip


def problem_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    """An OpenAPI response that is a problem+json document (with `Retry-After` for 429/503)."""
    response: dict[str, Any] = {"description": description, "content": {PROBLEM: {"schema": _ref(Problem)}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "seconds"}}
    return response


def problem_responses(codes: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses, each an RFC 9457 problem."""
    return {str(code): problem_response(ERRORS[code], retry_after=code in (429, 503)) for code in codes}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its $defs substituted in place (for an operation's own body schema)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


SESSION_ERRORS = (404, 409)


def _operation(
    name: str, summary: str, request: type[BaseModel], response: type[BaseModel], status: str = "200",
    session: bool = False,
) -> dict[str, Any]:  # fmt: skip
    frame_body = {"schema": {"type": "string", "format": "binary"}, "example": "(see README: binary frame)"}
    codes = (400, 405, 406, 408, 413, 415, 422, 429, 500, 503, 504) + (SESSION_ERRORS if session else ())
    errors = problem_responses(codes)
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
                "schema": {"type": "number", "exclusiveMinimum": 0},
                "description": "deadline in ms from arrival (finite, > 0); a request that cannot make it gets 504",
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


def _pin_to_model(schemas: dict[str, Any], embed_dim: int, max_lod: int) -> None:
    """State the loaded model's D (values per embedding row) and LOD range in the request schemas."""
    for name in ("FocusRequest", "ScoreRequest"):
        properties = schemas[name]["properties"]
        properties["embeddings"]["anyOf"][0]["items"].update(minItems=embed_dim, maxItems=embed_dim)
        properties["lod"]["anyOf"][0]["items"].update(minimum=0, maximum=max_lod)
        properties["positions"]["anyOf"][0]["items"].update(minimum=0, exclusiveMaximum=POSITION_LIMIT)


def feedback_operation(request: type[BaseModel]) -> dict[str, Any]:
    """POST /v1/feedback, whose body model carries the configured batch bound."""
    return {
        "summary": "Measured ΔNLL of returned edits: matched to their decisions, fed to the policy-health gauges",
        "operationId": "feedback",
        "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(request)}}},
        "responses": {
            "200": {
                "description": "OK: one result per item",
                "content": {"application/json": {"schema": _ref(FeedbackResponse)}},
            },
            **problem_responses((400, 405, 408, 413, 415, 422, 429, 500)),
        },
    }


def install(app: FastAPI, embed_dim: int, max_lod: int, feedback: type[BaseModel]) -> None:
    """Add the operations and schemas above to the generated OpenAPI document, for a model of
    `embed_dim` and `max_lod`, and feedback bodies of model `feedback`."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            scoring = {path: {"post": operation} for path, operation in OPERATIONS.items()}
            plain = {"/v1/sessions/{id}": MANAGEMENT, "/v1/feedback": {"post": feedback_operation(feedback)}}
            document["paths"] = scoring | plain | document["paths"]
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            models = (
                FocusRequest,
                ScoreRequest,
                FocusResponse,
                ScoreResponse,
                StepRequest,
                SessionResponse,
                SessionInfo,
                FeedbackResponse,
            )
            for model in (*models, Problem):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            _pin_to_model(schemas, embed_dim, max_lod)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
