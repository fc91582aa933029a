# syntax=docker/dockerfile:1
#
# The LGG tumor service: FastAPI + ONNX Runtime with the bundled models in models/.
#
#   CPU (default):  docker build -t lgg-tumor-service .
#   GPU (NVIDIA):   docker build --build-arg VARIANT=gpu -t lgg-tumor-service:gpu .
#                   docker run --gpus all -p 8000:8000 lgg-tumor-service:gpu
#
# GPU variant: onnxruntime-gpu 1.31.1 from PyPI is built against CUDA 13.0 and cuDNN 9 (its wheel says
# cuda_version = "13.0", and its [cuda]/[cudnn] extras pin nvidia-*-cu13 and nvidia-cudnn-cu13~=9.0; the CUDA
# provider links libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10). The base image below
# carries exactly those libraries. CUDA 13.0 needs an NVIDIA driver >= 580.65.06 on the host and the NVIDIA
# Container Toolkit. The TensorRT provider would also need TensorRT 10 (libnvinfer.so.10), which this image
# does not carry, so the GPU image asks for CUDA -> CPU only; onnxruntime-gpu 1.32+ may move to another CUDA:
# change ONNXRUNTIME_VERSION and CUDA_IMAGE together.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
# Plain onnxruntime (CPU provider only) keeps this image ~300 MB smaller than onnxruntime-gpu; only one of the
# two is ever installed in an image, so they cannot overwrite each other.
ENV ONNXRUNTIME_PACKAGE=onnxruntime
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's Python is 3.12 (the project needs >= 3.11); the base image tag pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV ONNXRUNTIME_PACKAGE=onnxruntime-gpu \
    LGG_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider

# A stage of this file, not an image to pin (hadolint cannot tell).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG ONNXRUNTIME_VERSION=1.31.1
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The serving dependencies are [project].dependencies of pyproject.toml (what `pip install .` pulls: no torch),
# installed before the code is copied so that code changes reuse this layer. onnxruntime is swapped for the
# variant's build, pinned to the version the CUDA base above matches.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print(*(d for d in deps if not d.startswith('onnxruntime')), sep=chr(10))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "${ONNXRUNTIME_PACKAGE}==${ONNXRUNTIME_VERSION}" \
    && rm /tmp/requirements.txt

COPY app/ ./app/
COPY models/ ./models/

# Root owns the code and models (read-only for the service); the service runs as an unprivileged user.
RUN groupadd --system --gid 10001 lgg \
    && useradd --system --uid 10001 --gid lgg --no-create-home --shell /usr/sbin/nologin lgg
USER 10001:10001

ENV LGG_MODEL_DIR=/app/models
EXPOSE 8000
# Liveness only (no curl in a slim image): urlopen raises on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# One worker: the dynamic batcher gathers requests inside one process.
# h11, not the default httptools: h11 refuses a request head over 16 KiB (--h11-max-incomplete-event-size), where
# httptools buffers any size (a 50 MB header was accepted). SIGTERM drains (app/api/shutdown.py) and exits 0.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--http", "h11"]
