"""What reading a body within limits costs: `service.http.upload.read_body` (413, the 408 gap and
rate watchdog) against a bare receive loop feeding the same reader, side by side in one run.

The same frame (float16 embeddings, D = 256, decoded while it arrives) is cut into 64 KiB chunks
(uvicorn's read size) and fed from memory, so only the loops differ; the two are interleaved so
both see the same machine. N <= 2,048 by default (the shared 2-core machine).

    python -m benchmarks.read_body [--sizes 512 2048] [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from typing import Any

import numpy as np
from starlette.requests import Request

from lensnet_client import frame, synthetic_layout
from service.core import codec
from service.http.upload import read_body
from service.settings import Settings

CHUNK = 65536
D = 256


def chunks(n: int) -> tuple[int, list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    lod, positions = synthetic_layout(n, 32, 2, rng)
    embeddings = rng.standard_normal((n, D)).astype(np.float16)
    data = frame.pack({"options": {"w_max": n}}, {"embeddings": embeddings, "lod": lod, "positions": positions})
    return len(data), [
        {"type": "http.request", "body": data[i : i + CHUNK], "more_body": i + CHUNK < len(data)}
        for i in range(0, len(data), CHUNK)
    ]


async def bare(request: Request, body: codec.BodyReader, _: Settings) -> None:
    """The least a reader loop does: receive, feed, close."""
    more = True
    while more:
        message = await request.receive()
        more = message.get("more_body", False)
        body.feed(message.get("body", b""), more)
    body.close()


async def timed(loop_fn: Any, length: int, messages: list[dict[str, Any]], settings: Settings) -> float:
    feed = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(feed)

    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    reader = codec.reader(codec.FRAME, D, settings.max_entries, np.dtype(np.float32), length, 0)
    started = time.perf_counter()
    await loop_fn(request, reader, settings)
    return time.perf_counter() - started


async def measure(sizes: list[int], runs: int) -> dict[str, Any]:
    settings = Settings()
    results = []
    for n in sizes:
        length, messages = chunks(n)
        times: dict[str, list[float]] = {"bare": [], "read_body": []}
        for _ in range(runs):
            times["bare"].append(await timed(bare, length, messages, settings))
            times["read_body"].append(await timed(read_body, length, messages, settings))
        p50 = {name: float(np.median(values)) * 1e3 for name, values in times.items()}
        results.append({
            "n": n, "body_bytes": length, "chunks": len(messages),
            "bare_ms_p50": round(p50["bare"], 4), "read_body_ms_p50": round(p50["read_body"], 4),
            "overhead_us_p50": round((p50["read_body"] - p50["bare"]) * 1e3, 1),
        })  # fmt: skip
    return {"benchmark": "read_body", "machine": platform.machine(), "runs": runs, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="WC lengths N")
    parser.add_argument("--runs", type=int, default=300, help="requests per size and loop")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.sizes, args.runs)), indent=1))


if __name__ == "__main__":
    main()
