"""The transport baseline: an ASGI endpoint that only reads the request body.

Served by the same uvicorn as the service, it answers with `Server-Timing: receive;dur=…`
measured exactly like the service's receive stage (from the app being called to the last body
byte), so the benchmark can report the service's receive time as a ratio to the bare minimum.
"""

from __future__ import annotations

import time

from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        await send({"type": f"{message['type']}.complete"})
        return
    start = time.perf_counter()
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    b"".join(chunks)  # what Starlette's request.body() does: the copy counts
    elapsed = time.perf_counter() - start
    headers = [(b"server-timing", f"receive;dur={elapsed * 1e3:.3f}".encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
