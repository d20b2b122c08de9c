"""What a scoring endpoint hands the service: how it speaks (`Wire`: its metrics label, how it
reads a body and picks the answer's media type, which pipeline method answers, how a problem is
rendered) and what belongs to one call (`CallSpec`: the session it addresses, the answer's status
and headers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response

from ..core import codec, problems
from ..pipeline import Call, Pipeline, Reply
from ..settings import Settings

Negotiate = Callable[[Request, Pipeline, Settings, "int | None"], tuple[codec.BodyReader, str]]


@dataclass(frozen=True, slots=True)
class Wire:
    """How one scoring endpoint speaks (see the module docstring)."""

    label: str
    negotiate: Negotiate
    run: Callable[[Pipeline, Call], Reply]
    render: Callable[[problems.Problem, str], Response]


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call's session (the one it creates or steps) and its answer's status and extra headers."""

    session: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def negotiate_v1(schema: codec.Schema = codec.SNAPSHOT) -> Negotiate:
    """/v1's negotiation for bodies of `schema`: the reader by Content-Type (415 otherwise), the
    answer's media type by Accept (406)."""

    def negotiate(
        request: Request, pipeline: Pipeline, settings: Settings, length: int | None
    ) -> tuple[codec.BodyReader, str]:
        media = codec.request_media_type(request.headers.get("content-type"))
        respond_as = codec.response_media_type(request.headers.get("accept"), media)
        config = pipeline.config
        reader = codec.reader(
            media, config.embed_dim, settings.max_entries, pipeline.scorer.input_dtype, length,
            settings.stream_min_bytes, schema,
        )  # fmt: skip
        return reader, respond_as

    return negotiate


def problem_response(problem: problems.Problem, instance: str) -> Response:
    return Response(
        problem.body(instance), status_code=problem.status, media_type=problems.MEDIA_TYPE, headers=problem.headers
    )
