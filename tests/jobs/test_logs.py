"""What a run says when its output goes to files (cron, Kubernetes, CI): every line of its
own on stderr, in order, line by line; nothing on stdout but a job's result; none of Ray's
console noise; progress as log lines, not a bar's carriage returns."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from pipeline_data import TEST_MODEL

from iqray.pipeline.summary import LoggedProgress

REPO = Path(__file__).resolve().parents[2]
SAMPLE = "examples/sample"  # relative to REPO, as a user types it


def test_a_run_logged_to_files_is_in_order_and_free_of_ray_noise(tmp_path):
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "iqray.jobs.cli", "score", SAMPLE, str(tmp_path / "scores"),
             "--model", TEST_MODEL, "--ray-num-cpus", "2"],
            stdout=stdout, stderr=stderr, cwd=REPO, timeout=600)
    log = err.read_text()
    assert done.returncode == 0, log[-3000:]
    assert out.read_text() == ""  # score prints no result: all it says is a log line
    lines = log.splitlines()
    assert lines[0].startswith("iqray score: 1 shards in examples/sample;"), lines[:3]
    assert lines[-1].startswith("bottleneck: "), lines[-3:]
    assert any(line.startswith("rows 32 (32 ok") for line in lines), lines
    assert "\r" not in log  # no bar redrawn into a file
    for noise in ("core_worker", "raylet", "(pid=", "WARNING", "ray.data", "Ray Data"):
        assert noise not in log, f"{noise!r} in the run's stderr:\n{log}"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_progress_in_a_log_file_is_a_line_every_interval():
    now = [100.0]
    lines = Lines()
    logger = logging.getLogger("iqray")
    logger.addHandler(lines)
    level, logger.level = logger.level, logging.INFO
    try:
        progress = LoggedProgress(10_000, every_s=30, clock=lambda: now[0])
        for _ in range(59):  # 100 images a second for 59 s, reported every 0.5 s
            now[0] += 0.5
            progress.update(50)
            now[0] += 0.5
            progress.update(50)
        progress.close()
        unknown = LoggedProgress(None, every_s=30, clock=lambda: now[0])
        now[0] += 40
        unknown.update(800)
    finally:
        logger.removeHandler(lines)
        logger.level = level
    assert lines.lines == [
        "scored 3,000 of 10,000 images (30.0%), 100.0 img/s, about 1m10s to go",
        "scored 800 images, 20.0 img/s",
    ]
