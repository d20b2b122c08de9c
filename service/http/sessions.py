"""HTTP adapter for focus sessions: POST /v1/sessions, POST /v1/sessions/{id}/focus (scoring calls,
through the same admission, streaming decode, deadline and telemetry as /v1/focus), and
GET / DELETE /v1/sessions/{id}. The work is in `Pipeline` (open_session, step_session)."""

from __future__ import annotations

import json
import re
import secrets
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..core import codec, problems
from ..metrics import SESSION, SESSION_CREATE, SESSION_STEP
from ..pipeline import Pipeline
from .calls import CallSpec, Wire, negotiate_v1, problem_response

if TYPE_CHECKING:
    from .app import Service

_PATH = re.compile(r"/v1/sessions/(?P<id>[A-Za-z0-9_-]{1,64})(?P<focus>/focus)?")
CREATE = Wire(SESSION_CREATE, negotiate_v1(codec.SNAPSHOT), Pipeline.open_session, problem_response)
STEP = Wire(SESSION_STEP, negotiate_v1(codec.DELTA), Pipeline.step_session, problem_response)


class SessionEndpoints:
    """The /v1/sessions routes, as one ASGI endpoint (`template` says which paths are its own)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    @staticmethod
    def template(path: str) -> str | None:
        """The metrics label of a session path, or None for paths that are not session routes."""
        if path == SESSION_CREATE:
            return SESSION_CREATE
        match = _PATH.fullmatch(path)
        return None if match is None else SESSION_STEP if match["focus"] else SESSION

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            match = _PATH.fullmatch(path)
            if path == SESSION_CREATE:
                _allow(method, "POST")
                session_id = secrets.token_urlsafe(16)
                spec = CallSpec(session_id, 201, {"Location": f"{SESSION_CREATE}/{session_id}"})
                response = await self.service.serve(Request(scope, receive), CREATE, spec)
            elif match and match["focus"]:
                _allow(method, "POST")
                response = await self.service.serve(Request(scope, receive), STEP, CallSpec(match["id"]))
            else:
                response = self._manage(method, match["id"] if match else "")
        except problems.Problem as problem:
            response = problem_response(problem, path)
        await response(scope, receive, send)

    def _manage(self, method: str, session_id: str) -> Response:
        """GET (what the session holds) or DELETE: cheap, on the event loop."""
        _allow(method, "GET", "DELETE")
        pipeline = self.service.pipeline
        if pipeline is None:
            raise problems.unavailable("not-ready", "Model not ready", f"model {self.service.status}", 2)
        if method == "DELETE":
            pipeline.delete_session(session_id)
            return Response(status_code=204)
        return Response(json.dumps(pipeline.session_info(session_id)).encode(), media_type=codec.JSON)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise problems.Problem(
            405, "http-error", "Method Not Allowed", f"{method}: only {', '.join(allowed)}",
            headers={"Allow": ", ".join(allowed)},
        )  # fmt: skip
