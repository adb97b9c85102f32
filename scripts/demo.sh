#!/usr/bin/env bash
# Set up (if needed), score the shipped sample with `iqray score` (local Ray, shipped model),
# and show the result next to the human opinion scores. Extra arguments go to `iqray score`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/iqray score examples/sample out/sample-scores "$@"
.venv/bin/python examples/show_scores.py out/sample-scores
# The same scores as a page to look at: histograms, scatter, best/worst images per generator.
.venv/bin/iqray report out/sample-scores out/sample-report.html --per-pattern '^images/([^_]+)_'
echo "open out/sample-report.html in a browser"
