"""Service latency: the real server (uvicorn on loopback) driven by the Python client.

For N = 512, 2,048, 8,192 × D = 256 (the bundled model) and 512 × JSON and binary × concurrency
1 and 8 it reports client-observed p50/p90/p99/max (HdrHistogram, microsecond resolution), the
server's stage breakdown (Server-Timing), throughput and errors; and, in the same run, the raw
`session.run` time of the same graph on the same inputs and a bare uvicorn endpoint reading the
same bytes, so that model and receive overheads are ratios. Processing = admit + decode +
allocate + telemetry + encode (everything the service adds besides receiving, queueing and the
model; the rest of the server's total is the response write). The bare
endpoint is timed at the same concurrency: at 1, each service request is paired with a bare one
sent just before it, so both see the same machine.

    python -m benchmarks.latency [--quick] [--sizes 8192] [--dims 512] [--formats binary]
                                 [--concurrency 1 8] [--min-seconds 20] [--out report.json]

Embeddings are sent as float16 (the production format); the D = 512, N = 8,192 binary
configuration is also run with float32 embeddings (the CPU graph's own dtype: no conversion).
The D = 512 artifact is a random-init export cached in .bench/ (needs the export extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from hdrh.histogram import HdrHistogram

from lensnet_client import FocusClient, FocusError, synthetic_layout
from lensnet_client.client import _Protocol
from model_export.artifact import ArtifactError, load_manifest
from service.runtime import create_session

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench"
SIZES = (512, 2048, 8192)
DIMS = (256, 512)
FORMATS = ("binary", "json")
CONCURRENCY = (1, 8)
STAGES = ("admit", "receive", "queue", "decode", "model", "allocate", "telemetry", "encode", "total")
PROCESSING = ("admit", "decode", "allocate", "telemetry", "encode")
VARIANTS = 4  # distinct snapshots per configuration, cycled
TARGET_PROCESSING_MS, TARGET_RECEIVE_RATIO = 1.0, 1.1


def git_commit() -> str:
    """The checkout's short commit, for a report's provenance."""
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=REPO
    )
    return found.stdout.strip() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(args: list[str], url: str, ready_path: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess, up until `ready_path` answers 200; stopped (SIGTERM) on exit."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while not _answers(url + ready_path):
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.2)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def model_dir(d: int) -> Path:
    """The bundled model for D = 256; else a random-init export cached in .bench/ (D = 1,280 with
    the training repo's depth-20 heads: 10 of 128). Its parity stops at N = 2,048 to keep the
    export's time and memory small; the service tests cover parity up to 8,192."""
    if d == 256:
        return REPO / "models" / "default"
    path = CACHE / "models" / f"d{d}"
    try:
        load_manifest(path)
    except ArtifactError:
        subprocess.run(
            [sys.executable, "-m", "model_export", "--random-init", "--seed", "1", "--embed-dim", str(d),
             "--num-heads", str(max(4, d // 128)), "--parity-sizes", "1,101,2048",
             "--out", str(path), "--force", "--model-version", f"bench-d{d}"],
            check=True,
        )  # fmt: skip
    return path


def snapshots(n: int, d: int, seed: int, dtype: type = np.float16) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, d)).astype(dtype), *synthetic_layout(n, 32, 2, rng)) for _ in range(VARIANTS)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = np.asarray(values)
    return {k: round(float(np.percentile(v, q)), 4) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(v.max()), 4)
    }


Bodies = list[tuple[bytes, dict[str, str]]]


def drive(
    url: str, fmt: str, snaps: list, n: int, concurrency: int, requests: int, min_seconds: float, bare_url: str,
    bodies: Bodies,
) -> dict[str, Any]:  # fmt: skip
    """Closed loop: `concurrency` threads, each with its own client, until `requests` are sent and
    `min_seconds` have passed. At concurrency 1 each request is paired with the same bytes
    (`bodies`, as the client builds them) sent to the bare endpoint just before it (its receive
    time is reported beside the service's)."""
    histogram = HdrHistogram(1, 600_000_000, 3)  # microseconds, 3 significant digits
    stages: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "processing")}
    bare: list[float] = []
    bare_wall_s: list[float] = []  # wall time spent on the paired bare requests, not the service's
    errors: list[str] = []
    lock = threading.Lock()
    counter = itertools.count()
    paired = concurrency == 1
    until = time.perf_counter() + min_seconds

    def worker() -> None:
        with FocusClient(url, format=fmt, retries=0, timeout=600) as client, httpx.Client(timeout=60) as http:  # type: ignore[arg-type]
            for k in counter:
                if k >= requests and time.perf_counter() >= until:
                    return
                embeddings, lod, positions = snaps[k % len(snaps)]
                if paired:
                    sent = time.perf_counter()
                    bare.append(bare_post(http, bare_url, *bodies[k % len(bodies)]))
                    bare_wall_s.append(time.perf_counter() - sent)
                start = time.perf_counter()
                try:
                    result = client.focus(embeddings, lod, positions, w_max=n)
                except (FocusError, httpx.HTTPError) as exc:
                    with lock:
                        errors.append(str(exc))
                    continue
                elapsed_us = (time.perf_counter() - start) * 1e6
                with lock:
                    histogram.record_value(max(1, int(elapsed_us)))
                    for stage in STAGES:
                        stages[stage].append(result.server_timing.get(stage, 0.0))
                    stages["processing"].append(sum(result.server_timing[s] for s in PROCESSING))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started - sum(bare_wall_s)
    done = histogram.get_total_count()
    return {
        "requests": done,
        "bare_receive_ms": percentiles(bare),
        "errors": len(errors),
        "error_samples": errors[:3],
        "throughput_rps": round(done / wall, 3),
        "client_ms": {
            k: round(histogram.get_value_at_percentile(q) / 1e3, 4) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        | {"max": round(histogram.get_max_value() / 1e3, 4)},
        "server_ms": {stage: percentiles(values) for stage, values in stages.items()},
    }


def raw_session_run(path: Path, precision: str, provider: str, snaps: list, runs: int) -> dict[str, float]:
    """session.run of the graph the server runs (same precision, provider and session options) on
    the same inputs."""
    manifest = load_manifest(path)
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]
    session = create_session(path / manifest.graphs[precision].file, providers, 0, False)
    dtype = np.float16 if precision == "fp16" else np.float32
    feeds = [{"embeddings": e[None].astype(dtype), "lod": lod[None], "positions": pos[None]} for e, lod, pos in snaps]
    session.run(None, feeds[0])
    times = []
    for k in range(runs):
        start = time.perf_counter()
        session.run(None, feeds[k % len(feeds)])
        times.append((time.perf_counter() - start) * 1e3)
    return percentiles(times)


def bare_bodies(fmt: str, snaps: list, n: int) -> Bodies:
    """The exact bytes (and headers) the client sends for each snapshot."""
    protocol = _Protocol(fmt, 0, 0, 0)  # type: ignore[arg-type]
    return [protocol.build(e, lod, pos, {"options": {"w_max": n}}, None) for e, lod, pos in snaps]


def bare_post(http: httpx.Client, bare_url: str, content: bytes, headers: dict[str, str]) -> float:
    """One body to the bare endpoint; its server-side receive time (ms)."""
    response = http.post(bare_url + "/bare", content=content, headers=headers)
    return float(response.headers["server-timing"].split("dur=")[1])


def bare_receive(bare_url: str, bodies: Bodies, concurrency: int, requests: int) -> dict[str, float]:
    """The bare endpoint's receive time at `concurrency` (closed loop, like `drive`)."""
    times: list[float] = []
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=60) as http:
            for k in counter:
                times.append(bare_post(http, bare_url, *bodies[k % len(bodies)]))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return percentiles(times)


def requests_for(n: int, fmt: str, quick: bool) -> int:
    count = {512: 200, 2048: 60, 8192: 16, 16384: 8}.get(n, 8) // (2 if fmt == "json" else 1)
    return max(8, count // 4) if quick else count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="WC lengths N")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="embedding widths D (256: the bundled model)")
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="keep each configuration going this long")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    bare_url = f"http://127.0.0.1:{(bare_port := free_port())}"
    bare = ["-m", "uvicorn", "benchmarks.bare_server:app", "--port", str(bare_port), "--log-level", "warning"]
    with server(bare, bare_url, "/"):
        for d in args.dims:
            path = model_dir(d)
            url = f"http://127.0.0.1:{(port := free_port())}"
            service = [
                "-m", "service", "--port", str(port), "--model-dir", str(path), "--queue-size", "32",
                "--warmup-sizes", json.dumps(list(args.sizes)), "--log-level", "warning",
            ]  # fmt: skip
            with server(service, url, "/readyz"):
                served = httpx.get(url + "/v1/model").json()
                for n in args.sizes:
                    snaps = snapshots(n, d, seed=n + d)
                    runs = requests_for(n, "binary", args.quick)
                    raw = raw_session_run(path, served["precision"], served["provider"], snaps, runs)
                    for fmt in args.formats:
                        bodies = bare_bodies(fmt, snaps, n)
                        for concurrency in args.concurrency:
                            count = requests_for(n, fmt, args.quick)
                            run = drive(url, fmt, snaps, n, concurrency, count, args.min_seconds, bare_url, bodies)
                            if concurrency > 1:
                                run["bare_receive_ms"] = bare_receive(bare_url, bodies, concurrency, count)
                            receive = run["server_ms"]["receive"].get("p50", float("nan"))
                            results.append(
                                {"d": d, "n": n, "format": fmt, "concurrency": concurrency, "payload": "float16", **run,
                                 "body_bytes": len(bodies[0][0]), "session_run_ms": raw,
                                 "receive_ratio_p50": round(receive / run["bare_receive_ms"]["p50"], 3),
                                 "model_over_session_run_p50": round(run["server_ms"]["model"]["p50"] / raw["p50"], 3)}
                            )  # fmt: skip
                            print(json.dumps({k: results[-1][k] for k in ("d", "n", "format", "concurrency")}
                                             | {"processing_p50": run["server_ms"]["processing"].get("p50"),
                                                "receive_ratio_p50": results[-1]["receive_ratio_p50"]}),
                                  file=sys.stderr)  # fmt: skip
                if d == 512 and 8192 in args.sizes and "binary" in args.formats:
                    # The target configuration once more, embeddings sent in the CPU graph's dtype.
                    snaps = snapshots(8192, d, seed=8192 + d, dtype=np.float32)
                    count = requests_for(8192, "binary", args.quick)
                    bodies = bare_bodies("binary", snaps, 8192)
                    run = drive(url, "binary", snaps, 8192, 1, count, args.min_seconds, bare_url, bodies)
                    results.append(
                        {"d": d, "n": 8192, "format": "binary", "concurrency": 1, "payload": "float32", **run}
                    )
    key = [r for r in results if (r["d"], r["n"], r["format"], r["payload"]) == (512, 8192, "binary", "float16")]
    report = {
        "benchmark": "latency",
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__},
        "device": served["provider"],
        "results": results,
        "targets": {
            "processing_p50_ms_at_d512_n8192_binary": TARGET_PROCESSING_MS,
            "receive_ratio_p50_max": TARGET_RECEIVE_RATIO,
            "errors_at_concurrency_8": 0,
        },
        "targets_met": {  # null: not measured in this run
            "processing": _all_or_none(r["server_ms"]["processing"]["p50"] <= TARGET_PROCESSING_MS for r in key),
            **{
                f"receive_{fmt}": _all_or_none(
                    r["receive_ratio_p50"] <= TARGET_RECEIVE_RATIO
                    for r in results
                    if r["format"] == fmt and "receive_ratio_p50" in r
                )
                for fmt in FORMATS
            },
            "errors": _all_or_none(r["errors"] == 0 for r in results if r["concurrency"] == 8),
        },
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _all_or_none(checks: Iterator[bool]) -> bool | None:
    values = list(checks)
    return all(values) if values else None


if __name__ == "__main__":
    main()
