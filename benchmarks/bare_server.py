"""The transport floor, served by the service's own process: `python -m benchmarks.bare_server
[lensnet-serve flags]` runs the real service (one worker) with one more path, FLOOR_PATH, whose
endpoint receives a request body and drops each chunk as it arrives (no accumulation, no join,
no decoding): the least reading a body costs.

Same process, event loop, uvicorn configuration and connections as the service, so a body sent
to both is read under the same conditions (a separate uvicorn process read the same bodies up to
2x slower here: another process, another core, its own configuration). It answers
`Server-Timing: admit;dur=…, receive;dur=…`: `receive` runs from the first `receive()` call to
the last body byte, as the service's receive stage does; `admit` is the wait for a slot. It
admits at most the service's `--max-concurrency` requests at once, each holding its slot for the
whole request, so it never reads more bodies at once than the service lets run (see
`benchmarks.latency`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

FLOOR_PATH = "/floor"


class WithFloor:
    """The service's app, with the floor endpoint at FLOOR_PATH."""

    def __init__(self, app: Any) -> None:
        self.app: ASGIApp = app
        self.service = app.service  # what service.server drains on shutdown
        self.slots = asyncio.Semaphore(app.service.settings.max_concurrency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == FLOOR_PATH:
            await self.floor(receive, send)
        else:
            await self.app(scope, receive, send)

    async def floor(self, receive: Receive, send: Send) -> None:
        arrival = time.perf_counter()
        async with self.slots:
            start = time.perf_counter()
            more = True
            while more:
                more = (await receive()).get("more_body", False)  # the chunk is dropped here
            received = time.perf_counter()
            timing = f"admit;dur={(start - arrival) * 1e3:.3f}, receive;dur={(received - start) * 1e3:.3f}"
            headers = [(b"server-timing", timing.encode()), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})


def main() -> int:
    """lensnet-serve, with every app it builds wrapped in WithFloor."""
    from service import server
    from service.cli import main as serve

    build = server.create_app
    server.create_app = lambda *args, **kwargs: WithFloor(build(*args, **kwargs))  # type: ignore[assignment]
    return serve([*sys.argv[1:], "--workers", "1"])  # the last --workers wins


if __name__ == "__main__":
    sys.exit(main())
