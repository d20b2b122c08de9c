"""Reading a request body within limits of size and time.

A body larger than `max_body_bytes` is refused (413) as soon as that is known. A client that
stops sending (a stalled upload, or a slow loris trickling bytes) is cut off with 408 and the
connection closed: the gap between two chunks may not exceed `body_timeout_s`, and once the
upload has run that long, its average rate must stay at or above `body_min_bytes_per_s`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from starlette.requests import ClientDisconnect, Request

from ..core import problems
from ..settings import Settings

# Content-Length values longer than this are beyond any limit (and int() of thousands of digits is slow).
_MAX_LENGTH_DIGITS = 18


def declared_length(request: Request, limit: int) -> int | None:
    """The body's Content-Length (None: not declared, e.g. chunked); 413 at once when over `limit`."""
    declared = request.headers.get("content-length")
    if declared is None or not (declared.isascii() and declared.isdigit()):
        return None  # the server refuses a malformed Content-Length before the app sees it
    length = int(declared) if len(declared) <= _MAX_LENGTH_DIGITS else limit + 1
    if length > limit:
        raise problems.too_large("body", f"{limit} bytes", f"{declared} bytes (Content-Length)")
    return length


class UploadClock:
    """When the next chunk of a body must have arrived (event-loop time), from the idle gap and
    the minimum average rate."""

    def __init__(self, settings: Settings, start: float) -> None:
        self.gap_s, self.min_rate, self.start = settings.body_timeout_s, settings.body_min_bytes_per_s, start

    def deadline(self, now: float, received: int) -> float:
        gap = now + self.gap_s
        if not self.min_rate:
            return gap
        return min(gap, self.start + max(self.gap_s, received / self.min_rate))

    def expired(self, now: float, received: int) -> problems.Problem:
        elapsed = now - self.start
        expected = f"a chunk at least every {self.gap_s:g} s"
        if self.min_rate:
            expected += f" and {self.min_rate} bytes/s on average"
        return problems.Problem(
            408, "body-timeout", "Request body timeout",
            f"body: expected {expected}, got {received} bytes in {elapsed:.1f} s",
            field="body", expected=expected, got=f"{received} bytes in {elapsed:.1f} s",
            headers={"Connection": "close"},
        )  # fmt: skip


class _Watchdog:
    """Cancels the reading task once the clock's deadline passes with no new chunk. One timer per
    deadline it actually reaches, re-armed from the last chunk's time: a chunk only records its
    arrival (rescheduling a timer per chunk cost ~10 µs each, a quarter of a 1 MB body's read)."""

    def __init__(self, clock: UploadClock, loop: asyncio.AbstractEventLoop) -> None:
        self.clock, self.loop, self.task = clock, loop, asyncio.current_task()
        self.last, self.received, self.expired = clock.start, 0, False
        self.handle = loop.call_at(clock.deadline(clock.start, 0), self._check)

    def progress(self, received: int) -> None:
        self.last, self.received = self.loop.time(), received

    def _check(self) -> None:
        due = self.clock.deadline(self.last, self.received)
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
        elif self.task is not None:
            self.expired = True
            self.task.cancel()

    def stop(self) -> None:
        self.handle.cancel()


class BodySink(Protocol):
    """Where `read_body` puts a body's chunks as they arrive: a codec reader, or a whole-body buffer."""

    def feed(self, chunk: bytes, more: bool) -> None: ...

    def close(self) -> None: ...


async def read_body(request: Request, body: BodySink, settings: Settings) -> None:
    """Feed the body to its reader as it arrives (a large frame is decoded on the way); 413 as
    soon as it exceeds `max_body_bytes`, 408 when the client sends too slowly."""
    limit = settings.max_body_bytes
    loop = asyncio.get_running_loop()
    clock = UploadClock(settings, loop.time())
    watchdog = _Watchdog(clock, loop)
    size, more = 0, True
    try:
        while more:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                raise problems.too_large("body", f"{limit} bytes", f"more than {limit} bytes")
            body.feed(chunk, more)
            watchdog.progress(size)
    except asyncio.CancelledError:
        if not watchdog.expired:
            raise  # not ours (a shutdown)
        asyncio.current_task().uncancel()  # type: ignore[union-attr]
        raise clock.expired(loop.time(), size) from None
    finally:
        watchdog.stop()
    body.close()  # an incomplete frame is refused before it waits for a slot
