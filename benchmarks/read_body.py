"""What reading a body within limits costs: `service.http.upload.read_body` (413, the 408 gap and
rate watchdog) against a bare receive loop feeding the same reader, side by side in one run.

The same frame (float16 embeddings, D = 256, decoded while it arrives) is cut into 64 KiB chunks
(uvicorn's read size) and fed from memory, so only the loops differ. The two run in pairs, in
alternating order, so both see the same machine; the first `WARMUP` pairs per size are not
counted. Reported per size, with sample counts: each loop's time and what `read_body` adds
(its time minus the bare loop's, pair by pair). N <= 2,048 by default (the shared 2-core machine).

    python -m benchmarks.read_body [--sizes 512 2048] [--runs 300] [--out report.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request

from lensnet_client import frame, synthetic_layout
from service.core import codec
from service.http.upload import read_body
from service.settings import Settings

from . import percentiles, provenance

CHUNK = 65536
D = 256
WARMUP = 10  # pairs per size run but not counted


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


async def measure(sizes: list[int], runs: int) -> list[dict[str, Any]]:
    settings = Settings()
    results = []
    for n in sizes:
        length, messages = chunks(n)
        times: dict[str, list[float]] = {"bare": [], "read_body": []}
        loops = [("bare", bare), ("read_body", read_body)]
        for k in range(WARMUP + runs):
            order = loops if k % 2 == 0 else loops[::-1]
            pair = {name: await timed(loop, length, messages, settings) for name, loop in order}
            if k >= WARMUP:
                for name, seconds in pair.items():
                    times[name].append(seconds * 1e3)
        added_us = (np.asarray(times["read_body"]) - np.asarray(times["bare"])) * 1e3
        results.append({
            "n": n, "body_bytes": length, "chunks": len(messages), "warmup_pairs": WARMUP,
            "bare_ms": percentiles(times["bare"]), "read_body_ms": percentiles(times["read_body"]),
            "read_body_minus_bare_us": percentiles(added_us, digits=1),
        })  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="WC lengths N")
    parser.add_argument("--runs", type=int, default=300, help="counted bodies per size and loop")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    about = provenance()  # the code measured: read before the runs, not after
    results = asyncio.run(measure(args.sizes, args.runs))
    text = json.dumps({"benchmark": "read_body", **about, "results": results}, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
