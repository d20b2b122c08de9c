"""The Open Inference Protocol (KServe v2) over HTTP/REST: health, server and model metadata,
Triton's model configuration (what perf_analyzer reads), and scoring.

Scoring (`POST /v2/models/{name}[/versions/{version}]/infer` for this model) is served by the same
request path as /v1/score (`app.Service.serve` with this module's `negotiate` and
`error_response`); the routes here answer the rest, and an infer request for another model.
Errors are the protocol's `{"error": "..."}` with the same status codes as /v1. Health answers
200 for true and 400 for false, with an empty body, as the protocol says.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response

from model_export.artifact import Manifest

from ..core import codec, oip, problems
from ..pipeline import Pipeline
from ..settings import Settings

if TYPE_CHECKING:
    from .app import Service

INFER = "/v2/infer"  # the metrics label of every infer path
SERVER = "lensnet-focus"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
PLATFORM = "onnx_onnxv1"  # the protocol's name for an ONNX model run by ONNX Runtime


def infer_paths(manifest: Manifest) -> tuple[str, str]:
    """This model's infer paths, without and with its version."""
    base = f"/v2/models/{manifest.model.name}"
    return f"{base}/infer", f"{base}/versions/{manifest.model.version}/infer"


def negotiate(
    request: Request, pipeline: Pipeline, settings: Settings, length: int | None
) -> tuple[codec.BodyReader, str]:
    """The reader for an `$inference_request` (any Content-Type: tritonclient sends none); the
    answer's media type follows the request's binary_data settings, so the second value is unused."""
    encoding = request.headers.get("content-encoding", "identity")
    if encoding.lower() != "identity":
        raise problems.Problem(
            415, "unsupported-media-type", "Unsupported content encoding",
            f"Content-Encoding: expected identity (send the body uncompressed), got {encoding}",
            field="Content-Encoding", expected="identity", got=encoding,
        )  # fmt: skip
    raw = request.headers.get(oip.HEADER_LENGTH)
    if raw is not None and not raw.isdigit():
        raise problems.Problem(
            400, "invalid-header", "Invalid header", f"{oip.HEADER_LENGTH}: expected a byte count, got {raw}",
            field=oip.HEADER_LENGTH, expected="a non-negative integer", got=raw,
        )  # fmt: skip
    header_length = None if raw is None else int(raw)
    reader = oip.InferReader(
        pipeline.config.embed_dim, settings.max_entries, pipeline.scorer.input_dtype, length, header_length,
        settings.stream_min_bytes,
    )  # fmt: skip
    return reader, codec.JSON


def error_response(problem: problems.Problem, instance: str = "") -> Response:
    """The protocol's error object (it has no `instance`); the status and headers (Retry-After,
    Allow) are the /v1 ones."""
    return _error(problem.status, problem.detail, problem.headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type=codec.JSON, headers=headers)


def _health(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


def router(service: Service) -> APIRouter:
    """The v2 routes other than this model's infer."""
    api = APIRouter(tags=["Open Inference Protocol (KServe v2)"])
    model = service.manifest.model

    def unknown(name: str, version: str | None) -> Response | None:
        """404 unless `name` (and `version`, when given) are the loaded model's."""
        if name == model.name and version in (None, model.version):
            return None
        asked = name if version is None else f"{name} version {version}"
        return _error(404, f"unknown model {asked}: this server has {model.name} version {model.version}")

    def versioned(path: str, summary: str, method: str = "GET", openapi: dict[str, Any] | None = None) -> Any:
        """Register `handler(name, version)` on `path` (version None) and on its `/versions/{version}` twin."""

        def register(handler: Callable[[str, str | None], Awaitable[Response]]) -> Any:
            async def latest(name: str) -> Response:
                return await handler(name, None)

            async def chosen(name: str, version: str) -> Response:
                return await handler(name, version)

            for route, endpoint in ((path.format(v=""), latest), (path.format(v="/versions/{version}"), chosen)):
                api.add_api_route(route, endpoint, methods=[method], summary=summary, openapi_extra=openapi)
            return handler

        return register

    @api.get("/v2", summary="Server metadata")
    async def server_metadata() -> Response:
        document = {"name": SERVER, "version": package_version(SERVER), "extensions": EXTENSIONS}
        return Response(json.dumps(document), media_type=codec.JSON)

    @api.get("/v2/health/live", summary="Server live: 200, or 400 once the model failed to load")
    async def live() -> Response:
        return _health(service.load_error is None)

    @api.get("/v2/health/ready", summary="Server ready: 200 when the model is loaded, warmed up and not draining")
    async def ready() -> Response:
        return _health(service.status == "ready")

    @versioned("/v2/models/{{name}}{v}/ready", "Model ready: 200, 400 while not ready, 404 for another model")
    async def model_ready(name: str, version: str | None) -> Response:
        return unknown(name, version) or _health(service.status == "ready")

    @versioned("/v2/models/{{name}}{v}", "Model metadata: inputs and outputs as the loaded graph wants them")
    async def model_metadata(name: str, version: str | None) -> Response:
        pipeline = service.pipeline
        if refused := unknown(name, version) or not_loaded(pipeline):
            return refused
        tensors = _tensors(pipeline)
        document = {"name": model.name, "versions": [model.version], "platform": PLATFORM, **tensors}
        return Response(json.dumps(document), media_type=codec.JSON)

    @versioned("/v2/models/{{name}}{v}/config", "Model configuration (Triton's extension; perf_analyzer reads it)")
    async def model_config(name: str, version: str | None) -> Response:
        pipeline = service.pipeline
        if refused := unknown(name, version) or not_loaded(pipeline):
            return refused
        tensors = _tensors(pipeline)

        def config(tensor: dict[str, Any]) -> dict[str, Any]:
            return {"name": tensor["name"], "data_type": f"TYPE_{tensor['datatype']}", "dims": tensor["shape"]}

        document = {
            "name": model.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "max_batch_size": 0,  # no batching axis managed by the server: the shapes' leading 1 is the batch
            "input": [config(t) for t in tensors["inputs"]], "output": [config(t) for t in tensors["outputs"]],
        }  # fmt: skip
        return Response(json.dumps(document), media_type=codec.JSON)

    @versioned("/v2/models/{{name}}{v}/infer", "Inference (scoring), served like /v1/score", "POST", INFER_DOC)
    async def other_model_infer(name: str, version: str | None) -> Response:
        return unknown(name, version) or _error(404, f"no such path for model {name}")

    def not_loaded(pipeline: Pipeline | None) -> Response | None:
        if pipeline is None:
            return _error(503, f"model {model.name} is not loaded yet ({service.status})", {"Retry-After": "2"})
        return None

    return api


_ERROR = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}
INFER_DOC = {  # the infer route's body is read by the scoring path, not by FastAPI: documented here
    "requestBody": {
        "required": True,
        "description": "An $inference_request with inputs embeddings [1, N, D], lod and positions [1, N] (JSON data), "
        "or that JSON followed by binary tensors (Inference-Header-Content-Length: the JSON's length).",
        "content": {"application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {
        "200": {"description": "An $inference_response with scores [1, N] FP32 (binary after the JSON when asked)",
                "content": {"application/json": {}, "application/octet-stream": {}}},
        **{str(code): {"description": text, "content": _ERROR} for code, text in (
            (400, "malformed body"), (404, "another model"), (413, "body or N too large"),
            (415, "compressed body"), (422, "invalid input: shape, datatype, layout, NaN/inf, parameter"),
            (429, "overloaded (Retry-After)"), (503, "not ready (Retry-After)"), (504, "deadline exceeded"),
        )},
    },
}  # fmt: skip


def _tensors(pipeline: Pipeline) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the loaded model, batch 1 (the leading 1); N varies (-1)."""
    embeddings = oip.datatype(pipeline.scorer.input_dtype)
    d = pipeline.config.embed_dim
    return {
        "inputs": [
            {"name": "embeddings", "datatype": embeddings, "shape": [1, -1, d]},
            {"name": "lod", "datatype": "INT64", "shape": [1, -1]},
            {"name": "positions", "datatype": "INT64", "shape": [1, -1]},
        ],
        "outputs": [{"name": oip.OUTPUT, "datatype": "FP32", "shape": [1, -1]}],
    }
