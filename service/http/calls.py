"""What a scoring endpoint hands the service (which pipeline method runs, on which body schema,
for which session, answered how), and how a problem becomes a response."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import Response

from ..core import codec, problems
from ..pipeline import Call, Pipeline

Run = Callable[[Pipeline, Call], bytes]


@dataclass(frozen=True, slots=True)
class CallSpec:
    """A scoring call's body schema, the session it addresses, and its answer's status and headers."""

    schema: codec.Schema = codec.SNAPSHOT
    session: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def problem_response(problem: problems.Problem, instance: str) -> Response:
    return Response(
        problem.body(instance), status_code=problem.status, media_type=problems.MEDIA_TYPE, headers=problem.headers
    )
