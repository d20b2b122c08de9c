"""HTTP adapter: the scoring endpoints and FastAPI routes over the pipeline, with admission
control and telemetry.

Endpoints stay thin: admit (429/503), read the body into its decoder (bounded), wait for an
inference slot (504 past the deadline), run the pipeline in the inference thread pool, answer
with `Server-Timing`. Every error is RFC 9457 problem+json.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from model_export.artifact import Manifest, load_manifest

from ..core import codec, problems
from ..core.sessions import SessionStore
from ..metrics import CONTENT_TYPE, Metrics
from ..pipeline import Call, Pipeline
from ..runtime import Scorer
from ..settings import Settings
from . import openapi
from .admission import Admission
from .calls import CallSpec, Run, problem_response
from .sessions import SessionEndpoints

log = logging.getLogger("lensnet.service")
TIMEOUT_HEADER = "x-request-timeout-ms"
REFUSALS = {
    "overloaded": "overload",
    "not-ready": "not_ready",
    "shutting-down": "shutting_down",
    "deadline-exceeded": "deadline",
    "too-large": "too_large",
}


class Service:
    """Everything one app instance owns: settings, artifact, model, admission, metrics."""

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings, self.manifest = settings, manifest
        self.metrics = Metrics(settings.latency_budget_ms / 1e3, manifest.config.max_lod)
        self.admission = Admission(settings.max_concurrency, settings.queue_size)
        self.executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="lensnet-infer")
        evicted = self.metrics.session_evictions
        self.sessions = SessionStore(
            settings.max_sessions, settings.session_memory_bytes, settings.session_ttl_s,
            on_evict=lambda reason: evicted.labels(reason=reason).inc(),
        )  # fmt: skip
        self.pipeline: Pipeline | None = None
        self.load_error: str | None = None

    @property
    def status(self) -> str:
        if self.admission.draining:
            return "draining"
        if self.load_error:
            return "failed"
        return "ready" if self.pipeline else "loading"

    def load(self) -> None:
        """Build the ONNX Runtime session and warm it up (in a thread; /readyz waits for it)."""
        try:
            s = self.settings
            scorer = Scorer(s.model_dir, self.manifest, s.precision, s.intra_op_threads, s.intra_op_spinning)
            warm = SessionStore(1, s.session_memory_bytes, s.session_ttl_s)
            Pipeline(scorer, self.manifest, None, s.max_entries, warm).warmup(s.warmup_sizes)
        except Exception:
            self.load_error = "the model failed to load; see the service log"
            log.exception("model failed to load")
            return
        graph = self.manifest.graphs[scorer.precision].file
        m = self.manifest.model
        self.metrics.set_model(m.name, m.version, scorer.precision, scorer.provider, self.manifest.files[graph].sha256)
        self.pipeline = Pipeline(scorer, self.manifest, self.metrics, self.settings.max_entries, self.sessions)
        if not self.admission.draining:
            self.metrics.model_ready.set(1)
        log.info("ready: %s %s, %s on %s", m.name, m.version, scorer.precision, scorer.provider)

    async def drain(self) -> None:
        """Stop taking work, then wait (up to the grace period) for admitted work to finish."""
        self.metrics.model_ready.set(0)
        finished = await self.admission.drain(self.settings.shutdown_grace_s)
        log.info("drained" if finished else "grace period over with requests still running")

    async def serve(self, request: Request, run: Run, call: CallSpec | None = None) -> Response:
        """Answer a scoring call with `run` (a Pipeline method); every failure leaves as a Problem
        (refusals counted)."""
        try:
            async with self.admission.request():
                return await self._serve(request, run, call or CallSpec())
        except problems.Problem as problem:
            if problem.slug in REFUSALS:
                self.metrics.refused.labels(reason=REFUSALS[problem.slug]).inc()
            raise
        except ClientDisconnect:  # gone mid-upload: nobody to answer (499 in the request metrics)
            log.info("client disconnected before its request body was read")
            raise problems.Problem(
                499, "client-closed", "Client closed request", "the client disconnected before sending the whole body"
            ) from None
        except Exception as exc:  # a bug, not bad input: log it, answer 500, keep serving
            log.exception("unhandled error on %s", request.url.path)
            raise problems.Problem(
                500, "internal-error", "Internal error", "the request failed; see the service log"
            ) from exc

    async def _serve(self, request: Request, run: Run, spec: CallSpec) -> Response:
        arrival = request.state.arrival
        pipeline = self.pipeline
        if pipeline is None:
            detail = f"model {self.status}" + (f": {self.load_error}" if self.load_error else "")
            raise problems.unavailable("not-ready", "Model not ready", detail, 2)
        media = codec.request_media_type(request.headers.get("content-type"))
        respond_as = codec.response_media_type(request.headers.get("accept"), media)
        deadline = self._deadline(request, arrival)
        self.admission.check_capacity()  # refuse before buffering a body we would refuse anyway
        body = body_reader(request, media, pipeline, self.settings, spec.schema)
        reading = time.perf_counter()
        await read_body(request, body, self.settings.max_body_bytes)
        received = time.perf_counter()
        timings = {"admit": reading - arrival, "receive": received - reading}
        self.metrics.queued.inc()
        admitted = False
        try:
            async with self.admission.slot(deadline):
                admitted = True
                self.metrics.queued.dec()
                timings["queue"] = time.perf_counter() - received
                loop = asyncio.get_running_loop()
                call = Call(body, respond_as, deadline, timings, spec.session)
                content = await loop.run_in_executor(self.executor, run, pipeline, call)
        finally:
            if not admitted:
                self.metrics.queued.dec()
        self.metrics.observe_stages(timings)
        timings["total"] = time.perf_counter() - arrival
        server_timing = ", ".join(f"{stage};dur={seconds * 1e3:.3f}" for stage, seconds in timings.items())
        headers = {"Server-Timing": server_timing, **spec.headers}
        return Response(content, status_code=spec.status, media_type=respond_as, headers=headers)

    def _deadline(self, request: Request, arrival: float) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            timeout_ms = self.settings.default_timeout_ms
        else:
            try:
                timeout_ms = float(raw)
            except ValueError:
                timeout_ms = -1.0
            if not timeout_ms > 0:
                detail = f"X-Request-Timeout-Ms: expected milliseconds > 0, got {raw}"
                raise problems.Problem(
                    400, "invalid-header", "Invalid header", detail,
                    field="X-Request-Timeout-Ms", expected="a number > 0", got=raw,
                )  # fmt: skip
        return None if timeout_ms is None else arrival + timeout_ms / 1e3


def body_reader(
    request: Request, media: str, pipeline: Pipeline, settings: Settings, schema: codec.Schema
) -> codec.BodyReader:
    """The reader for this request's body; 413 at once when Content-Length exceeds the limit."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    length = int(declared) if declared is not None and declared.isdigit() else None
    if length is not None and length > limit:
        raise problems.too_large("body", f"{limit} bytes", f"{declared} bytes (Content-Length)")
    config = pipeline.config
    return codec.reader(
        media,
        config.embed_dim,
        settings.max_entries,
        pipeline.scorer.input_dtype,
        length,
        settings.stream_min_bytes,
        schema,
    )


async def read_body(request: Request, body: codec.BodyReader, limit: int) -> None:
    """Feed the body to its reader as it arrives (a large frame is decoded on the way); 413 as
    soon as it exceeds `limit` bytes."""
    size, more = 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise problems.too_large("body", f"{limit} bytes", f"more than {limit} bytes")
        body.feed(chunk, more)
    body.close()  # an incomplete frame is refused before it waits for a slot


class FocusApp:
    """The ASGI app: request telemetry around everything; POST /v1/focus and /v1/score go
    straight to their endpoints (the hot path: no middleware stack, router, request models or
    dependency solving between arrival and reading the body); the rest goes to FastAPI (docs,
    /v1/model, probes, metrics)."""

    def __init__(self, api: FastAPI, service: Service) -> None:
        self.api, self.service, self.metrics = api, service, service.metrics
        self.scoring = {"/v1/focus": ScoringEndpoint(service, Pipeline.focus),
                        "/v1/score": ScoringEndpoint(service, Pipeline.score)}  # fmt: skip
        self.sessions = SessionEndpoints(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.api(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["arrival"] = start
        path = scope["path"]
        endpoint, label = self.scoring.get(path), path
        if endpoint is None and (template := self.sessions.template(path)):
            endpoint, label = self.sessions, template
        counted = path.startswith("/v1/")  # probes and scrapes are not load
        status, recorded = 500, False

        async def send_and_record(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Record before the last byte leaves, so a client never sees an uncounted answer.
                recorded = True
                self.metrics.observe_request(label, status, time.perf_counter() - start)
            await send(message)

        if counted:
            self.metrics.in_flight.inc()
        try:
            await (endpoint or self.api)(scope, receive, send_and_record)
        finally:
            if counted:
                self.metrics.in_flight.dec()
            if not recorded:  # the app failed before answering
                self.metrics.observe_request(label, status, time.perf_counter() - start)


class ScoringEndpoint:
    """/v1/focus or /v1/score: the service's answer or a problem, always."""

    def __init__(self, service: Service, run: Run) -> None:
        self.service, self.run = service, run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] != "POST":
                raise problems.Problem(
                    405, "http-error", "Method Not Allowed", f"{scope['method']} {scope['path']}: only POST",
                    headers={"Allow": "POST"},
                )  # fmt: skip
            response = await self.service.serve(Request(scope, receive), self.run)
        except problems.Problem as problem:
            response = problem_response(problem, scope["path"])
        await response(scope, receive, send)


def create_app(settings: Settings, manifest: Manifest | None = None) -> FocusApp:
    """The service app. Verifies the artifact now (raises `ArtifactError`); loads the model in the background."""
    service = Service(settings, manifest or load_manifest(settings.model_dir))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)
        yield
        await loading
        service.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="LensNet focus service",
        version="1",
        summary="Scores a working-context snapshot with LensNet and returns legal, budgeted expand/collapse edits.",
        lifespan=lifespan,
    )

    @app.exception_handler(problems.Problem)
    async def on_problem(request: Request, problem: problems.Problem) -> Response:
        return problem_response(problem, request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        problem = problems.Problem(
            exc.status_code, "http-error", str(exc.detail), f"{request.method} {request.url.path}: {exc.detail}"
        )
        return problem_response(problem, request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        problem = problems.Problem(
            500, "internal-error", "Internal error", "the request failed inside the service; see its log"
        )
        return problem_response(problem, request.url.path)

    @app.get("/v1/model", summary="The loaded artifact: version, checksum, precision, provider, D, B, max LOD")
    async def model() -> dict[str, Any]:
        m, cfg = service.manifest, service.manifest.config
        scorer = service.pipeline.scorer if service.pipeline else None
        precision = scorer.precision if scorer else None
        return {
            "name": m.model.name,
            "version": m.model.version,
            "description": m.model.description,
            "trained": m.model.trained,
            "status": service.status,
            "precision": precision,
            "provider": scorer.provider if scorer else None,
            "input_dtype": scorer.input_dtype.name if scorer else None,
            "sha256": m.files[m.graphs[precision].file].sha256 if precision else None,
            "embed_dim": cfg.embed_dim,
            "block_size": cfg.block_size,
            "max_lod": cfg.max_lod,
            "layers": cfg.layers,
            "num_heads": cfg.num_heads,
            "causal": cfg.causal,
            "created_at": m.created_at,
            "parity": {k: v for k, v in m.parity.model_dump().items() if k != "cases"},
        }

    @app.get("/healthz", summary="Liveness: the process answers (503 once the model failed to load: restart it)")
    async def healthz() -> Response:
        if service.load_error:
            raise problems.Problem(503, "model-failed", "Model failed to load", service.load_error)
        return Response(b'{"status":"alive"}', media_type="application/json")

    @app.get("/readyz", summary="Readiness: model loaded, checksums verified, warmed up, not draining")
    async def readyz() -> Response:
        if service.status != "ready":
            detail = service.load_error or f"model {service.status}"
            raise problems.Problem(503, "not-ready", "Not ready", detail, state=service.status)
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    openapi.install(app)  # documents /v1/focus and /v1/score, served by FocusApp
    return FocusApp(app, service)
