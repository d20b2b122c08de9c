"""What the Open Inference Protocol path adds over /v1/score: the same snapshots, binary both ways
(the service's frame vs a v2 request with binary tensors, binary output), sent in interleaved
pairs to one real server (uvicorn on loopback, the bundled model), so both see the same machine.

    python -m benchmarks.v2_overhead [--sizes 512 2048 8192] [--pairs 40] [--out report.json]

Reports, per N, with sample counts: the server's total (Server-Timing), its overhead (total minus
model, the project's definition: everything beside the model, so all the protocol's decoding and
encoding can change) and the client's round trip for both endpoints; the median over pairs of
v2's time over /v1/score's (pairing cancels the model time's drift on a shared machine) and of
v2's overhead minus /v1/score's; and whether v2's scores equal /v1/score's bit for bit. The first
`WARMUP` pairs per N are not counted. Target: that paired ratio of server totals at most 1.05.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from lensnet_client import frame, oip
from lensnet_client.client import parse_server_timing

from . import percentiles, provenance
from .latency import free_port, model_dir, server, snapshots

TARGET_RATIO = 1.05
PAIRS = {512: 200, 2048: 60, 8192: 16}
WARMUP = 2  # pairs per N sent but not counted


def post(
    http: httpx.Client, path: str, body: bytes, headers: dict[str, str]
) -> tuple[float, dict[str, float], httpx.Response]:
    """One request: client round trip (ms), the Server-Timing stages (ms), the response."""
    start = time.perf_counter()
    response = http.post(path, content=body, headers=headers)
    elapsed = (time.perf_counter() - start) * 1e3
    response.raise_for_status()
    return elapsed, parse_server_timing(response.headers.get("server-timing")), response


def measure(url: str, name: str, n: int, pairs: int) -> dict[str, Any]:
    snaps = snapshots(n, 256, seed=n)
    arrays = [{"embeddings": e, "lod": lod, "positions": pos} for e, lod, pos in snaps]  # the same dtypes both ways
    v1_headers = {"content-type": frame.MEDIA_TYPE, "accept": frame.MEDIA_TYPE}
    v1 = [(frame.pack({}, a), v1_headers) for a in arrays]
    v2 = [oip.pack(a) for a in arrays]
    path = f"/v2/models/{name}/infer"
    samples: dict[str, dict[str, list[float]]] = {
        endpoint: {"total": [], "overhead": [], "client": []} for endpoint in ("v1_score", "v2_infer")
    }
    with httpx.Client(base_url=url, timeout=600) as http:
        _, v1_answer = frame.unpack(post(http, "/v1/score", *v1[0])[2].content)
        answer = post(http, path, *v2[0])[2]
        scores = np.frombuffer(answer.content[int(answer.headers[oip.HEADER_LENGTH]) :], dtype="<f4")
        same = bool(np.array_equal(v1_answer["scores"], scores))
        for k in range(WARMUP + pairs):
            variant = k % len(snaps)
            order = [("v1_score", "/v1/score", v1[variant]), ("v2_infer", path, v2[variant])]
            for endpoint, target, (body, headers) in order if k % 2 == 0 else order[::-1]:
                client, timing, _ = post(http, target, body, headers)
                if k >= WARMUP:
                    samples[endpoint]["client"].append(client)
                    samples[endpoint]["total"].append(timing["total"])
                    samples[endpoint]["overhead"].append(timing["total"] - timing["model"])
    result: dict[str, Any] = {"n": n, "pairs": pairs, "warmup_pairs": WARMUP, "scores_bit_identical": same}
    for endpoint, values in samples.items():
        result[endpoint] = {f"{what}_ms": percentiles(series) for what, series in values.items()}
        result[endpoint]["body_bytes"] = len((v1 if endpoint == "v1_score" else v2)[0][0])
    for what in ("total", "client"):  # paired: each v2 request over the /v1/score one sent beside it
        ratios = np.asarray(samples["v2_infer"][what]) / np.asarray(samples["v1_score"][what])
        result[f"paired_ratio_{what}_p50"] = round(float(np.median(ratios)), 4)
    added = np.asarray(samples["v2_infer"]["overhead"]) - np.asarray(samples["v1_score"]["overhead"])
    result["paired_overhead_added_ms"] = percentiles(added)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="WC lengths N (8192: ~4.5 GiB)")
    parser.add_argument("--pairs", type=int, help=f"counted request pairs per N (default {PAIRS}, else 20)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    about = provenance(onnxruntime=ort.__version__)  # the code measured: read before the runs, not after
    path = model_dir(256)
    name = json.loads((path / "manifest.json").read_text())["model"]["name"]
    url = f"http://127.0.0.1:{(port := free_port())}"
    command = ["-m", "service", "--port", str(port), "--model-dir", str(path), "--warmup-sizes",
               json.dumps(args.sizes), "--log-level", "warning"]  # fmt: skip
    results = []
    with server(command, url, "/readyz"):
        served = httpx.get(url + "/v1/model").json()
        for n in args.sizes:
            results.append(measure(url, name, n, args.pairs or PAIRS.get(n, 20)))
            progress = {k: results[-1][k] for k in ("n", "paired_ratio_total_p50")}
            progress["overhead_added_p50_ms"] = results[-1]["paired_overhead_added_ms"].get("p50")
            print(json.dumps(progress), file=sys.stderr)
    report = {
        "benchmark": "v2_overhead",
        **about,
        "service_command": ["python", *command],
        "device": served["provider"],
        "results": results,
        "target": {"paired_ratio_total_p50_max": TARGET_RATIO, "scores_bit_identical": True},
        "target_met": {
            str(r["n"]): r["paired_ratio_total_p50"] <= TARGET_RATIO and r["scores_bit_identical"] for r in results
        },
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
