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
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
