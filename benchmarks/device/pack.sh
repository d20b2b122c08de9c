#!/usr/bin/env bash
# Build what benchmarks/device/run.sh needs on a lent GPU machine that reaches no package index,
# in two git-ignored folders, each under the 64 MiB a call may carry beside the checkout:
#   .gpu/   part 1 of the fatbin-stripped CUDA provider of onnxruntime-gpu (xz)
#   .gpu2/  its part 2, the rest of the onnxruntime-gpu wheel, the service's wheels for
#           Python 3.12, the D = 1,280 artifact without its weights (slim.py), the commit
# Run from a clean checkout with .venv (scripts/bootstrap test); the D = 1,280 artifact comes from
# benchmarks.latency's cache (.bench/models/d1280, exported on first use).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}  # CUDA 13 build: the image's torch brings CUDA 13 libraries
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf .gpu .gpu2 && mkdir -p .gpu .gpu2/whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
download() { $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
             "${platforms[@]}" -d "$1" "${@:2}"; }
download "$WORK" "$ORT_GPU"
# The service's runtime packages the image lacks, at this venv's versions.
pins=$($PY -m pip freeze | grep -iE '^(fastapi|starlette|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|annotated[-_]types|annotated[-_]doc|typing[-_]inspection|uvicorn|httptools|opentelemetry[-_]api)==' || true)
[ -n "$pins" ] || { echo "pack.sh: .venv lacks the service's packages (scripts/bootstrap test)" >&2; exit 1; }
download .gpu2/whl $pins 2> >(grep -v "is ignored: it is neither" >&2)
(cd "$WORK" && unzip -q onnxruntime_gpu-*.whl && rm onnxruntime_gpu-*.whl)
capi="$WORK/onnxruntime/capi"
$PY -m benchmarks.device.strip_fatbin "$capi/libonnxruntime_providers_cuda.so" "$WORK/cuda.so" 90
rm "$capi/libonnxruntime_providers_cuda.so" "$capi/libonnxruntime_providers_tensorrt.so"
xz -9e -T2 -c "$WORK/cuda.so" > "$WORK/cuda.so.xz"
(cd "$WORK" && sha256sum cuda.so.xz) > .gpu2/cuda.so.xz.sha256
split -b 36M "$WORK/cuda.so.xz" "$WORK/cuda.so.xz."  # aa to the first call, the rest to the second
mv "$WORK/cuda.so.xz.aa" .gpu/
for part in "$WORK"/cuda.so.xz.a[b-z]; do [ ! -e "$part" ] || mv "$part" .gpu2/; done
(cd "$WORK" && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info) | xz -9 -T2 > .gpu2/ort-rest.tar.xz
$PY -c "from benchmarks.latency import model_dir; model_dir(1280)"
$PY -m benchmarks.device.slim strip .bench/models/d1280 .gpu2/d1280
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
echo "$commit" > .gpu2/commit
git ls-files -z | xargs -0 sha256sum > .gpu2/tree.sha256  # run.sh checks the carried tree against it
# Each call carries the checkout's tracked files beside its folder, 64 MiB in all.
tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f 1)
for carry in .gpu .gpu2; do
  total=$((tracked + $(du -sb "$carry" | cut -f 1)))
  echo "$carry: $((total >> 20)) MiB with the checkout"
  [ "$total" -le $((64 << 20)) ] || { echo "pack.sh: $carry is over the 64 MiB a call carries" >&2; exit 1; }
done
