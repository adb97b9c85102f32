"""The kill test: `kill -9` mid-run, rerun, and get exactly what a clean run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pipeline_data import TEST_MODEL, img2dataset_table, read_output, write_parquet

SHARDS, ROWS = 40, 8


def cli(inputs: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "iqray.jobs.cli", "score", str(inputs), str(output),
            "--no-progress", "--batch-size", "4", "--decode-batch-size", "4",
            "--ray-num-cpus", "2", "--model", TEST_MODEL]


def committed(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}


def test_kill_9_mid_run_then_rerun_matches_a_clean_run(tmp_path, sample):
    inputs = tmp_path / "in"
    for i in range(SHARDS):
        write_parquet(None, str(inputs / f"{i:03d}.parquet"),
                      img2dataset_table(sample, i * ROWS, ROWS))

    clean = tmp_path / "clean"
    subprocess.run(cli(inputs, clean), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cli(inputs, killed), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(committed(killed)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
    before = committed(killed)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert 3 <= len(before) < SHARDS, f"{len(before)} shards committed before the kill"
    assert not (killed / "_SUCCESS").exists()
    for name in before:  # whatever is visible is whole
        assert pq.read_metadata(killed / name).num_rows == ROWS

    rerun = subprocess.run(cli(inputs, killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((killed / "_SUCCESS").read_text())["summary"]
    assert summary["shards_skipped"] == len(before)
    assert summary["shards_scored"] == SHARDS - len(before)
    assert summary["rows"] == (SHARDS - len(before)) * ROWS
    after = committed(killed)
    assert {name: after[name] for name in before} == before  # not recomputed, not rewritten

    names = sorted(committed(clean))
    assert sorted(after) == names
    expected = read_output(None, [str(clean / n) for n in names])
    actual = read_output(None, [str(killed / n) for n in names])
    assert actual.num_rows == SHARDS * ROWS == expected.num_rows
    assert actual["key"].to_pylist() == expected["key"].to_pylist()
    assert len(set(actual["key"].to_pylist())) == SHARDS * ROWS  # no duplicates
    for column in ("quality", "alignment"):
        np.testing.assert_allclose(actual[column].to_numpy(), expected[column].to_numpy(),
                                   atol=1e-6)
