# syntax=docker/dockerfile:1
#
# LensNet focus service images (deploy/README.md has the operator guide).
#
#   docker build --target gpu -t lensnet-focus:gpu .   # onnxruntime-gpu + CUDA 13 wheels (the default target)
#   docker build --target cpu -t lensnet-focus:cpu .   # python:slim + onnxruntime, no CUDA
#
# Both run `lensnet-serve` as PID 1 (exec-form ENTRYPOINT) as an unprivileged user, so SIGTERM
# reaches the server and starts its drain. Arguments after the image name go to lensnet-serve;
# settings also come from LENSNET_* variables. The bundled demo model is at
# /opt/lensnet/models/default; mount a real artifact elsewhere and point LENSNET_MODEL_DIR at it.
# Final stages hold a virtualenv with the runtime only: no compilers, pip, setuptools, torch or onnx
# (the service's C kernels are compiled in the venv stages, for the final image's Python).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu >= 1.27 from PyPI is built for CUDA 13 and cuDNN 9, which it brings as nvidia-*
# wheels (its [cuda,cudnn] extras) and loads itself: the base needs no CUDA, only the host's
# NVIDIA driver (>= 580 for CUDA 13), mounted by the NVIDIA container toolkit.
ARG GPU_BASE_IMAGE=ubuntu:24.04

# --- source: the client wheel, the sources, and the runtime requirements of each variant ---
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clients/ clients/
COPY service/ service/
COPY model_export/ model_export/
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ./clients \
    && python deploy/docker/requirements.py cpu > /wheels/requirements-cpu.txt \
    && python deploy/docker/requirements.py gpu > /wheels/requirements-gpu.txt

# --- cpu-venv: the CPU runtime in /opt/lensnet/venv (the service's C kernels compiled here) ---
FROM ${PYTHON_IMAGE} AS cpu-venv
# Unpinned apt versions: the base image tag pins the distribution release; its security updates
# should be picked up on rebuild rather than fail the build when a pin disappears.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=source /wheels /wheels
COPY --from=source /src /src
RUN python -m venv /opt/lensnet/venv \
    && /opt/lensnet/venv/bin/pip install --no-cache-dir -r /wheels/requirements-cpu.txt \
    && /opt/lensnet/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl /src \
    && /opt/lensnet/venv/bin/pip uninstall --yes pip setuptools

# --- cpu: slim CPU image ---
FROM ${PYTHON_IMAGE} AS cpu
# The base image's own pip/setuptools/wheel are build tools the service never uses.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 lensnet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lensnet
COPY --from=cpu-venv /opt/lensnet/venv /opt/lensnet/venv
COPY models/default /opt/lensnet/models/default
ENV PATH=/opt/lensnet/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LENSNET_HOST=0.0.0.0 \
    LENSNET_PORT=8000 \
    LENSNET_MODEL_DIR=/opt/lensnet/models/default
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness (/readyz) is for load balancers and Kubernetes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LENSNET_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["lensnet-serve"]

# --- gpu-venv: the CUDA runtime in /opt/lensnet/venv (same Python as the gpu stage) ---
FROM ${GPU_BASE_IMAGE} AS gpu-venv
# Same reason as above for unpinned apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=source /wheels /wheels
COPY --from=source /src /src
RUN python3 -m venv /opt/lensnet/venv \
    && /opt/lensnet/venv/bin/pip install --no-cache-dir -r /wheels/requirements-gpu.txt \
    && /opt/lensnet/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl /src \
    && /opt/lensnet/venv/bin/pip uninstall --yes pip setuptools

# --- gpu: onnxruntime-gpu with its CUDA/cuDNN wheels (LENSNET_PRECISION=auto runs fp16 on CUDA) ---
FROM ${GPU_BASE_IMAGE} AS gpu
# Same reason as above for unpinned apt versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lensnet \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lensnet
COPY --from=gpu-venv /opt/lensnet/venv /opt/lensnet/venv
COPY models/default /opt/lensnet/models/default
# NVIDIA_*: what the container toolkit mounts from the host (the driver; CUDA comes from the venv).
ENV PATH=/opt/lensnet/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LENSNET_HOST=0.0.0.0 \
    LENSNET_PORT=8000 \
    LENSNET_MODEL_DIR=/opt/lensnet/models/default
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LENSNET_PORT', '8000') + '/healthz', timeout=2)"]
ENTRYPOINT ["lensnet-serve"]
