#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
# The 15 slowest tests are listed at the end: CI must finish within 30 minutes on 2 cores
# (23 min on the 2-core dev machine at the end of session 10).
exec .venv/bin/python -m pytest --durations=15 "$@"
