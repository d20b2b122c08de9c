"""The transport floor: an ASGI endpoint that receives a request body and discards each chunk as
it arrives (no accumulation, no join, no decoding), so its time is the least reading a body costs.

Served by the same uvicorn as the service, it answers `Server-Timing: admit;dur=…, receive;dur=…`:
`receive` runs from the first `receive()` call to the last body byte, as the service's receive
stage does; `admit` is the wait for a slot. The endpoint admits at most `BARE_SLOTS` requests at
once (environment; default 1, the service's default `--max-concurrency`), each holding its slot
for the whole request: `benchmarks.latency` sets it to the service's slot count, so the bare side
never reads more bodies at once than the service lets run (see that module's docstring).
"""

from __future__ import annotations

import asyncio
import os
import time

from starlette.types import Receive, Scope, Send

SLOTS = asyncio.Semaphore(int(os.environ.get("BARE_SLOTS", "1")))


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        await send({"type": f"{message['type']}.complete"})
        return
    arrival = time.perf_counter()
    async with SLOTS:
        start = time.perf_counter()
        more = True
        while more:
            more = (await receive()).get("more_body", False)  # the chunk is dropped here
        received = time.perf_counter()
        timing = f"admit;dur={(start - arrival) * 1e3:.3f}, receive;dur={(received - start) * 1e3:.3f}"
        headers = [(b"server-timing", timing.encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
