"""POST /v1/feedback: a thin route over `PolicyHealth.feedback`.

The body is JSON, read like every request body (413 beyond `--max-body-bytes`, 408 when too
slow), then parsed and validated strictly (400 unparseable, 422 a wrong field, naming it) and
matched in the policy's thread, off the event loop (README, "Policy health"). At most
`MAX_PENDING` batches wait for it; beyond, 429 with Retry-After. A valid batch always answers 200
with one result per item, encoded by the policy (FastAPI's response validation and encoding would
walk every item in Python on the event loop).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..core import problems
from ..pipeline import validation_problem
from ..policy import FeedbackBody, FeedbackResponse, PolicyHealth
from ..settings import Settings
from .openapi import inline_schema, problem_responses
from .upload import declared_length, read_body

MAX_PENDING = 16  # feedback batches waiting for the feedback thread; beyond: 429


class _WholeBody:
    """A body kept whole for its pydantic model (feedback is not a snapshot: no codec reader)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def feed(self, chunk: bytes, more: bool) -> None:
        self.chunks.append(chunk)

    def close(self) -> None:
        pass


async def read_json_body(request: Request, settings: Settings) -> bytes:
    """The request's body, which must be JSON, read like every other body (`upload.read_body`):
    413 as soon as it is over --max-body-bytes, 408 when it arrives too slowly."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise problems.Problem(
            415, "unsupported-media-type", "Unsupported Media Type", f"Content-Type: expected application/json, "
            f"got {media or 'nothing'}", field="Content-Type", expected="application/json", got=media or "nothing",
        )  # fmt: skip
    declared_length(request, settings.max_body_bytes)
    body = _WholeBody()
    try:
        await read_body(request, body, settings)
    except ClientDisconnect:
        raise problems.Problem(
            499, "client-closed", "Client closed request", "the client disconnected before sending the whole body"
        ) from None
    return b"".join(body.chunks)


def install(app: FastAPI, policy: PolicyHealth, settings: Settings) -> None:
    """Add POST /v1/feedback to `app`."""
    parser = FeedbackBody(settings.feedback_max_items)
    model = parser.model
    pending = 0

    def handle(body: bytes) -> bytes:
        try:
            batch = parser.parse(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            if error["type"] == "json_invalid":
                raise problems.malformed("body", "a JSON document", error["msg"][:120]) from exc
            raise validation_problem(exc, model) from exc
        return policy.feedback(batch)

    @app.post(
        "/v1/feedback",
        summary="Measured ΔNLL of returned edits: matched to their decisions, fed to the policy-health gauges",
        response_model=FeedbackResponse,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}
        },
        responses=problem_responses((400, 408, 413, 415, 422, 429)),
    )
    async def feedback(request: Request) -> Response:
        nonlocal pending
        if pending >= MAX_PENDING:
            raise problems.unavailable(
                "overloaded", "Overloaded", f"{pending} feedback batches waiting; send fewer, larger ones", 1, 429
            )
        pending += 1
        try:
            body = await read_json_body(request, settings)
            answer = await asyncio.get_running_loop().run_in_executor(policy.executor, handle, body)
            return Response(answer, media_type="application/json")
        finally:
            pending -= 1
