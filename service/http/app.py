"""HTTP adapter: the scoring endpoints and FastAPI routes over the pipeline, with admission
control and telemetry.

Endpoints stay thin: admit (429/503), read the body into its decoder (bounded), wait for an
inference slot (504 past the deadline), run the pipeline in the inference thread pool, answer
with `Server-Timing`. Every error is RFC 9457 problem+json.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from model_export.artifact import Manifest, load_manifest

from ..core import problems
from ..core.sessions import SessionStore
from ..core.stages import StageClock
from ..metrics import CONTENT_TYPE, Metrics
from ..pipeline import Call, Pipeline, Reply
from ..policy import PolicyHealth
from ..runtime import Scorer
from ..settings import Settings
from ..shadow import ShadowScorer, check_compatible
from ..traces import TraceWriter
from . import openapi, v2
from .admission import Admission
from .calls import CallSpec, Wire, negotiate_v1, problem_response
from .feedback import PATH as FEEDBACK
from .feedback import FeedbackEndpoint
from .sessions import SessionEndpoints
from .upload import declared_length, read_body

log = logging.getLogger("lensnet.service")
TIMEOUT_HEADER = "x-request-timeout-ms"
REFUSALS = {
    "overloaded": "overload",
    "not-ready": "not_ready",
    "shutting-down": "shutting_down",
    "deadline-exceeded": "deadline",
    "too-large": "too_large",
    "body-timeout": "body_timeout",
}
TIMEOUT_EXPECTED = "a finite number of milliseconds > 0"
ABANDON_WAIT_S = 2.0  # after the grace period: how long the 503s to cancelled requests may take to leave
SWEEP_MIN_S, SWEEP_MAX_S = 1.0, 60.0  # how often idle sessions are expired between calls: a quarter TTL within these


class Service:
    """Everything one app instance owns: settings, artifact, model, admission, metrics."""

    def __init__(self, settings: Settings, manifest: Manifest) -> None:
        self.settings, self.manifest = settings, manifest
        self.metrics = Metrics(settings.latency_budget_ms / 1e3, manifest.config.max_lod)
        self.admission = Admission(settings.max_concurrency, settings.queue_size, settings.max_bytes_in_flight)
        self.executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="lensnet-infer")
        self.policy = PolicyHealth(settings, self.metrics)
        evicted = self.metrics.session_evictions
        self.sessions = SessionStore(
            settings.max_sessions, settings.session_memory_bytes, settings.session_ttl_s,
            on_evict=lambda reason: evicted.labels(reason=reason).inc(), on_change=self.metrics.observe_sessions,
            on_unplace=self.metrics.session_unplacements.inc,
        )  # fmt: skip
        self.pipeline: Pipeline | None = None
        self.load_error: str | None = None
        self.shadow_manifest: Manifest | None = None
        if settings.shadow_model_dir is not None:  # verified now, like the live artifact (exit 2 if bad)
            self.shadow_manifest = load_manifest(settings.shadow_model_dir)
            check_compatible(manifest, self.shadow_manifest)

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
            scorer = Scorer(
                s.model_dir, self.manifest, s.precision, s.intra_op_threads, s.intra_op_spinning,
                probe_entries=s.auto_probe_entries, shrink_entries=s.arena_shrink_entries, device=s.device,
            )  # fmt: skip
            warm = SessionStore(1, s.session_memory_bytes, s.session_ttl_s)
            Pipeline(scorer, self.manifest, None, s.max_entries, warm).warmup(s.warmup_sizes)
        except Exception:
            self.load_error = "the model failed to load; see the service log"
            log.exception("model failed to load")
            return
        graph = self.manifest.graphs[scorer.precision].file
        m = self.manifest.model
        self.metrics.set_model(m.name, m.version, scorer.precision, scorer.provider, self.manifest.files[graph].sha256)
        if s.trace_dir is not None and s.trace_sample_rate > 0:
            self.policy.tracer = TraceWriter(
                s.trace_dir, {"version": m.version, "sha256": self.manifest.files[graph].sha256}, self.metrics,
                queue_size=s.trace_queue_size, file_rows=s.trace_file_rows, flush_s=s.trace_flush_s,
                max_bytes=s.trace_max_bytes,
            )  # fmt: skip
        self.pipeline = Pipeline(scorer, self.manifest, self.metrics, s.max_entries, self.sessions, self.policy)
        if not self.admission.draining:
            self.metrics.model_ready.set(1)
        log.info("ready: %s %s, %s on %s", m.name, m.version, scorer.precision, scorer.provider)
        if self.shadow_manifest is not None:
            self._load_shadow(self.pipeline, self.shadow_manifest)

    def _load_shadow(self, pipeline: Pipeline, manifest: Manifest) -> None:
        """Start the candidate model next to the serving one; a failure leaves the service serving without it."""
        s = self.settings
        try:
            scorer = Scorer(s.shadow_model_dir, manifest, "auto", s.shadow_intra_op_threads, False,
                            probe_entries=s.auto_probe_entries, shrink_entries=s.arena_shrink_entries,
                            device=s.device)  # fmt: skip
        except Exception:
            log.exception("the shadow model failed to load; serving without it")
            return
        sha256 = manifest.files[manifest.graphs[scorer.precision].file].sha256
        self.metrics.shadow_model_info.labels(name=manifest.model.name, version=manifest.model.version,
                                              sha256=sha256).set(1)  # fmt: skip
        pipeline.shadow = ShadowScorer(scorer, self.metrics, s.shadow_sample_rate)
        log.info("shadow: %s %s (%s) scores %.0f %% of focus requests", manifest.model.name, manifest.model.version,
                 scorer.precision, 100 * s.shadow_sample_rate)  # fmt: skip

    async def drain(self) -> None:
        """Stop taking work, then wait (up to the grace period) for admitted work to finish."""
        self.metrics.model_ready.set(0)
        if await self.admission.drain(self.settings.shutdown_grace_s):
            log.info("drained")
            return
        cancelled = await self.admission.abandon(ABANDON_WAIT_S)
        log.warning("grace period over: answered 503 to the %d requests still in flight", cancelled)

    def end_grace(self) -> None:
        """Cut a drain short (`drain` then abandons what is still in flight)."""
        self.admission.end_grace()

    async def serve(self, request: Request, wire: Wire, spec: CallSpec | None = None) -> Response:
        """Answer a scoring endpoint; every failure leaves as a Problem (refusals counted)."""
        try:
            async with self.admission.request():
                return await self._serve(request, wire, spec or CallSpec())
        except problems.Problem as problem:
            if problem.slug in REFUSALS:
                self.metrics.refused.labels(reason=self._refusal_reason(problem, request)).inc()
            raise
        except asyncio.CancelledError:
            if not self.admission.abandoned:
                raise  # the server's own cancellation: nothing to answer
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.metrics.refused.labels(reason=REFUSALS["shutting-down"]).inc()
            problem = problems.unavailable(
                "shutting-down", "Shutting down", "the shutdown grace period ended before the request finished", 1
            )
            problem.headers["Connection"] = "close"
            raise problem from None
        except ClientDisconnect:  # gone mid-upload: nobody to answer (499 in the request metrics)
            log.info("client disconnected before its request body was read")
            raise problems.Problem(
                499, "client-closed", "Client closed request", "the client disconnected before sending the whole body"
            ) from None
        except Exception as exc:  # a bug, not bad input: log it, answer 500, keep serving
            log.exception("unhandled error on %s", wire.label)
            raise problems.internal_error() from exc

    async def _serve(self, request: Request, wire: Wire, spec: CallSpec) -> Response:
        clock = StageClock(request.state.arrival)
        pipeline = self.pipeline
        if pipeline is None:
            detail = f"model {self.status}" + (f": {self.load_error}" if self.load_error else "")
            raise problems.unavailable("not-ready", "Model not ready", detail, 2)
        length = declared_length(request, self.settings.max_body_bytes)
        body, respond_as = wire.negotiate(request, pipeline, self.settings, length)
        deadline = self._deadline(request, clock.arrival)
        # A place from before the first body byte is read: refuse what we would refuse anyway unread.
        with self.admission.place(self.settings.max_body_bytes if length is None else length):
            clock.done("admit")
            await read_body(request, body, self.settings)
            clock.done("receive")
            self.metrics.queued.inc()
            admitted = False
            try:
                async with self.admission.slot(deadline):
                    admitted = True
                    self.metrics.queued.dec()
                    clock.done("queue")
                    call = Call(body, respond_as, deadline, clock, spec.session)
                    loop = asyncio.get_running_loop()
                    reply = await loop.run_in_executor(self.executor, _run, wire, pipeline, call)
                    clock.done("handoff")  # back on the event loop
            finally:
                if not admitted:
                    self.metrics.queued.dec()
        # The header leaves before the body: it carries the stages so far, which sum to its total;
        # `respond` and the request's whole time reach the metrics once the last byte is sent.
        stages = ", ".join(f"{stage};dur={seconds * 1e3:.3f}" for stage, seconds in clock.timings.items())
        headers = {"Server-Timing": f"{stages}, total;dur={clock.elapsed * 1e3:.3f}"} | reply.headers | spec.headers
        request.state.clock = clock
        after = None if reply.after is None else BackgroundTask(self._after, reply.after)
        return Response(
            reply.content, status_code=spec.status, media_type=reply.media_type, headers=headers, background=after
        )

    async def _after(self, work: Callable[[], None]) -> None:
        """A reply's after-work (a session's row placement), once its last byte is sent: queued on
        the inference threads, not awaited; a process shutting down skips it."""
        try:
            self.executor.submit(work)
        except RuntimeError:  # the executor is shut down
            log.info("shutting down: a session's row placement is skipped")

    def _deadline(self, request: Request, arrival: float) -> float | None:
        """The request's deadline (perf_counter time) from X-Request-Timeout-Ms: a finite number
        of milliseconds > 0. Notes whether it is shorter than the latency budget (`_refusal_reason`)."""
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            timeout_ms = self.settings.default_timeout_ms
        else:
            try:
                timeout_ms = float(raw)
            except ValueError:
                timeout_ms = math.nan
            if not 0 < timeout_ms < math.inf:
                got = raw if len(raw) <= 80 else raw[:77] + "..."
                raise problems.Problem(
                    400, "invalid-header", "Invalid header", f"X-Request-Timeout-Ms: expected {TIMEOUT_EXPECTED}, "
                    f"got {got}", field="X-Request-Timeout-Ms", expected=TIMEOUT_EXPECTED, got=got,
                )  # fmt: skip
        request.state.short_deadline = timeout_ms is not None and timeout_ms < self.settings.latency_budget_ms
        return None if timeout_ms is None else arrival + timeout_ms / 1e3

    @staticmethod
    def _refusal_reason(problem: problems.Problem, request: Request) -> str:
        """The refusal's reason label; a 504 whose deadline was shorter than the latency budget is the
        client's choice (`deadline_short`), not a fault of the service (`deadline`)."""
        if problem.slug == "deadline-exceeded" and getattr(request.state, "short_deadline", False):
            return "deadline_short"
        return REFUSALS[problem.slug]


class FocusApp:
    """The ASGI app: request telemetry around everything; the scoring calls (/v1/focus, /v1/score,
    v2 infer, the /v1/sessions routes) and feedback go straight to their endpoints (the hot paths:
    no middleware stack, router, request models or dependency solving between arrival and reading
    the body); the rest goes to FastAPI (docs, /v1/model, probes, metrics, v2 metadata)."""

    def __init__(self, api: FastAPI, service: Service, feedback: FeedbackEndpoint) -> None:
        self.api, self.service, self.metrics, self.feedback = api, service, service.metrics, feedback
        v1 = {path: Wire(path, negotiate_v1(), run, problem_response)
              for path, run in (("/v1/focus", Pipeline.focus), ("/v1/score", Pipeline.score))}  # fmt: skip
        infer = Wire(v2.INFER, v2.negotiate, Pipeline.infer, v2.error_response)
        wires = v1 | dict.fromkeys(v2.infer_paths(service.manifest), infer)
        self.scoring = {path: ScoringEndpoint(service, wire) for path, wire in wires.items()}
        self.sessions = SessionEndpoints(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.api(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["arrival"] = start
        path = scope["path"]
        endpoint: ScoringEndpoint | SessionEndpoints | FeedbackEndpoint | None = self.scoring.get(path)
        if path == FEEDBACK:
            endpoint = self.feedback
        label = endpoint.wire.label if isinstance(endpoint, ScoringEndpoint) else path
        if endpoint is None and (template := self.sessions.template(path)):
            endpoint, label = self.sessions, template
        counted = endpoint is not None or path.startswith("/v1/")  # probes and scrapes are not load
        status, recorded = 500, False

        async def send_and_record(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                await send(message)
                # The last byte is with the server now. Recorded before this task yields, so a
                # client never sees an uncounted answer from this process.
                recorded = True
                self._record(label, status, start, scope["state"].get("clock"))
                return
            await send(message)

        if counted:
            self.metrics.in_flight.inc()
        try:
            await (endpoint or self.api)(scope, receive, send_and_record)
        finally:
            if counted:
                self.metrics.in_flight.dec()
            if not recorded:  # the app failed before answering
                self._record(label, status, start, None)

    def _record(self, label: str, status: int, start: float, clock: StageClock | None) -> None:
        """The request's whole time; for an answered scoring call also its stages, ending with
        `respond` now, so that they sum to that time exactly."""
        if clock is None:
            self.metrics.observe_request(label, status, time.perf_counter() - start)
            return
        clock.done("respond")
        self.metrics.observe_request(label, status, clock.elapsed)
        self.metrics.observe_stages(clock.timings, clock.overhead(), label)


class ScoringEndpoint:
    """/v1/focus, /v1/score or v2 inference: the service's answer or a problem, always."""

    def __init__(self, service: Service, wire: Wire) -> None:
        self.service, self.wire = service, wire

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] != "POST":
                raise problems.Problem(
                    405, "http-error", "Method Not Allowed", f"{scope['method']} {scope['path']}: only POST",
                    headers={"Allow": "POST"},
                )  # fmt: skip
            response = await self.service.serve(Request(scope, receive), self.wire)
        except problems.Problem as problem:
            response = self.wire.render(problem, scope["path"])
        await response(scope, receive, send)


def create_app(settings: Settings, manifest: Manifest | None = None) -> FocusApp:
    """The service app. Verifies the artifact now (raises `ArtifactError`); loads the model in the background."""
    service = Service(settings, manifest or load_manifest(settings.model_dir))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)
        sweeping = asyncio.create_task(_sweep(service.sessions))
        yield
        sweeping.cancel()
        await loading
        service.executor.shutdown(wait=False, cancel_futures=True)
        if service.pipeline is not None and service.pipeline.shadow is not None:
            service.pipeline.shadow.executor.shutdown(wait=False, cancel_futures=True)
        service.policy.executor.shutdown(wait=False, cancel_futures=True)
        if service.policy.tracer is not None:
            await asyncio.get_running_loop().run_in_executor(None, service.policy.tracer.close)

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
            exc.status_code, "http-error", str(exc.detail), f"{request.method} {request.url.path}: {exc.detail}",
            headers=dict(exc.headers or {}),  # e.g. Allow on a 405
        )  # fmt: skip
        return problem_response(problem, request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(problems.internal_error(), request.url.path)

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
            "auto_probe_ms": scorer.probe_ms if scorer else None,
            "attention": m.graphs[precision].attention if precision else None,
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

    @app.get(
        "/healthz", summary="Liveness: the process answers (503 once the model failed to load: restart it)",
        responses={503: openapi.problem_response("the model failed to load")},
    )  # fmt: skip
    async def healthz() -> Response:
        if service.load_error:
            raise problems.Problem(503, "model-failed", "Model failed to load", service.load_error)
        return Response(b'{"status":"alive"}', media_type="application/json")

    @app.get(
        "/readyz", summary="Readiness: model loaded, checksums verified, warmed up, not draining",
        responses={503: openapi.problem_response("loading, failed or draining (`state` says which)")},
    )  # fmt: skip
    async def readyz() -> Response:
        if service.status != "ready":
            detail = service.load_error or f"model {service.status}"
            raise problems.Problem(503, "not-ready", "Not ready", detail, state=service.status)
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.get(
        "/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )  # fmt: skip
    async def metrics() -> Response:
        # The correlation gauges as of now, computed off the event loop in the policy's thread.
        await asyncio.get_running_loop().run_in_executor(service.policy.executor, service.policy.refresh)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(v2.router(service))  # its infer route only answers other model names

    config = service.manifest.config
    feedback = FeedbackEndpoint(service.policy, settings)
    openapi.install(app, config.embed_dim, config.max_lod, feedback.body.model)  # the routes FocusApp serves
    return FocusApp(app, service, feedback)


async def _sweep(store: SessionStore) -> None:
    """Expire idle sessions without waiting for a session call (which also expires them), so their
    memory and the gauges follow the TTL on a quiet process too."""
    while True:
        await asyncio.sleep(min(SWEEP_MAX_S, max(SWEEP_MIN_S, store.ttl_s / 4)))
        try:
            store.sweep()
        except Exception:  # a bug in a metrics callback must not end the sweeping
            log.exception("expiring idle sessions failed")


def _run(wire: Wire, pipeline: Pipeline, call: Call) -> Reply:
    """The inference thread's side of a call: the hand-off ends as the thread picks it up."""
    call.clock.done("handoff")
    return wire.run(pipeline, call)
