"""Service latency: the real server (uvicorn on loopback) driven by the Python client, each request
paired with the same bytes sent to the transport floor right beside it.

For each D × N (default 256 and 512 × 512, 2,048, 8,192), format (binary, JSON) and concurrency
(1, 8), a closed loop of `concurrency` clients; every client sends each snapshot to `/v1/focus`
and to the floor endpoint (`benchmarks.bare_server`: in the service's own process, the body's
chunks dropped as they arrive, the least reading it costs), byte for byte the same body on the
same connection, one right after the other, in alternating order. Reported, with their sample
counts (`benchmarks.percentiles` quotes only the percentiles a count supports):

- client round trip; every Server-Timing stage the server names (unknown names included);
- **overhead** = total - model: everything the service adds beside the model, the project's one
  definition (queueing included: at concurrency > 1 it is mostly the wait for the model slot);
  beside it the sum the README's historical "processing ≤ 1 ms" target was set on, under its own
  name (`admit_decode_allocate_telemetry_encode_ms`), and `unattributed_ms` (total minus the
  named stages: what no stage accounts for);
- the service's receive over the floor's, paired request by request (median of the per-pair
  ratios, and the ratio of the p50s);
- `Scorer.score` (`session.run` of the service's own session: its graph, precision, session
  options and arena run options, built from the same settings) on the same inputs, beside the
  model stage;
- errors, and throughput (service requests over the time at least one was in flight, so the
  floor requests between them do not count against it).

Equal conditions on both sides. Each client's first `WARMUP` request pairs (its new connection;
at concurrency > 1 also the opening burst, all queued at once) are sent but not counted. Both
endpoints run in one process, on one event loop, with one uvicorn configuration. The service runs
its model in `--max-concurrency` slots (1 here); its bodies are read before the slot, but in a
closed loop behind one slot its answers, and so the clients' next uploads, come one at a time.
The floor gets the same admission: as many slots as the service, each held for the whole
request, its wait outside the timed receive as the service's admission is outside its own. Since
each floor request is sent by the same client right beside its service request, both are read
under the same load; the floor is never given more company than the service, so its receive
stays a floor. The pairing holds at every concurrency, not only at 1.

    python -m benchmarks.latency [--quick] [--sizes 8192] [--dims 512] [--formats binary]
                                 [--concurrency 1 8] [--requests 120] [--min-seconds 20]
                                 [--out report.json]

Embeddings are sent as float16 (the production format); the D = 512, N = 8,192 binary
configuration is also run with float32 embeddings (the CPU graph's own dtype: no conversion).
D other than 256 is a random-init export cached in .bench/ (needs the export extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
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

from lensnet_client import FocusClient, FocusError, synthetic_layout
from lensnet_client.client import _Protocol, parse_server_timing
from model_export.artifact import ArtifactError, load_manifest
from service.runtime import Scorer
from service.settings import Settings

from . import REPO, git_commit, percentiles, provenance
from .bare_server import FLOOR_PATH

__all__ = ["REPO", "free_port", "git_commit", "model_dir", "percentiles", "server", "snapshots"]

CACHE = REPO / ".bench"
SIZES = (512, 2048, 8192)
DIMS = (256, 512)
FORMATS = ("binary", "json")
CONCURRENCY = (1, 8)
HISTORICAL_SUM = ("admit", "decode", "allocate", "telemetry", "encode")  # the README's old "processing"
VARIANTS = 4  # distinct snapshots per configuration, cycled
WARMUP = 1  # request pairs per client sent but not counted (its new connection; the opening burst)
REQUESTS = {512: 200, 2048: 60, 8192: 20, 16384: 10}  # counted per configuration (binary; JSON half)
SLOTS = 1  # the service's --max-concurrency, and so the floor endpoint's
TARGET_HISTORICAL_SUM_MS, TARGET_RECEIVE_RATIO = 1.0, 1.1


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
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = "exited" if process.poll() is not None else "did not become ready"
                    raise RuntimeError(f"server {state}: {log.read().decode()[-2000:]}")
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


Bodies = list[tuple[bytes, dict[str, str]]]


def focus_bodies(fmt: str, snaps: list, n: int) -> Bodies:
    """The exact bytes and headers `FocusClient.focus(..., w_max=n)` sends for each snapshot."""
    protocol = _Protocol(fmt, 0, 0, 0)  # type: ignore[arg-type]
    return [protocol.focus_request((e, lod, pos), n, {}, None, False, None) for e, lod, pos in snaps]


class InFlight:
    """The time during which at least one service request was in flight, for throughput."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count, self.since, self.busy_s, self.answered = 0, 0.0, 0.0, 0

    @contextmanager
    def request(self) -> Iterator[None]:
        with self.lock:
            if self.count == 0:
                self.since = time.perf_counter()
            self.count += 1
        try:
            yield
        finally:
            with self.lock:
                self.count -= 1
                self.answered += 1
                if self.count == 0:
                    self.busy_s += time.perf_counter() - self.since


class Samples:
    """The counted requests of one configuration: per-request series, summarised by `report`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        names = ("client", "overhead", "historical_sum", "unattributed", "floor_admit", "floor_receive")
        self.series: dict[str, list[float]] = {name: [] for name in (*names, "receive_ratio")}
        self.stages: dict[str, list[float]] = {}

    def add(self, client_ms: float, timing: dict[str, float], floor: dict[str, float]) -> None:
        named = sum(ms for stage, ms in timing.items() if stage != "total")
        row = {
            "client": client_ms,
            "overhead": timing["total"] - timing["model"],
            "historical_sum": sum(timing.get(stage, 0.0) for stage in HISTORICAL_SUM),
            "unattributed": timing["total"] - named,
            "floor_admit": floor["admit"],
            "floor_receive": floor["receive"],
            "receive_ratio": timing["receive"] / floor["receive"],
        }
        with self.lock:
            for name, value in row.items():
                self.series[name].append(value)
            for stage, ms in timing.items():
                self.stages.setdefault(stage, []).append(ms)

    def report(self) -> dict[str, Any]:
        s = {name: percentiles(values) for name, values in self.series.items()}
        server = {stage: percentiles(values) for stage, values in self.stages.items()}
        return {
            "requests": s["client"]["samples"],
            "client_ms": s["client"],
            "server_ms": server,
            "overhead_ms": s["overhead"],
            "admit_decode_allocate_telemetry_encode_ms": s["historical_sum"],
            "unattributed_ms": s["unattributed"],
            "floor_ms": {"admit": s["floor_admit"], "receive": s["floor_receive"]},
            "receive_paired_ratio": s["receive_ratio"],
            "receive_ratio_of_p50s": _ratio(server.get("receive", {}), s["floor_receive"]),
        }


def drive(
    url: str, fmt: str, snaps: list, n: int, concurrency: int, requests: int, min_seconds: float
) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each sending every snapshot to the service and (the same
    bytes, on the same connection) to the floor, until `requests` service requests are counted and
    `min_seconds` have passed; each client's first WARMUP pairs are not counted."""
    bodies = focus_bodies(fmt, snaps, n)
    samples, in_flight, errors = Samples(), InFlight(), []
    counter = itertools.count()
    until = time.perf_counter() + min_seconds

    def worker() -> None:
        with FocusClient(url, format=fmt, retries=0, timeout=600) as client:  # type: ignore[arg-type]

            def to_floor(variant: int) -> dict[str, float]:
                content, headers = bodies[variant]
                response = client.http.post(FLOOR_PATH, content=content, headers=headers)  # the same connection
                return parse_server_timing(response.headers["server-timing"])

            def to_service(variant: int) -> tuple[float, dict[str, float]] | None:
                """The client's round trip (ms) and the Server-Timing stages; None on an error."""
                with in_flight.request():
                    start = time.perf_counter()
                    try:
                        result = client.focus(*snaps[variant], w_max=n)
                    except (FocusError, httpx.HTTPError) as exc:
                        errors.append(str(exc))
                        return None
                    return (time.perf_counter() - start) * 1e3, result.server_timing

            for sent in itertools.count():
                k = next(counter) if sent >= WARMUP else None
                if k is not None and k >= requests and time.perf_counter() >= until:
                    return
                variant = (sent if k is None else k) % len(snaps)
                if sent % 2 == 0:  # the order alternates, so neither side always follows the other's answer
                    floor, answer = to_floor(variant), to_service(variant)
                else:
                    answer, floor = to_service(variant), to_floor(variant)
                if k is not None and answer is not None:
                    samples.add(*answer, floor)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        **samples.report(),
        "warmup_requests": WARMUP * concurrency,
        "errors": len(errors),
        "error_samples": errors[:3],
        "throughput_rps": round(in_flight.answered / in_flight.busy_s, 3),
    }


def service_scorer(settings: Settings, precision: str) -> Scorer:
    """The scorer the service builds from `settings`, on the graph of the precision it serves."""
    return Scorer(
        settings.model_dir, load_manifest(settings.model_dir), precision, settings.intra_op_threads,
        settings.intra_op_spinning, probe_entries=settings.auto_probe_entries,
        shrink_entries=settings.arena_shrink_entries, device=settings.device,
    )  # fmt: skip


def session_run(scorer: Scorer, snaps: list, runs: int) -> dict[str, float | int]:
    """ms of `Scorer.score` (one `session.run` of the service's own session, with its session and
    arena run options) on the same inputs, in the dtype its decoder hands the model; the first
    call is not timed."""
    inputs = [(e.astype(scorer.input_dtype), lod, pos) for e, lod, pos in snaps]
    scorer.score(*inputs[0])
    times = []
    for k in range(runs):
        start = time.perf_counter()
        scorer.score(*inputs[k % len(inputs)])
        times.append((time.perf_counter() - start) * 1e3)
    return percentiles(times)


def requests_for(n: int, fmt: str, quick: bool, override: int | None) -> int:
    """Counted requests per configuration: `override`, else REQUESTS (half for JSON, an eighth quick)."""
    if override is not None:
        return override
    count = REQUESTS.get(n, 10) // (2 if fmt == "json" else 1)
    return max(4, count // 8) if quick else count


def service_settings(path: Path, port: int, sizes: list[int]) -> tuple[Settings, list[str]]:
    """The service's settings and the command line that serves it with the floor beside it (one
    source for both)."""
    flags: dict[str, Any] = {
        "model_dir": path, "port": port, "queue_size": 32, "max_concurrency": SLOTS, "warmup_sizes": sizes,
        "log_level": "warning",
    }  # fmt: skip
    args = ["-m", "benchmarks.bare_server"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", json.dumps(value) if isinstance(value, list) else str(value)]
    return Settings(**flags), args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="an eighth of the requests per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="WC lengths N")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="embedding widths D (256: the bundled model)")
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY)
    parser.add_argument("--requests", type=int, help=f"counted requests per configuration (default {REQUESTS})")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="keep each configuration going this long")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    about = provenance(onnxruntime=ort.__version__)  # the code measured: read before the runs, not after
    results: list[dict[str, Any]] = []
    for d in args.dims:
        url = f"http://127.0.0.1:{(port := free_port())}"
        settings, command = service_settings(model_dir(d), port, list(args.sizes))
        with server(command, url, "/readyz"):
            served = httpx.get(url + "/v1/model").json()
            scorer = service_scorer(settings, served["precision"])
            configurations = [
                (n, "float16", fmt, c) for n in args.sizes for fmt in args.formats for c in args.concurrency
            ]
            if d == 512 and 8192 in args.sizes and "binary" in args.formats:
                configurations.append((8192, "float32", "binary", 1))  # the CPU graph's own dtype
            baselines: dict[int, dict[str, float | int]] = {}
            for n, payload, fmt, concurrency in configurations:
                snaps = snapshots(n, d, seed=n + d, dtype=np.dtype(payload).type)
                if n not in baselines:  # the service idle meanwhile
                    baselines[n] = session_run(scorer, snaps, requests_for(n, "binary", args.quick, args.requests))
                count = requests_for(n, fmt, args.quick, args.requests)
                run = drive(url, fmt, snaps, n, concurrency, count, args.min_seconds)
                results.append(
                    {"d": d, "n": n, "format": fmt, "concurrency": concurrency, "payload": payload,
                     "body_bytes": len(focus_bodies(fmt, snaps[:1], n)[0][0]), **run,
                     "session_run_ms": baselines[n],
                     "model_over_session_run_p50": _ratio(run["server_ms"].get("model", {}), baselines[n])}
                )  # fmt: skip
                progress = {k: results[-1][k] for k in ("d", "n", "format", "concurrency", "payload", "requests")}
                progress |= {"overhead_p50": run["overhead_ms"].get("p50"),
                             "receive_paired_ratio_p50": run["receive_paired_ratio"].get("p50")}  # fmt: skip
                print(json.dumps(progress), file=sys.stderr)
            del scorer
    key = [r for r in results if (r["d"], r["n"], r["format"], r["payload"]) == (512, 8192, "binary", "float16")]
    report = {
        "benchmark": "latency",
        **about,
        "device": served["provider"],
        "precision": served["precision"],
        "service_command": ["python", *command],
        "warmup_requests_per_client": WARMUP,
        "results": results,
        "targets": {
            "admit_decode_allocate_telemetry_encode_p50_ms_at_d512_n8192_binary": TARGET_HISTORICAL_SUM_MS,
            "receive_paired_ratio_p50_max": TARGET_RECEIVE_RATIO,
            "errors_at_concurrency_above_1": 0,
        },
        "targets_met": {  # null: not measured in this run
            "admit_decode_allocate_telemetry_encode": _all_or_none(
                r["admit_decode_allocate_telemetry_encode_ms"]["p50"] <= TARGET_HISTORICAL_SUM_MS
                for r in key
                if "p50" in r["admit_decode_allocate_telemetry_encode_ms"]
            ),
            **{
                f"receive_{fmt}": _all_or_none(
                    r["receive_paired_ratio"]["p50"] <= TARGET_RECEIVE_RATIO
                    for r in results
                    if r["format"] == fmt and "p50" in r["receive_paired_ratio"]
                )
                for fmt in FORMATS
            },
            "errors": _all_or_none(r["errors"] == 0 for r in results if r["concurrency"] > 1),
        },
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def _ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float | None:
    """The ratio of two summaries' p50s; None where either has too few samples for one."""
    if "p50" not in numerator or "p50" not in denominator:
        return None
    return round(numerator["p50"] / denominator["p50"], 3)


def _all_or_none(checks: Iterator[bool]) -> bool | None:
    values = list(checks)
    return all(values) if values else None


if __name__ == "__main__":
    main()
