#!/usr/bin/env bash
# Sets up a venv with the service, training and test dependencies, then runs lint and the whole test suite.
# The README's test command and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The viewer's browser test drives Debian's Chromium; without it that one test skips with a reason.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "chromium/chromedriver missing and not root: the browser test will be skipped" >&2
  fi
fi
# The DICOM network tests run against Debian's Orthanc PACS; without it they skip with a reason.
if ! command -v Orthanc >/dev/null || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; } \
      || echo "could not install orthanc: the PACS tests will be skipped" >&2
  else
    echo "orthanc/orthanc-dicomweb missing and not root: the PACS tests will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 (CPU) comes from the machine's local wheel; see pyproject's [train] extra.
.venv/bin/python -m pip install --quiet -e ".[train,test,bulk]"
# A real Triton Inference Server for tests/scaleout/test_triton.py: the CPU tritonserver build inside the
# nvidia-pytriton wheel (--no-deps: its numpy<2 pin stays out of .venv), and the numpy<2 Python its Python backend
# runs in. Where either cannot be installed, that test skips with the reason.
[ -x .cache/pytriton/pytriton/tritonserver/bin/tritonserver ] \
  || .venv/bin/python -m pip install --quiet --no-deps --target .cache/pytriton "nvidia-pytriton==0.7.0" \
  || echo "nvidia-pytriton not installed: the real-Triton test will be skipped" >&2
[ -x .cache/triton-python/bin/python ] \
  || { .venv/bin/python -m venv .cache/triton-python \
       && .cache/triton-python/bin/python -m pip install --quiet "numpy<2" onnxruntime; } \
  || echo "no numpy<2 Python for Triton's Python backend: the real-Triton test will be skipped" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
