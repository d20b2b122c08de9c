"""POST /v1/feedback: a thin, plain ASGI endpoint over `PolicyHealth.feedback`.

The body is JSON, read like every request body (413 beyond `--max-body-bytes`, 408 when too
slow), then parsed and validated strictly (400 unparseable, 422 a wrong field, naming it) and
matched in the policy's thread, off the event loop (README, "Policy health"). At most
`MAX_PENDING` batches wait for it; beyond, 429 with Retry-After. A valid batch always answers 200
with one result per item, encoded by the policy. Served beside FastAPI, like the scoring
endpoints: at 10,000 items/s its middleware and routing are CPU taken from the focus requests'
model (README, "Policy health"); the operation is documented by `openapi.feedback_operation`.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..core import problems
from ..pipeline import validation_problem
from ..policy import FeedbackBody, PolicyHealth
from ..settings import Settings
from .calls import problem_response
from .upload import declared_length, read_body

log = logging.getLogger("lensnet.feedback")
PATH = "/v1/feedback"
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


class FeedbackEndpoint:
    """The /v1/feedback route: the policy's answer or a problem, always."""

    def __init__(self, policy: PolicyHealth, settings: Settings) -> None:
        self.policy, self.settings = policy, settings
        self.body = FeedbackBody(settings.feedback_max_items)
        self.pending = 0

    def handle(self, body: bytes) -> bytes:
        """The policy thread's side: parse (the model's error when invalid) and match."""
        try:
            batch = self.body.parse(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            if error["type"] == "json_invalid":
                raise problems.malformed("body", "a JSON document", error["msg"][:120]) from exc
            raise validation_problem(exc, self.body.model) from exc
        return self.policy.feedback(batch)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._answer(Request(scope, receive))
        except problems.Problem as problem:
            response = problem_response(problem, PATH)
        except Exception:  # a bug, not bad input: log it, answer 500, keep serving
            log.exception("unhandled error on %s", PATH)
            response = problem_response(problems.internal_error(), PATH)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        if request.method != "POST":
            detail = f"{request.method} {PATH}: only POST"
            raise problems.Problem(405, "http-error", "Method Not Allowed", detail, headers={"Allow": "POST"})
        if self.pending >= MAX_PENDING:
            raise problems.unavailable(
                "overloaded", "Overloaded", f"{self.pending} feedback batches waiting; send fewer, larger ones", 1, 429
            )
        self.pending += 1
        try:
            body = await read_json_body(request, self.settings)
            answer = await asyncio.get_running_loop().run_in_executor(self.policy.executor, self.handle, body)
        finally:
            self.pending -= 1
        return Response(answer, media_type="application/json")
