#!/usr/bin/env bash
# Set up (if needed) and score the shipped sample with the shipped offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/score_sample.py "$@"
