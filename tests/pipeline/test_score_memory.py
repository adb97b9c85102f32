"""Decoded pixels (about 10x the JPEG bytes as floats) must not flood the object store."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
from pipeline_data import TEST_MODEL, write_parquet

SHARDS, ROWS = 12, 50
STORE_BYTES = 80 * 2**20


def test_a_run_whose_decoded_images_exceed_the_object_store_streams_without_spilling(
        tmp_path, sample):
    names, images, prompts = sample
    for s in range(SHARDS):
        write_parquet(None, str(tmp_path / "in" / f"{s:03d}.parquet"), pa.table({
            "key": [f"{s}-{i}" for i in range(ROWS)],
            "jpg": pa.array([images[(s * ROWS + i) % len(images)] for i in range(ROWS)]),
            "caption": [prompts[(s * ROWS + i) % len(images)] for i in range(ROWS)],
        }))
    encoded = sum(len(images[i % len(images)]) for i in range(SHARDS * ROWS))
    decoded_float = SHARDS * ROWS * 3 * 224 * 224 * 4
    assert decoded_float > 4 * STORE_BYTES and encoded < STORE_BYTES

    run = subprocess.run(
        [sys.executable, "-m", "iqray.jobs.cli", "score", str(tmp_path / "in"),
         str(tmp_path / "out"), "--no-progress", "--ray-num-cpus", "2",
         "--object-store-memory", str(STORE_BYTES), "--model", TEST_MODEL],
        capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["summary"]
    assert summary["rows"] == summary["ok"] == SHARDS * ROWS
    assert summary["spilled_bytes"] == 0


def test_in_flight_limit_keeps_the_object_store_far_below_the_decoded_input(ray_local,
                                                                            tmp_path):
    """--max-in-flight-bytes: reads and decodes may not run ahead of the model without
    bound. Ray Data treats the limit as soft (here it overshoots by about a dozen blocks),
    so the check is against the decoded input, which an unbounded run holds most of."""
    from iqray_bench.measure import ClusterMemory, synthetic_image_input

    from iqray.jobs.score import ScoreConfig, run_score

    rows, limit = 3000, 48 * 2**20
    folder = synthetic_image_input(tmp_path, rows, shard_rows=500, distinct_prompts=100)
    decoded = rows * 3 * 224 * 224
    with ClusterMemory(every_s=0.1) as memory:
        summary = run_score(ScoreConfig(
            input=str(folder), output=str(tmp_path / "out"), model=TEST_MODEL,
            key_columns=["key"], batch_size=32, progress=False,
            max_in_flight_bytes=limit), log=lambda *a: None)
    assert summary.rows == summary.ok == rows
    assert memory.peak_object_store_bytes is not None
    assert memory.peak_object_store_bytes <= 3.5 * limit < decoded / 2
