"""Admission control: a bounded number of requests in flight, a concurrency cap, deadlines, and draining.

Latency and memory must never grow without bound: a request takes one of `max_concurrency +
queue_size` places (and its body's size out of `max_bytes_in_flight`) before the first byte of its
body is read, and keeps them until it is answered; at most `max_concurrency` inferences run.
Anything beyond is refused at once with 429 and a `Retry-After` estimated from recent service
times. A request whose deadline passes while it waits for a slot gets 504. Draining (shutdown)
refuses requests that arrive after it started (503) and waits for every request that arrived
before it, including ones still uploading their body; those still running when the grace period
ends are cancelled and answer 503 (`abandon`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

from ..core import problems


class Admission:
    def __init__(self, max_concurrency: int, queue_size: int, max_bytes_in_flight: int) -> None:
        self.max_concurrency, self.queue_size = max_concurrency, queue_size
        self.max_bytes_in_flight = max_bytes_in_flight
        self.active = 0  # holding an inference slot
        self.waiting = 0  # queued for one
        self.placed = 0  # holding a place: from the first body byte read to the answer
        self.placed_bytes = 0  # their bodies' sizes
        self.requests = 0  # anywhere between arrival and answer
        self.draining = False
        self.abandoned = False  # the grace period ended: requests still running are cancelled
        self._tasks: set[asyncio.Task[object]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut = asyncio.Event()  # `end_grace`: the drain stops waiting now
        self._service_s = 0.05  # moving average of slot hold times, seeds Retry-After

    def retry_after_s(self) -> int:
        """Whole seconds until the queue ahead of a new request has likely drained (at least 1)."""
        return max(1, math.ceil(self._service_s * (self.placed + 1) / self.max_concurrency))

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Span one request from arrival to answer; refused (503) once draining has started."""
        if self.draining:
            raise problems.unavailable("shutting-down", "Shutting down", "the service is draining; retry elsewhere", 1)
        self.requests += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            self.requests -= 1
            if self.requests == 0:
                self._idle.set()

    def check_capacity(self, nbytes: int = 0) -> None:
        """Refuse (429) when every place is taken, or `nbytes` more would exceed the bytes in flight."""
        places = self.max_concurrency + self.queue_size
        if self.placed >= places:
            detail = (
                f"{self.placed} requests admitted: {self.active} running, {self.waiting} queued, the others "
                f"uploading (limit {self.max_concurrency} + {self.queue_size})"
            )
        elif self.placed_bytes + nbytes > self.max_bytes_in_flight:
            detail = (
                f"{self.placed_bytes} bytes of request bodies in flight; {nbytes} more would exceed "
                f"{self.max_bytes_in_flight}"
            )
        else:
            return
        raise problems.unavailable("overloaded", "Overloaded", detail, self.retry_after_s(), status=429)

    @contextmanager
    def place(self, nbytes: int) -> Iterator[None]:
        """Hold a place and `nbytes` of the bytes in flight from before the body is read until the
        answer: 429 at once when there is none, so nothing is buffered for a request that would be refused."""
        self.check_capacity(nbytes)
        self.placed += 1
        self.placed_bytes += nbytes
        try:
            yield
        finally:
            self.placed -= 1
            self.placed_bytes -= nbytes

    @asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        """Hold an inference slot for the body of the `async with` (the request holds a place
        already); `deadline` is a perf_counter time."""
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
        """Refuse new requests and wait up to `grace_s` (or until `end_grace`) for the others to
        finish; True if they did."""
        self.draining = True
        waits = [asyncio.ensure_future(event.wait()) for event in (self._idle, self._cut)]
        try:
            await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._idle.is_set()

    def end_grace(self) -> None:
        """End a drain's wait now (a second exit signal): what is still in flight gets abandoned."""
        self._cut.set()

    async def abandon(self, wait_s: float) -> int:
        """Cancel the requests still in flight (each answers 503, see `Service.serve`) and wait up
        to `wait_s` for those answers to leave; the number cancelled."""
        self.abandoned = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), wait_s)
        return len(tasks)
