#!/usr/bin/env bash
# The GPU checks in one call on a lent machine (Python 3.12 with torch and CUDA 13, no package
# index): install what pack.sh carried, build the C kernels, restore the D = 1,280 artifact, run
# the GPU tests and the model-stage, whole-request and session-step benchmarks, sampling each
# process's GPU memory (gpu_memory.csv; steps.txt says when each step ran); reports and logs under $OUT.
#   call 1 (carry .gpu):  mkdir -p /tmp/stage && cp .gpu/* /tmp/stage/
#   call 2 (carry .gpu2): bash benchmarks/device/run.sh   (ONLY="step names": just those; exit 1 if any failed)
set -uo pipefail
STAGE=${STAGE:-/tmp/stage}
SITE=/tmp/site
OUT=${OUT:?where reports go}
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
cp -r .gpu2/* "$STAGE"/ && mkdir -p "$SITE" || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$STAGE"/whl/*.whl || exit 1
tar -C "$SITE" -xJf "$STAGE/ort-rest.tar.xz" || exit 1
cat "$STAGE"/cuda.so.xz.a? > /tmp/cuda.so.xz && (cd /tmp && sha256sum --quiet -c "$STAGE/cuda.so.xz.sha256") || exit 1
xz -dc /tmp/cuda.so.xz > "$SITE/onnxruntime/capi/libonnxruntime_providers_cuda.so" || exit 1
# The reports name the commit pack.sh packed; a tree that differs from it here makes them dirty.
commit=$(cat "$STAGE/commit")
if ! sha256sum --quiet -c "$STAGE/tree.sha256" > "$LOGS/tree.log" 2>&1; then
  echo "the checkout differs from $commit (see tree.log): reports will say dirty" && commit="${commit%+dirty}+dirty"
fi
export PYTHONPATH="$SITE:$PWD:$PWD/clients" LENSNET_SOURCE_COMMIT=$commit
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
gcc -O2 -std=c11 -shared -fPIC -I"$include" service/core/_allocator.c -o "service/core/_allocator$suffix" -lm || exit 1
gcc -O2 -std=gnu11 -shared -fPIC -I"$include" service/core/_bulk.c -o "service/core/_bulk$suffix" || exit 1
mkdir -p .bench/models && rm -rf .bench/models/d1280 && cp -r "$STAGE/d1280" .bench/models/d1280
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nproc
  python3 -c "import onnxruntime as o, numpy, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 -m benchmarks.device.slim fill .bench/models/d1280 > "$LOGS/fill.log" 2>&1 || { cat "$LOGS/fill.log"; exit 1; }
failed=0
step() {  # name, time limit (s), command...: its output to $LOGS/name.log, its exit status noted
  local name=$1 limit=$2 status; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0  # ONLY="names": just those steps
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  [ "$status" = 0 ] || failed=1
  echo "$name: exit $status after $((SECONDS - start)) s, ended $(date +%T)" | tee -a "$LOGS/steps.txt"
}
# One process per group of engines: a CUDA fault in one (the first H200 run had one) loses no other.
model() { step "$1" "$2" python3 -m benchmarks.model_latency --devices cuda --dims 256 1280 \
            --sizes 512 2048 8192 16384 --runs 30 --out "$OUT/$1.json" "${@:3}"; }
latency() { step "$1" "$2" python3 -m benchmarks.latency --dims "$3" --sizes 512 2048 8192 16384 \
              --formats binary --concurrency 1 --requests 30 --out "$OUT/$1.json"; }
# GPU memory per process, four times a second, while the steps run (nvidia-smi's own timestamps).
nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv -lms 250 > "$OUT/gpu_memory.csv" 2>&1 &
sampler=$!
step pytest 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_runtime.py
# The fp32 graph (never served on CUDA) alone, from N = 2,048: at N = 512 its If node faulted on
# the H200 (cudnnCreate failed inside it, then an illegal memory access), ending the process's CUDA context.
model model_latency 60 --engines ort-fp16-cuda ort-fp16-cuda-iobinding --profile
model model_latency_fp32 40 --engines ort-fp32-cuda --sizes 2048 8192 16384
model model_latency_torch 50 --engines torch-eager-fp32-cuda torch-eager-fp16-cuda
latency latency_d256 80 256
latency latency_d1280 90 1280
# A session step at N = 8,192 on the GPU (issue: the whole step's p99 toward 3 ms at D = 256).
sessions() { step "$1" "$2" python3 -m benchmarks.sessions --n 8192 --dims "$3" --warmup 5 --no-soak \
               --out "$OUT/$1.json" "${@:4}"; }
sessions sessions_d256 60 256 --steps 100 --full-every 5
sessions sessions_d1280 60 1280 --steps 20 --full-every 2
kill "$sampler" 2> /dev/null
cp "$OUT/env.txt" "$LOGS/" && tar -C "$LOGS" -czf "$OUT/logs.tar.gz" .
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    report = json.loads(path.read_text())
    if report["benchmark"] == "sessions":
        for r in report["steady"]:
            total = r["step"]["stages_ms"]["total"]
            print(r["device"], r["precision"], r["d"], r["n"], "step total p50", total["p50"], "p99", total.get("p99"),
                  "overhead p50", r["step"]["overhead_ms"]["p50"], "targets:", json.dumps(r["targets"]))
        continue
    for r in report["results"]:
        if report["benchmark"] == "model_latency":
            print(r["d"], r["n"], r["engine"], r.get("ms", {}).get("p50"), r.get("error", "")[:80])
        else:
            server = r["server_ms"]
            print(r["d"], r["n"], *(f"{k} {server.get(k, {}).get('p50')}" for k in ("total", "receive", "model")),
                  "overhead", r["overhead_ms"].get("p50"), "client", r["client_ms"].get("p50"))
    print(path.stem, report.get("device", ""), report.get("precision", ""), "targets:",
          json.dumps(report.get("targets") if report["benchmark"] == "model_latency" else report.get("targets_met")))
PY
exit $failed
