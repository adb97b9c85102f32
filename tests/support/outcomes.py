"""Job runners for tests/jobs/test_exit_codes.py, one per way a job can end; the CLI's
``Job.run`` turns each into its exit code and last line. ``stage_bug`` is a real run of
``iqray score`` through Ray whose model stage has a bug."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel

from iqray.jobs.score import ScoreConfig, run_score

Outcome = Literal["ok", "usage", "missing", "usage_after_commit", "budget", "storage",
                  "unfinished", "bug", "interrupt", "stage_bug"]


class OutcomeConfig(BaseModel):
    outcome: Outcome
    output: str
    score: ScoreConfig | None = None


def _write_one_output(output: str) -> None:
    from iqray.pipeline.io.storage import StorageConfig, write_atomic

    fs, path = StorageConfig().filesystem(output)
    write_atomic(fs, path.rstrip("/") + "/000.parquet", b"committed")


def run_outcome(config: OutcomeConfig):
    from iqray.pipeline.execution import ErrorBudgetExceeded, RunInterrupted
    from iqray.pipeline.io.storage import StorageUnavailable
    from iqray.pipeline.summary import RunSummary

    match config.outcome:
        case "ok":
            return RunSummary()
        case "usage":
            raise ValueError("no column 'prompt_text' for the prompt")
        case "missing":
            raise FileNotFoundError("input data/ does not exist")
        case "usage_after_commit":
            _write_one_output(config.output)
            raise pa.ArrowInvalid("Unsupported cast from string to float in column 'x'")
        case "budget":
            raise ErrorBudgetExceeded("40 of 100 rows failed (40.0%)")
        case "storage":
            raise StorageUnavailable("list", "s3://b/in", "http://127.0.0.1:9",
                                     ConnectionRefusedError("refused"), 4)
        case "unfinished":
            return RunSummary(unfinished={"s3://b/in/1.parquet": "cannot read"})
        case "bug":
            return _driver_helper({})
        case "interrupt":
            raise RunInterrupted(2, 5, 1)
        case "stage_bug":  # config.score names a model of the buggy architecture
            import buggy_scorer  # noqa: F401  registers it here; Ray workers import it too

            return run_score(config.score)
    raise AssertionError(config.outcome)


def _driver_helper(counts: dict) -> int:
    return counts["rows"]  # a KeyError: a bug on the driver
