#!/usr/bin/env bash
# The reliability suite (issue 12), every part against a real uvicorn process: schemathesis over the OpenAPI,
# the malformed-input corpus, overload shedding, SIGTERM under load, security defaults, a soak with RSS tracking.
#   bash scripts/reliability.sh          bounded form (a few minutes; the same tests run inside scripts/test.sh)
#   bash scripts/reliability.sh --long   long form: 10,000 malformed inputs, 300 schemathesis examples per
#                                        operation, then the measured figures: overload at 1 / bound / 64
#                                        clients (30 s each) and a 5-minute soak (8 clients, 10% malformed)
# For the timing figures, pause other CPU users first (the brief's CV job: kill -STOP, then -CONT).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--long" ]; then
  export RELIABILITY_LONG=1
  "$PYTHON" -m pytest -q -m reliability tests/reliability
  "$PYTHON" -m tests.reliability.measure overload --seconds 30
  "$PYTHON" -m tests.reliability.measure soak --seconds 300
else
  "$PYTHON" -m pytest -q -m reliability tests/reliability
fi
