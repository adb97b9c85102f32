#!/usr/bin/env bash
# Create .venv and install iqray with its test extras. Idempotent: a second run only
# re-checks the install. Used by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "iqray needs Python >= 3.10 (set PYTHON=/path/to/python3)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian/Ubuntu ship venv separately.
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq python3-venv
            rm -rf .venv && "$PYTHON" -m venv .venv
        else
            echo "python3 -m venv failed: install your distribution's python3-venv" >&2
            exit 1
        fi
    fi
fi
# Marker: skip the (slow) resolver when pyproject.toml has not changed since the last install.
stamp=.venv/.iqray-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || \
        [ benchmarks/pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[test]"
    # The benchmarks (`iqray bench`) are a package of their own, apart from the product.
    .venv/bin/python -m pip install --quiet --no-deps -e ./benchmarks
    touch "$stamp"
fi
# The report test renders HTML in a real browser: Debian's chromium (about 20 s to install).
if [ "${IQRAY_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "note: chromium not found and cannot be installed here (needs root + apt-get);" \
             "the report browser test will be skipped" >&2
    fi
fi
