"""Admission control: a concurrency cap with a bounded wait queue, deadlines, and draining.

Latency must never grow without bound: at most `max_concurrency` inferences run and at most
`queue_size` wait; anything beyond is refused at once with 429 and a `Retry-After` estimated from
recent service times. A request whose deadline passes while it waits gets 504. Draining
(shutdown) refuses requests that arrive after it started (503) and waits for every request that
arrived before it, including ones still uploading their body.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..core import problems


class Admission:
    def __init__(self, max_concurrency: int, queue_size: int) -> None:
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self.active = 0  # holding an inference slot
        self.waiting = 0  # queued for one
        self.requests = 0  # anywhere between arrival and answer
        self.draining = False
        self._slots = asyncio.Semaphore(max_concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self._service_s = 0.05  # moving average of slot hold times, seeds Retry-After

    def retry_after_s(self) -> int:
        """Whole seconds until the queue ahead of a new request has likely drained (at least 1)."""
        return max(1, math.ceil(self._service_s * (self.waiting + 1) / self.max_concurrency))

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Span one request from arrival to answer; refused (503) once draining has started."""
        if self.draining:
            raise problems.unavailable("shutting-down", "Shutting down", "the service is draining; retry elsewhere", 1)
        self.requests += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.requests -= 1
            if self.requests == 0:
                self._idle.set()

    def check_capacity(self) -> None:
        """Refuse (429) when every slot is taken and the queue is full."""
        if self.active + self.waiting >= self.max_concurrency + self.queue_size:
            raise problems.unavailable(
                "overloaded", "Overloaded",
                f"{self.active} requests running and {self.waiting} queued (limits {self.max_concurrency} + "
                f"{self.queue_size})", self.retry_after_s(), status=429,
            )  # fmt: skip

    @asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        """Hold an inference slot for the body of the `async with`; `deadline` is a perf_counter time."""
        self.check_capacity()
        self.waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError:
            raise problems.Problem(
                504,
                "deadline-exceeded",
                "Deadline exceeded",
                "the request's deadline passed while it waited for a slot",
            ) from None
        finally:
            self.waiting -= 1
        self.active += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - started)
            self.active -= 1
            self._slots.release()

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests and wait up to `grace_s` for the others to finish; True if they did."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            return False
        return True
