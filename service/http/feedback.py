"""POST /v1/feedback: a thin route over `PolicyHealth.feedback`.

The body is JSON, read up to `--max-body-bytes` (413 beyond), parsed and validated strictly (400
unparseable, 422 a wrong field, naming it); a valid batch always answers 200 with one result per
item (matched, unknown_decision, expired_decision, bad_index, duplicate).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect

from ..core import problems
from ..pipeline import _fields
from ..policy import FeedbackResponse, PolicyHealth, feedback_request
from .openapi import inline_schema, problem_responses


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, at most `limit` bytes (413 as soon as it is over, 400 if unparseable)."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise problems.Problem(
            415, "unsupported-media-type", "Unsupported Media Type", f"Content-Type: expected application/json, "
            f"got {media or 'nothing'}", field="Content-Type", expected="application/json", got=media or "nothing",
        )  # fmt: skip
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise problems.too_large("body", f"{limit} bytes", f"more than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise problems.Problem(
            499, "client-closed", "Client closed request", "the client disconnected before sending the whole body"
        ) from None
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise problems.malformed("body", "a JSON document", f"{type(exc).__name__}: {exc}"[:120]) from exc


def install(app: FastAPI, policy: PolicyHealth, max_items: int, max_body_bytes: int) -> None:
    """Add POST /v1/feedback to `app`."""
    model = feedback_request(max_items)

    @app.post(
        "/v1/feedback",
        summary="Measured ΔNLL of returned edits: matched to their decisions, fed to the policy-health gauges",
        response_model=FeedbackResponse,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}
        },
        responses=problem_responses((400, 413, 415, 422)),
    )
    async def feedback(request: Request) -> dict[str, Any]:
        body = _fields(model, await read_json(request, max_body_bytes))
        return policy.feedback(body.items)  # type: ignore[attr-defined]
