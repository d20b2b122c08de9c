"""Process runner: uvicorn with a draining shutdown, in one or several worker processes.

On SIGTERM (or Ctrl-C) a worker turns not-ready and answers new requests 503 while the ones that
arrived before finish, for up to `shutdown_grace_s`; then uvicorn closes and the process exits 0.
A second signal (REPEAT_WINDOW_S or more after the first) ends the grace period at once (what is
still in flight is answered 503, and the process still exits 0); a third, or one after the drain,
exits without the lifespan's clean-up. With `workers > 1` a small supervisor
shares one listening socket among spawned workers, forwards signals to them, and exits non-zero
if one dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from model_export.artifact import load_manifest

from .http.app import Service, create_app
from .settings import Settings

log = logging.getLogger("lensnet.server")
REPEAT_WINDOW_S = 1.0
"""A signal this soon after the one that began the drain is the same stop delivered twice (a
supervisor forwarding what its process group got too), not a second one."""


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the service before shutting down."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.drain_began: float | None = None  # set in the signal handler itself: two quick signals cannot both drain
        self.grace_ended = False  # a second signal cut the drain short: a third one forces the exit
        self.draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: after a drain the exit is clean (status 0),
        # not a re-raised SIGTERM. Nothing is logged here (a signal may interrupt a log write):
        # the loop's callbacks do it.
        drained = self.draining is not None and self.draining.done()
        if self._loop is None or self.grace_ended or drained:
            self.should_exit = self.force_exit = True
        elif self.drain_began is None:
            self.drain_began = time.monotonic()
            self._loop.call_soon_threadsafe(self._start_draining, sig)
        elif time.monotonic() - self.drain_began >= REPEAT_WINDOW_S:
            self.grace_ended = True
            self._loop.call_soon_threadsafe(self._end_grace, sig)

    def _start_draining(self, sig: int) -> None:
        grace = self.service.settings.shutdown_grace_s
        log.info("signal %s: draining for up to %.1f s", signal.Signals(sig).name, grace)

        async def drain_then_exit() -> None:
            await self.service.drain()
            self.should_exit = True

        self.draining = asyncio.ensure_future(drain_then_exit())

    def _end_grace(self, sig: int) -> None:
        log.info("signal %s again: ending the grace period now", signal.Signals(sig).name)
        self.service.end_grace()


def _configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level.upper())


def _uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    # The drain already waited for in-flight requests (up to the grace period); uvicorn's own
    # graceful shutdown only has to close idle connections, so a second grace would double it.
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
        timeout_graceful_shutdown=1, lifespan="on",
    )  # fmt: skip


def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Run one worker in this process until it has drained (raises ArtifactError on a bad artifact)."""
    _configure_logging(settings.log_level)
    app = create_app(settings)
    DrainingServer(_uvicorn_config(app, settings), app.service).run(sockets)


def _worker(values: dict[str, Any], listener: socket.socket) -> None:
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which forwards it once
    serve(Settings(**values), [listener])


def supervise(settings: Settings) -> int:
    """Run `settings.workers` worker processes on one socket; return the exit status."""
    _configure_logging(settings.log_level)
    load_manifest(settings.model_dir)  # refuse a bad artifact once, before spawning anything
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = Path(given or tempfile.mkdtemp(prefix="lensnet-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    for stale in metrics_dir.glob("*.db"):  # prometheus-client needs it empty, or old counts are summed in
        stale.unlink()
    listener = _uvicorn_config(None, settings).bind_socket()
    context = multiprocessing.get_context("spawn")
    values = settings.model_dump(mode="json")
    workers = [context.Process(target=_worker, args=(values, listener)) for _ in range(settings.workers)]
    received: list[int] = []  # the handler only records; the loop below acts (waitpid is not reentrant)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda sig, _: received.append(sig))
    for worker in workers:
        worker.start()
    log.info("supervising %d workers on %s:%d", len(workers), settings.host, listener.getsockname()[1])
    status, forwarded = 0, 0
    while running := [worker for worker in workers if worker.exitcode is None]:
        wait([worker.sentinel for worker in running], timeout=0.1)
        crashed = [worker for worker in workers if worker.exitcode not in (None, 0)]
        if crashed and not received:
            log.error("worker %s exited with %s; stopping the others", crashed[0].pid, crashed[0].exitcode)
            status = 1
            received.append(signal.SIGTERM)
        for sig in received[forwarded:]:
            for worker in workers:
                if worker.exitcode is None and worker.pid:
                    os.kill(worker.pid, sig)
        forwarded = len(received)
    if not given:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
