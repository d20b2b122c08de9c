"""Feedback cost: POST /v1/feedback at a fixed 10,000 items/s beside the focus endpoint's p50.

Two parts, one JSON report:

- **end to end**: the real server (bundled model, D = 256) answers /v1/focus at concurrency 1
  (binary frames, N = `--entries`, 512 by default) while a second process offers feedback at a
  fixed rate (`--rate` items/s in batches of `--batch`, on an open-loop schedule: a batch is sent
  when it is due whether or not earlier ones were answered, from SENDERS connections; the sender
  runs niced, as its client work is not the service's cost). Every item names a
  different real edit of an earlier focus answer, so every one is matched and feeds the windows
  and histograms (the costly path; the pool is made first by focus requests that expand every
  gist of an all-LOD-1 WC, ~500 edits each). Phases without and with feedback alternate in
  pairs, in both orders (off/on, on/off, …), each after `--settle-s` that is not measured; the
  focus p50s are compared paired, in one run, with a bootstrap interval over the pairs. Overhead
  beside the model is total − model (Server-Timing), reported per condition.
- **in process**: the route's own work (bulk read of the body, matching, windows, histograms) per
  item for fully matched and fully duplicate batches, the body's parse alone, the same bodies read
  by their pydantic model and decoded by the standard library's json.loads for scale, and one
  gauge refresh over full windows.

    python -m benchmarks.feedback [--rate 10000] [--batch 500] [--entries 512] [--pairs 24] [--out report.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from lensnet_client import FocusClient, synthetic_layout
from lensnet_client.layout import Edit
from service.metrics import Metrics
from service.policy import FeedbackBody, PolicyHealth
from service.settings import Settings

from . import p50_ratio_interval, provenance
from .latency import free_port, server

TARGET_P50_RATIO = 1.05
SENDERS = 4  # connections the offered load is spread over (a slow answer must not lower the rate)
SENDER_NICE = 10


def fresh_edits(
    client: FocusClient, wanted: int, n: int, rng: np.random.Generator
) -> tuple[list[tuple[str, int]], int]:
    """At least `wanted` distinct real edits, (decision_id, index): focus requests over WCs of `n`
    LOD-1 gists with room and thresholds to expand every positive one; and how many requests."""
    model = client.model()
    found: list[tuple[str, int]] = []
    steps = 0
    while len(found) < wanted:
        lod = np.ones(n, dtype=np.int64)
        positions = int(rng.integers(0, 1 << 20)) * model["block_size"] ** 2 + model["block_size"] * np.arange(n)
        embeddings = rng.standard_normal((n, model["embed_dim"])).astype(np.float16)
        result = client.focus(embeddings, lod, positions.astype(np.int64), w_max=n * model["block_size"],
                              max_edits=1024, tau_expand=1e-6, tau_collapse=1e-6)  # fmt: skip
        found += [(result.decision_id, k) for k in range(len(result.edits))]
        steps += 1
    return found, steps


def offer(port: int, bodies: list[bytes], items_per_s: float, batch: int, go: Event, start: Any, stop: Event,
          out: Any, nice: int) -> None:  # fmt: skip
    """While `go` is set, post `bodies` in order, each once, on a fixed schedule: batch j of a phase
    is due at the phase's `start` (time.monotonic) + j·batch/items_per_s, whether or not earlier
    ones were answered (SENDERS connections); until `stop`. Its client work (http.client, bodies
    encoded beforehand: ~0.2 ms a post) is not the service's cost, so it runs at `nice` (--sender-nice):
    below the server's threads, but not so low that a busy machine stops it keeping the schedule
    (at nice 19 it fell ~1 s behind while other processes kept the 2 cores busy); the report says
    how far behind it fell."""
    os.nice(nice)
    lock = threading.Lock()
    state = {"next": 0, "start": -1.0, "due": 0}
    tally = {"accepted": 0, "other": 0, "late_ms_max": 0.0, "exhausted": False}

    def claim() -> tuple[int, float, float] | None:
        """The next body, when it is due and its phase's start; None without a phase or bodies."""
        with lock:
            if state["start"] != start.value:  # a new phase: its schedule starts at 0
                state["start"], state["due"] = start.value, 0
            if state["next"] >= len(bodies):
                tally["exhausted"] = True
                return None
            k, due = state["next"], state["start"] + state["due"] * batch / items_per_s
            state["next"] += 1
            state["due"] += 1
            return k, due, state["start"]

    def send() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            if not go.wait(0.1) or (claimed := claim()) is None:
                continue
            k, due, phase = claimed
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if not go.is_set() or start.value != phase:  # its phase ended while it waited: not offered
                continue
            late = (time.monotonic() - due) * 1e3
            connection.request("POST", "/v1/feedback", bodies[k], {"content-type": "application/json"})
            response = connection.getresponse()
            response.read()
            with lock:
                tally["accepted" if response.status == 200 else "other"] += 1
                tally["late_ms_max"] = max(tally["late_ms_max"], late)
        connection.close()

    threads = [threading.Thread(target=send) for _ in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put(tally)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(items: list[tuple[str, int, float]]) -> bytes:
    return json.dumps({"items": [{"decision_id": d, "edit": e, "delta_nll": v} for d, e, v in items]}).encode()


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ["-m", "service", "--port", str(port), "--warmup-sizes", f"[{args.entries}]", "--log-level", "warning",
             "--decision-memory-s", "3600"]  # fmt: skip
    with server(flags, url, "/readyz") as process, FocusClient(url, timeout=60) as client:
        rng = np.random.default_rng(0)
        on_s = args.pairs * (args.phase_s + args.settle_s)
        made = time.perf_counter()
        edits, steps = fresh_edits(client, int(args.rate * on_s * 1.3) + args.batch, 512, rng)
        made = time.perf_counter() - made
        items = [(d, k, float(v)) for (d, k), v in zip(edits, rng.normal(0, 0.1, len(edits)), strict=True)]
        bodies = [body(items[i : i + args.batch]) for i in range(0, len(items) - args.batch + 1, args.batch)]
        context = multiprocessing.get_context("spawn")
        go, start, stop, out = context.Event(), context.Value("d", -1.0), context.Event(), context.Queue()
        sender = context.Process(
            target=offer, args=(port, bodies, args.rate, args.batch, go, start, stop, out, args.sender_nice)
        )
        sender.start()
        lod, positions = synthetic_layout(args.entries, 32, 2, rng)
        embeddings = rng.standard_normal((args.entries, 256)).astype(np.float16)
        client.focus(embeddings, lod, positions, w_max=args.entries)
        latency: dict[str, list[list[float]]] = {"off": [], "on": []}
        total: dict[str, list[float]] = {"off": [], "on": []}
        overhead: dict[str, list[float]] = {"off": [], "on": []}
        cpu = {"off": [0.0, 0.0], "on": [0.0, 0.0]}  # server CPU seconds, measured seconds
        on_time = 0.0
        try:
            for pair in range(args.pairs):
                for phase in ("off", "on") if pair % 2 == 0 else ("on", "off"):
                    if phase == "on":
                        start.value = time.monotonic()
                        go.set()
                    began = time.perf_counter()
                    measured: list[float] = []
                    cpu_start: tuple[float, float] | None = None
                    while (now := time.perf_counter()) < began + args.settle_s + args.phase_s:
                        if cpu_start is None and now >= began + args.settle_s:
                            cpu_start = cpu_seconds(process.pid), now
                        result = client.focus(embeddings, lod, positions, w_max=args.entries)
                        if now >= began + args.settle_s:  # requests sent after the settling time
                            measured.append((time.perf_counter() - now) * 1e3)
                            timing = result.server_timing
                            total[phase].append(timing["total"])
                            overhead[phase].append(timing["total"] - timing["model"])
                    latency[phase].append(measured)
                    if cpu_start is not None:
                        cpu[phase][0] += cpu_seconds(process.pid) - cpu_start[0]
                        cpu[phase][1] += time.perf_counter() - cpu_start[1]
                    if phase == "on":
                        go.clear()  # until the next on phase: on_time counts only the offered load's time
                        on_time += time.perf_counter() - began
            stop.set()
            tally = out.get(timeout=60)
        finally:
            stop.set()
            sender.join(timeout=60)
        text = client.http.get("/metrics").text
    counts = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lensnet_feedback_items_total{")
    }
    on, off = latency["on"], latency["off"]
    pooled = {phase: np.concatenate(runs) for phase, runs in latency.items()}
    p50 = {phase: float(np.median(values)) for phase, values in pooled.items()}
    ratio = p50["on"] / p50["off"]
    accepted = tally["accepted"] * args.batch / on_time
    busy = {phase: used / seconds for phase, (used, seconds) in cpu.items()}  # cores, on average
    return {
        "entries": args.entries,
        "focus_requests_measured": {phase: int(values.size) for phase, values in pooled.items()},
        "focus_client_p50_ms": p50,
        "focus_client_p90_ms": {phase: float(np.percentile(v, 90)) for phase, v in pooled.items()},
        "p50_ratio_on_off": ratio,
        "p50_ratio_95ci_pairs": p50_ratio_interval(on, off),
        "p50_ratio_per_pair": [float(np.median(a) / np.median(b)) for a, b in zip(on, off, strict=True)],
        "server_total_p50_ms": {phase: float(np.median(v)) for phase, v in total.items()},
        "server_overhead_beside_model_p50_ms": {phase: float(np.median(v)) for phase, v in overhead.items()},
        "server_cpu_cores_busy": busy,
        "server_cpu_us_per_feedback_item": (busy["on"] - busy["off"]) / accepted * 1e6,
        "feedback_offered_items_per_s": args.rate,
        "feedback_accepted_items_per_s": accepted,
        "feedback_batches": {"accepted_200": tally["accepted"], "other": tally["other"], "items_per_batch": args.batch,
                             "most_behind_schedule_ms": tally["late_ms_max"], "pool_exhausted": tally["exhausted"]},
        "feedback_items_by_result": counts,
        "edit_pool": {"edits": len(edits), "focus_steps": steps, "seconds": made},
        "phases": {"pairs": args.pairs, "orders": "off/on, on/off alternating", "phase_s": args.phase_s,
                   "settle_s_unmeasured": args.settle_s},
        "target": f"feedback at {args.rate:.0f} items/s raises the focus p50 by at most 5 %",
        "met": bool(ratio <= TARGET_P50_RATIO and accepted >= 0.99 * args.rate and not tally["exhausted"]),
    }  # fmt: skip


def in_process(batch: int, repeats: int) -> dict[str, Any]:
    """µs per item of the route's work, all matched vs all duplicates; one gauge refresh, full windows."""
    settings = Settings()
    policy = PolicyHealth(settings, Metrics(0.003, 2))
    parser = FeedbackBody(settings.feedback_max_items)
    rng = np.random.default_rng(1)
    per_decision = 8
    bodies = []
    for _ in range(repeats):
        ids = []
        for _ in range(batch // per_decision):
            made = [Edit("collapse", 32 * k, 32, 1, 0, 1, 32 * k, 32, float(rng.uniform(-1, 1)), "budget")
                    for k in range(per_decision)]  # fmt: skip
            ids.append(policy.memory.remember(made, time.monotonic()))
        bodies.append(body([(d, k, float(rng.normal())) for d in ids for k in range(per_decision)]))

    def per_item_us(work: Callable[[bytes], object]) -> float:
        start = time.perf_counter()
        for raw in bodies:
            work(raw)
        return (time.perf_counter() - start) / (len(bodies) * batch) * 1e6

    def handle(raw: bytes) -> bytes:
        return policy.feedback(parser.parse(raw))

    # The route's parse (the C reader), the body's model (what reads every other body), and the
    # standard library's JSON decode alone (no checks, no columns) for scale.
    parse_us = per_item_us(parser.parse)
    by = {"model": per_item_us(parser.model.model_validate_json), "json.loads decode only": per_item_us(json.loads)}
    matched_us, duplicate_us = per_item_us(handle), per_item_us(handle)  # every item matched, then all repeats
    windows = policy.correlation.windows.values()
    for _ in range(max(w.capacity for w in windows) // batch + 1):
        x = rng.uniform(-1, 1, batch)
        policy.correlation.add(rng.random(batch) < 0.5, x, x + rng.normal(0, 0.3, batch), time.monotonic())
    start = time.perf_counter()
    policy.refresh()
    refresh_ms = (time.perf_counter() - start) * 1e3
    return {
        "items_per_batch": batch,
        "us_per_item_parse": parse_us,
        "us_per_item_parse_otherwise": by,
        "us_per_item_matched": matched_us,
        "us_per_item_duplicate": duplicate_us,
        "cpu_share_at_10k_items_per_s_matched": matched_us * 1e4 / 1e6,
        "gauge_refresh_ms_full_windows": refresh_ms,
        "window_samples": {f"{a}/{k}": w.capacity for (a, k), w in policy.correlation.windows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=10_000, help="feedback items per second, offered")
    parser.add_argument("--batch", type=int, default=500, help="items per POST")
    parser.add_argument("--entries", type=int, default=512, help="WC length of the focus requests")
    parser.add_argument(
        "--pairs", type=int, default=24, help="off/on phase pairs (orders alternate; 12 left a ±5 %% interval)"
    )
    parser.add_argument("--phase-s", type=float, default=1.5, help="measured seconds per phase")
    parser.add_argument("--settle-s", type=float, default=0.25, help="unmeasured seconds at the start of a phase")
    parser.add_argument("--sender-nice", type=int, default=SENDER_NICE, help="the feedback sender's nice value")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()
    about = provenance()  # the code measured: read before the runs, not after
    about["machine"]["load_average_at_start"] = os.getloadavg()
    report = {
        "benchmark": "feedback",
        **about,
        "in_process": in_process(args.batch, 20),
        "end_to_end": end_to_end(args),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
