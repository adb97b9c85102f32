"""The kill tests: `kill -9` of the driver (either executor), or of the model actor (Ray),
mid-run, and Ctrl-C (either executor); then exactly what a clean run gives, and no process
of the run left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, read_output, write_parquet

SHARDS, ROWS = 40, 8


def cli(inputs: Path, output: Path, executor: str = "ray") -> list[str]:
    where = ["--ray-num-cpus", "2"] if executor == "ray" else ["--executor", executor]
    return [sys.executable, "-m", "iqray.jobs.cli", "score", str(inputs), str(output),
            "--no-progress", "--batch-size", "4", "--decode-batch-size", "4", *where,
            "--model", TEST_MODEL]


def committed(output: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}


def session_processes(session: int) -> list[str]:
    """Live processes of a process session (from /proc): what a run left running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:  # state, ppid, pgrp, session
            found.append(f"{entry}: {command[:120]}")
    return found


@contextlib.contextmanager
def running(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """The command in a session of its own, so that every process it starts can be found;
    whatever still runs at the end is killed."""
    # SIGINT as a terminal gives it: a suite started in the background of a non-interactive
    # shell ignores SIGINT, and a child would inherit that (Ctrl-C would then do nothing).
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_commits(proc: subprocess.Popen, output: Path, count: int, log: Path,
                     timeout_s: float = 240) -> None:
    """Until `count` shards are committed under `output`; fails, saying what it waited for
    and what the run logged, if the run ends first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while len(committed(output)) < count:
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) with {len(committed(output))} of "
                        f"the {count} commits waited for in {output}; its log ends:\n"
                        f"{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{count} commits in {output} not seen within {timeout_s:.0f} s "
                        f"({len(committed(output))} seen); the run's log ends:\n"
                        f"{log.read_text()[-2000:]}")
        time.sleep(0.02)  # polling interval of the file check, not a synchronisation


def test_waiting_for_commits_fails_loudly_when_they_never_come(tmp_path):
    log = tmp_path / "run.log"
    with running([sys.executable, "-c", "print('gave up early')"], log) as proc:
        with pytest.raises(pytest.fail.Exception, match=r"exited \(0\) with 0 of the 3 "
                                                         r"commits(.|\n)*gave up early"):
            wait_for_commits(proc, tmp_path, 3, log)
    with running([sys.executable, "-c", "import signal; signal.pause()"], log) as proc:
        with pytest.raises(pytest.fail.Exception, match=r"3 commits in .* not seen within"):
            wait_for_commits(proc, tmp_path, 3, log, timeout_s=0.1)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("kill")
    inputs = root / "in"
    for i in range(SHARDS):
        write_parquet(None, str(inputs / f"{i:03d}.parquet"),
                      img2dataset_table(sample, i * ROWS, ROWS))
    clean = root / "clean"
    subprocess.run(cli(inputs, clean), check=True, capture_output=True, timeout=300)
    names = sorted(committed(clean))
    return inputs, names, read_output(None, [str(clean / n) for n in names])


def assert_matches_clean(output: Path, clean_run) -> None:
    _, names, expected = clean_run
    assert sorted(committed(output)) == names
    actual = read_output(None, [str(output / n) for n in names])
    assert actual.num_rows == SHARDS * ROWS == expected.num_rows
    assert actual["key"].to_pylist() == expected["key"].to_pylist()
    assert len(set(actual["key"].to_pylist())) == SHARDS * ROWS  # no duplicates
    for column in ("quality", "alignment"):
        np.testing.assert_allclose(actual[column].to_numpy(), expected[column].to_numpy(),
                                   atol=1e-6)


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_kill_9_mid_run_then_rerun_matches_a_clean_run(tmp_path, clean_run, executor):
    inputs = clean_run[0]
    killed = tmp_path / "killed"
    with running(cli(inputs, killed, executor), tmp_path / "killed.log") as proc:
        wait_for_commits(proc, killed, 3, tmp_path / "killed.log")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and what it started (Ray, decoders)
    before = committed(killed)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert 3 <= len(before) < SHARDS, f"{len(before)} shards committed before the kill"
    assert not (killed / "_SUCCESS").exists()
    for name in before:  # whatever is visible is whole
        assert pq.read_metadata(killed / name).num_rows == ROWS

    rerun = subprocess.run(cli(inputs, killed, executor), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((killed / "_SUCCESS").read_text())["summary"]
    assert summary["shards_skipped"] == len(before)
    assert summary["shards_scored"] == SHARDS - len(before)
    assert summary["rows"] == (SHARDS - len(before)) * ROWS
    after = committed(killed)
    assert {name: after[name] for name in before} == before  # not recomputed, not rewritten
    assert_matches_clean(killed, clean_run)


def test_kill_9_of_the_model_actor_is_survived_and_no_process_outlives_the_run(tmp_path,
                                                                               clean_run):
    inputs = clean_run[0]
    output = tmp_path / "out"
    with running(cli(inputs, output), tmp_path / "run.log") as proc:
        wait_for_commits(proc, output, 3, tmp_path / "run.log")
        actors = [p for p in session_processes(proc.pid) if "MapBatches(Scorer)" in p]
        assert actors, session_processes(proc.pid)
        for actor in actors:
            os.kill(int(actor.split(":")[0]), signal.SIGKILL)
        proc.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert 3 <= len(committed(output)) and json.loads(
        (output / "_SUCCESS").read_text())["summary"]["rows"] == SHARDS * ROWS
    assert_matches_clean(output, clean_run)
    # The command has returned: nothing it started may still run.
    assert session_processes(proc.pid) == []


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_ctrl_c_says_so_in_one_line_and_exits_130(tmp_path, clean_run, executor):
    output = tmp_path / "out"
    with running(cli(clean_run[0], output, executor), tmp_path / "run.log") as proc:
        wait_for_commits(proc, output, 1, tmp_path / "run.log")
        os.kill(proc.pid, signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it
        proc.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 130, log[-3000:]
    assert "Traceback" not in log
    last = log.rstrip().splitlines()[-1]
    shards = re.fullmatch(r"iqray: interrupted \((\d+) of (\d+) shards committed by this "
                          r"run\); committed shards are kept, rerun the same command to "
                          r"resume", last)
    assert shards, last
    assert not (output / "_SUCCESS").exists() and committed(output)
    # the count it printed is what is there (but for a file whose commit the signal cut
    # between its rename and the count)
    files = len(committed(output))
    assert files - 1 <= int(shards[1]) <= files and int(shards[2]) == SHARDS
    assert session_processes(proc.pid) == []
