"""Graceful shutdown of a real process: SIGTERM drains in-flight work, refuses new work, exits 0."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from lensnet_client import FocusClient, frame
from service.server import REPEAT_WINDOW_S

from .hooked_service import Gate
from .live import LiveService, snapshot, wait_for_metric


def wait_draining(service: LiveService, timeout: float = 10) -> None:
    """Wait until SIGTERM has turned the service not-ready (AssertionError after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while (ready := service.http.get("/readyz")).status_code == 200:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.01)
    assert ready.status_code == 503 and ready.json()["state"] == "draining"


@contextlib.contextmanager
def request_in_the_model(tmp_path: Path) -> Iterator[tuple[LiveService, Gate, Future[httpx.Response]]]:
    """A service (30 s grace) with one /v1/focus request inside the model, held there until the
    gate opens (it opens on leaving, whatever happened)."""
    gate = Gate(tmp_path / "gate")
    service = LiveService("--shutdown-grace-s", "30", hooks={"model": gate.spec}).wait_ready()
    gate.arm()
    arrays = dict(zip(("embeddings", "lod", "positions"), snapshot(64), strict=True))
    body = frame.pack({"options": {"w_max": 64}}, arrays)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post, service.url + "/v1/focus", content=body, headers={"content-type": frame.MEDIA_TYPE},
                timeout=60,
            )  # fmt: skip
            gate.wait_entered(1)
            yield service, gate, in_flight
    finally:
        gate.open()


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    with request_in_the_model(tmp_path) as (service, gate, in_flight):
        service.process.send_signal(signal.SIGTERM)
        wait_draining(service)
        refused = service.http.post("/v1/focus", content=frame.pack({}, {}), headers={"content-type": frame.MEDIA_TYPE})
        assert refused.status_code == 503 and refused.json()["type"] == "urn:lensnet:problem:shutting-down"
        assert int(refused.headers["retry-after"]) >= 1
        m = service.metrics()
        assert m['lensnet_requests_refused_total{reason="shutting_down"}'] == 1 and m["lensnet_model_ready"] == 0
        assert service.process.poll() is None  # still draining
        gate.open()
        assert in_flight.result().status_code == 200  # the admitted request finished
    assert service.stop(timeout=60) == 0


def test_a_second_sigterm_ends_the_grace_period_at_once(tmp_path: Path) -> None:
    """The request still in the model is answered a 503 problem now, not after the 30 s grace,
    and the process exits 0 without a traceback once the model returns."""
    with request_in_the_model(tmp_path) as (service, _, in_flight):
        service.process.send_signal(signal.SIGTERM)
        first = time.monotonic()
        wait_draining(service)
        time.sleep(max(0.0, first + REPEAT_WINDOW_S + 0.2 - time.monotonic()))  # a second stop, not a repeat
        service.process.send_signal(signal.SIGTERM)
        answer = in_flight.result(timeout=15)  # the gate is still closed: the model has not returned
        assert answer.status_code == 503 and answer.json()["type"] == "urn:lensnet:problem:shutting-down"
        assert answer.headers["connection"] == "close"
    assert service.process.wait(timeout=30) == 0
    log = service.log()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "ending the grace period now" in log


def test_the_same_sigterm_delivered_twice_keeps_the_grace_period(tmp_path: Path) -> None:
    """A repeat within REPEAT_WINDOW_S (a supervisor forwarding what the process group got too)
    is one stop: the request in the model still finishes, with a 200."""
    with request_in_the_model(tmp_path) as (service, gate, in_flight):
        service.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        wait_draining(service)
        time.sleep(REPEAT_WINDOW_S)
        assert not in_flight.done() and service.process.poll() is None  # still draining
        gate.open()
        assert in_flight.result(timeout=30).status_code == 200
    assert service.process.wait(timeout=30) == 0
    assert "ending the grace period" not in service.log()


def test_a_request_still_uploading_at_sigterm_is_served() -> None:
    service = LiveService("--shutdown-grace-s", "30").wait_ready()
    arrays = dict(zip(("embeddings", "lod", "positions"), snapshot(64), strict=True))
    body = frame.pack({"options": {"w_max": 64}}, arrays)
    head = (
        f"POST /v1/focus HTTP/1.1\r\nHost: x\r\nContent-Type: {frame.MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", service.port)) as upload:
        upload.settimeout(30)
        upload.sendall(head.encode() + body[:100])  # headers and the first bytes only
        wait_for_metric(service, "lensnet_in_flight_requests", 1, timeout=10)
        service.process.send_signal(signal.SIGTERM)
        wait_draining(service)
        assert service.process.poll() is None  # draining, but waiting for the upload
        upload.sendall(body[100:])
        answer = upload.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 200"), answer[:200]
    assert service.stop(timeout=60) == 0


def test_two_workers_share_a_port_aggregate_metrics_and_stop_cleanly() -> None:
    service = LiveService("--workers", "2").wait_ready()
    with FocusClient(service.url) as client:
        for seed in range(6):
            client.focus(*snapshot(64, seed=seed), w_max=64)
    assert service.metrics()['lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="200"}'] == 6
    deadline = time.monotonic() + 60  # /readyz answered by one worker says nothing of the other
    while service.log().count("lensnet.service: ready") < 2:  # both workers loaded the model
        assert time.monotonic() < deadline, service.log()
        time.sleep(0.1)
    assert service.stop(timeout=60) == 0


def test_an_upload_unfinished_when_the_grace_period_ends_gets_a_503_problem() -> None:
    """No CancelledError traceback, no 500 text/plain: a problem+json 503, one log line, exit 0."""
    service = LiveService("--shutdown-grace-s", "1").wait_ready()
    arrays = dict(zip(("embeddings", "lod", "positions"), snapshot(64), strict=True))
    body = frame.pack({"options": {"w_max": 64}}, arrays)
    head = (
        f"POST /v1/focus HTTP/1.1\r\nHost: x\r\nContent-Type: {frame.MEDIA_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", service.port)) as upload:
        upload.sendall(head.encode() + body[:100])  # and never the rest
        wait_for_metric(service, "lensnet_in_flight_requests", 1, timeout=10)
        service.process.send_signal(signal.SIGTERM)
        upload.settimeout(15)
        answer = b""
        while chunk := upload.recv(65536):
            answer += chunk
    text = answer.decode(errors="replace")
    assert text.startswith("HTTP/1.1 503"), text[:300]
    assert "content-type: application/problem+json" in text.lower()
    assert '"type": "urn:lensnet:problem:shutting-down"' in text
    assert service.process.wait(timeout=30) == 0
    log = service.log()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert log.count("grace period over") == 1
    assert service.stop() == 0


def test_exit_signals_drain_then_cut_the_grace_then_force() -> None:
    """DrainingServer.handle_exit alone, on a loop that records what it is handed: the first signal
    schedules the drain, a repeat inside REPEAT_WINDOW_S does nothing, a later one ends the grace,
    and the next forces the exit; so does any signal once the drain is over, or before the loop runs."""
    import uvicorn

    from service.server import DrainingServer

    class Loop:
        def __init__(self) -> None:
            self.scheduled: list[str] = []

        def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
            self.scheduled.append(callback.__name__)

    def server(loop: Loop | None) -> DrainingServer:
        made = DrainingServer(uvicorn.Config(app=None), service=None)  # type: ignore[arg-type]
        made._loop = loop  # type: ignore[assignment]
        return made

    loop = Loop()
    draining = server(loop)
    draining.handle_exit(signal.SIGTERM, None)
    draining.handle_exit(signal.SIGTERM, None)  # the same stop, delivered twice
    assert loop.scheduled == ["_start_draining"] and not draining.should_exit
    assert draining.drain_began is not None
    draining.drain_began -= REPEAT_WINDOW_S  # as if the window had passed
    draining.handle_exit(signal.SIGTERM, None)
    assert loop.scheduled == ["_start_draining", "_end_grace"] and not draining.force_exit
    draining.handle_exit(signal.SIGINT, None)
    assert draining.should_exit and draining.force_exit and len(loop.scheduled) == 2

    drained = server(loop := Loop())
    drained.handle_exit(signal.SIGTERM, None)
    done: Future[None] = Future()  # stands for the drain task: only its done() is read
    done.set_result(None)
    drained.draining = done  # type: ignore[assignment]
    drained.drain_began = (drained.drain_began or 0) - REPEAT_WINDOW_S
    drained.handle_exit(signal.SIGTERM, None)  # after the drain: nothing left to cut
    assert drained.force_exit and loop.scheduled == ["_start_draining"]

    early = server(None)  # the loop has not started
    early.handle_exit(signal.SIGTERM, None)
    assert early.force_exit
