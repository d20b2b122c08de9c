"""Uploads within limits, against a real service: stalled and slow bodies time out (408), and
admission counts a request from its first body byte (429 before an unaffordable body is read)."""

from __future__ import annotations

import socket
import time

from lensnet_client import frame

from .live import LiveService, snapshot, wait_for_metric

FRAME = frame.MEDIA_TYPE
BODY = frame.pack({"options": {"w_max": 64}}, dict(zip(("embeddings", "lod", "positions"), snapshot(64), strict=True)))


def start_upload(
    service: LiveService, length: int, first: bytes = b"", path: str = "/v1/focus", media: str = FRAME
) -> socket.socket:
    """A connection that has sent the headers of a POST to `path` of `length` bytes and `first`."""
    connection = socket.create_connection(("127.0.0.1", service.port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {media}\r\nContent-Length: {length}\r\n\r\n"
    connection.sendall(head.encode() + first)
    return connection


def response_of(connection: socket.socket, timeout: float) -> tuple[int, dict[str, str], str]:
    """Status, headers and body (as text) of the answer on `connection` (raises TimeoutError if none comes)."""
    connection.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += connection.recv(65536)
    return int(status_line.split()[1]), headers, body.decode(errors="replace")  # a 200 is a binary frame


def test_a_stalled_upload_times_out_with_408_and_is_counted() -> None:
    service = LiveService("--body-timeout-s", "0.5").wait_ready()
    try:
        started = time.monotonic()
        with start_upload(service, len(BODY), BODY[:1000]) as stalled:
            status, headers, body = response_of(stalled, timeout=10)
            assert stalled.recv(1) == b""  # and the connection is closed
        assert status == 408 and 0.5 <= time.monotonic() - started < 5
        assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
        assert '"type": "urn:lensnet:problem:body-timeout"' in body and '"field": "body"' in body
        metrics = service.metrics()
        assert metrics['lensnet_requests_refused_total{reason="body_timeout"}'] == 1
        assert metrics['lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="408"}'] == 1
        assert service.http.post("/v1/focus", content=BODY, headers={"content-type": FRAME}).status_code == 200
    finally:
        assert service.stop() == 0


def test_a_stalled_feedback_upload_times_out_too() -> None:
    """Every body is read within the same limits: /v1/feedback's JSON as well as the scoring frames."""
    service = LiveService("--body-timeout-s", "0.5").wait_ready()
    try:
        with start_upload(service, 1000, b'{"items": [', "/v1/feedback", "application/json") as stalled:
            status, headers, body = response_of(stalled, timeout=10)
        assert status == 408 and '"type": "urn:lensnet:problem:body-timeout"' in body, body
        assert headers["connection"] == "close"
        assert service.metrics()['lensnet_request_duration_seconds_count{endpoint="/v1/feedback",status="408"}'] == 1
    finally:
        assert service.stop() == 0


def test_an_upload_slower_than_the_minimum_rate_times_out() -> None:
    """A slow loris: chunks well within the idle gap, but 200 bytes/s against a 5000 bytes/s minimum."""
    service = LiveService("--body-timeout-s", "1", "--body-min-bytes-per-s", "5000").wait_ready()
    try:
        with start_upload(service, len(BODY)) as slow:
            slow.settimeout(0.2)
            started, sent, status = time.monotonic(), 0, None
            while time.monotonic() - started < 15:
                slow.sendall(BODY[sent : sent + 40])
                sent += 40
                try:
                    status, _, body = response_of(slow, timeout=0.2)
                    break
                except TimeoutError:
                    continue
        assert status == 408 and "5000 bytes/s" in body, body
        assert 1 <= time.monotonic() - started < 5 and sent < len(BODY)
    finally:
        assert service.stop() == 0


def test_admission_counts_uploads_from_their_first_byte() -> None:
    """With the only place taken by a request still uploading, another is refused with 429 as soon
    as its headers arrive: its 8 MB body is never read, nor sent."""
    service = LiveService("--max-concurrency", "1", "--queue-size", "0").wait_ready()
    try:
        with start_upload(service, len(BODY), BODY[:100]) as first:
            wait_for_metric(service, "lensnet_in_flight_requests", 1)
            with start_upload(service, 8 << 20) as second:
                status, headers, body = response_of(second, timeout=5)
            assert status == 429 and int(headers["retry-after"]) >= 1 and "uploading" in body
            first.sendall(BODY[100:])
            assert response_of(first, timeout=30)[0] == 200
        assert service.metrics()['lensnet_requests_refused_total{reason="overload"}'] == 1
    finally:
        assert service.stop() == 0


def test_bytes_in_flight_are_bounded() -> None:
    """A stalled upload declaring 1,040,000 bytes leaves no room in 1 MiB of bodies in flight for
    another body (429 before it is read, though places are free); once it is gone, there is."""
    service = LiveService("--max-body-bytes", str(1 << 20), "--max-bytes-in-flight", str(1 << 20)).wait_ready()
    try:
        with start_upload(service, 1_040_000, b"LNF1"):
            wait_for_metric(service, "lensnet_in_flight_requests", 1)
            refused = service.http.post("/v1/focus", content=BODY, headers={"content-type": FRAME})
            assert refused.status_code == 429 and "bytes of request bodies in flight" in refused.json()["detail"]
        wait_for_metric(service, 'lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="499"}', 1)
        assert service.http.post("/v1/focus", content=BODY, headers={"content-type": FRAME}).status_code == 200
    finally:
        assert service.stop() == 0
