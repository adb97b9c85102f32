#!/usr/bin/env bash
# Issue 23's measurements on a machine with one NVIDIA GPU, in one command (about 8 minutes
# with the installs), written to benchmarks/<gpu-name>/:
#
#   bash scripts/gpu_bench.sh          full-size random-init towers: the real model's cost
#   bash scripts/gpu_bench.sh --smoke  tiny towers and a few images on whatever is here (CPU
#                                      too): checks the script end to end in about 2 minutes
#
# What it runs, all `iqray bench`:
#   1. throughput: the limit (model.score on pre-decoded batches, bf16 autocast on a GPU), a
#      hand-written DataLoader, and `iqray score` with CPU and device (nvJPEG) decode;
#   2. score-runs: `iqray score` at batch 64-512, --decode cpu|fast|device, and --compile;
#   3. decode and overhead: decode img/s per core, and the pipeline's own ceiling with a
#      constant-score model stage (both --commit modes) on this machine's cores.
#
# IQRAY_PYTHON=python3 uses that Python's packages instead of creating .venv with
# scripts/setup.sh (a GPU machine that cannot reach PyPI: carry what it lacks as wheels).
# IQRAY_BENCH_OUTPUT overrides the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
    --smoke) smoke=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_bench.sh [--smoke]" >&2; exit 2 ;;
esac

if [ -n "${IQRAY_PYTHON:-}" ]; then
    py=$IQRAY_PYTHON
    "$py" -c 'import iqray.jobs.cli' 2>/dev/null ||
        "$py" -m pip install --quiet --no-deps --no-build-isolation -e .
    "$py" -c 'import iqray_bench' 2>/dev/null ||
        "$py" -m pip install --quiet --no-deps --no-build-isolation -e ./benchmarks
else
    IQRAY_SKIP_BROWSER=1 bash scripts/setup.sh
    py=.venv/bin/python
fi
iqray() { "$py" -c 'import sys; from iqray.jobs.cli import main; sys.exit(main())' "$@"; }

if [ "$smoke" = 1 ]; then
    model=mst-clipiqa-tiny-random
    out=${IQRAY_BENCH_OUTPUT:-out/gpu-bench-smoke}
    images=24 batch=8 runs=(8:cpu 16:fast) decode_images=3 overhead_rows=300
    decode_batches=(32)
else
    if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); then
        echo "no NVIDIA GPU found (nvidia-smi); use --smoke to check the script here" >&2
        exit 1
    fi
    model=mst-clipiqa-random-init
    out=${IQRAY_BENCH_OUTPUT:-benchmarks/$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')}
    images=2048 batch=256 decode_images=32 overhead_rows=50000
    runs=(64:cpu 128:cpu 256:cpu 512:cpu 256:fast 256:device 512:device 256:device:compile)
    decode_batches=(32 256)
fi
mkdir -p "$out"
echo "gpu_bench: model $model, $images images, writing $out/"

iqray bench --model "$model" --images "$images" --batch-size "$batch" --actors 1 \
    --precisions fp32 --decodes cpu device --output "$out"
iqray bench --measure score-runs --model "$model" --images "$images" \
    --score-runs "${runs[@]}" --output "$out"
iqray bench --measure decode overhead --decode-images "$decode_images" \
    --decode-models "$model" --overhead-rows "$overhead_rows" \
    --overhead-decode-batch-sizes "${decode_batches[@]}" --output "$out"
echo "gpu_bench: done; $out/ holds $(ls "$out" | tr '\n' ' ')"
