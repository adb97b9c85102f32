"""The driver loop every pipeline job shares: the stages' blocks of scored rows, from Ray
Data (:mod:`iqray.pipeline.graph`) or from this process (:mod:`iqray.pipeline.local`), into
the job's sink, with progress, per-stage timing and the error budget; Ctrl-C and stage bugs
end a run with what it had committed."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from iqray.pipeline import rows as R
from iqray.pipeline.failures import find_stage_bug
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import note_written
from iqray.pipeline.options import PipelineJob
from iqray.pipeline.summary import RunSummary, _bottleneck, _progress


class Sink(Protocol):
    def add(self, table: pa.Table) -> Any: ...

    def finish(self) -> None: ...

    def tally(self) -> tuple[int, Counter, int]:
        """(ok rows, error rows by kind, rows of unfinished shards) so far."""
        ...


class ErrorBudgetExceeded(RuntimeError):
    pass


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what it had committed (the CLI's one line says so)."""

    def __init__(self, committed: int, total: int, skipped: int):
        super().__init__(f"{committed} of {total} shards committed by this run"
                         + (f", {skipped} were already" if skipped else ""))
        self.committed, self.total, self.skipped = committed, total, skipped


def execute(config: PipelineJob, ray, spec, stage_cls: type, todo: list[Shard],
            key_columns: list[str], sink: Sink, summary: RunSummary,
            stage_kwargs: dict[str, Any] | None = None, keep_image_bytes: bool = False
            ) -> None:
    """Run the stages over ``todo`` and stream every block into ``sink``: on Ray Data, or
    with ``ray`` None in this process (:mod:`iqray.pipeline.local`). Ctrl-C ends it as
    :class:`RunInterrupted`, counting the shards the sink's writer committed."""
    try:
        if ray is None:
            _execute_local(config, spec, stage_cls, todo, key_columns, sink, summary,
                           stage_kwargs, keep_image_bytes)
        else:
            from iqray.pipeline.graph import run_on_ray

            run_on_ray(config, ray, spec, stage_cls, todo, key_columns, sink, summary,
                       stage_kwargs, keep_image_bytes)
    except ErrorBudgetExceeded:
        raise
    except Exception as exc:  # a stage's bug arrives wrapped in Ray's task errors
        if hasattr(sink, "committed_count"):  # commit actors' files count as this run's
            note_written(max(0, sink.committed_count() - len(sink.writer.committed)))
        bug = find_stage_bug(exc)
        if bug is None:
            raise
        raise bug from None
    except KeyboardInterrupt as exc:
        if isinstance(exc, RunInterrupted):
            raise
        writer = getattr(sink, "writer", sink)
        committed = (sink.committed_count() if hasattr(sink, "committed_count")
                     else len(getattr(writer, "committed", ())))
        raise RunInterrupted(committed,
                             summary.shards_total - summary.shards_skipped,
                             summary.shards_skipped) from None


def _execute_local(config: PipelineJob, spec, stage_cls: type, todo: list[Shard],
                   key_columns: list[str], sink: Sink, summary: RunSummary,
                   stage_kwargs: dict[str, Any] | None, keep_image_bytes: bool) -> None:
    from iqray.pipeline.local import decode_threads, local_batches

    drive(local_batches(config, spec, stage_cls, todo, key_columns, stage_kwargs,
                         keep_image_bytes), config, todo, sink, summary)
    threads = decode_threads()
    summary.operators = ["in process: read", f"decode ({threads} thread"
                         f"{'' if threads == 1 else 's'})", "model"]
    summary.stage_workers = {"read": 1, "decode": decode_threads(), "model": 1, "write": 1}
    finish(config, sink, summary)


def drive(tables, config: PipelineJob, todo: list[Shard], sink: Sink,
           summary: RunSummary) -> None:
    """The driver loop: every block of scored rows into the sink, with progress, per-stage
    busy time, rows per node and the error budget checked as rows arrive."""
    limit = getattr(config, "limit", None)  # previews only
    total = sum(s.estimated_rows or 0 for s in todo) or None
    if limit:
        total = min(total or limit, limit)
    progress = _progress(total, config.progress)
    busy = Counter()
    seen = 0
    nodes: dict[str, Counter] = {"decode": Counter(), "model": Counter()}
    write_s = 0.0
    first_at, first_rows = None, 0
    for table in tables:
        # --commit actors: tally rows, each standing for TALLY_ROWS rows (stage sums)
        weights = (table[R.TALLY_ROWS].to_pylist() if R.TALLY_ROWS in table.column_names
                   else None)
        rows = sum(weights) if weights is not None else table.num_rows
        if first_at is None:
            first_at, first_rows = time.perf_counter(), rows
            summary.mark("first_row")
        for stage, column in R.STAGE_SECONDS.items():
            busy[stage] += pc.sum(table[column]).as_py() or 0.0
        for stage, column in R.STAGE_NODES.items():
            if column in table.column_names:
                names = table[column].to_pylist()
                if weights is None:
                    nodes[stage].update(names)
                else:
                    for name, weight in zip(names, weights, strict=True):
                        nodes[stage][name] += weight
        seen += rows
        tick = time.perf_counter()
        sink.add(table)
        write_s += time.perf_counter() - tick
        progress.update(rows)
        check_error_budget(*sink.tally(), config.max_error_fraction, final=False)
    summary.mark("last_row")
    if first_at is not None and seen > first_rows:
        summary.steady_rows_per_s = (seen - first_rows) / max(
            time.perf_counter() - first_at, 1e-9)
    tick = time.perf_counter()
    sink.finish()
    write_s += time.perf_counter() - tick
    progress.close()
    summary.rows_per_node = {stage: dict(c) for stage, c in nodes.items() if c}
    summary.stage_busy_s = {**{k: round(v, 3) for k, v in busy.items()},
                            "write": round(write_s, 3)}


def finish(config: PipelineJob, sink: Sink, summary: RunSummary) -> None:
    summary.bottleneck = _bottleneck(summary)
    check_error_budget(*sink.tally(), config.max_error_fraction, final=True)


def check_error_budget(ok: int, errors: Counter, unfinished_rows: int, limit: float,
                       final: bool) -> None:
    """The budget is over input rows: error rows, plus every row of a shard left unfinished
    (a shard that failed whole counts all its rows, not one)."""
    failed = sum(errors.values()) + unfinished_rows
    total = ok + failed
    # Judge early only once enough rows are in, so a bad first shard does not abort alone.
    if total == 0 or (not final and total < 200):
        return
    if failed / total > limit:
        kinds = [f"{k}: {v}" for k, v in errors.most_common()]
        if unfinished_rows:
            kinds.append(f"rows of unfinished shards: {unfinished_rows}")
        raise ErrorBudgetExceeded(
            f"{failed} of {total} rows failed ({failed / total:.1%}), above "
            f"--max-error-fraction {limit:g} ({', '.join(kinds)}). Committed shards are kept "
            "and unfinished ones were not committed; fix the input (or raise the limit) and "
            "rerun, or use --retry-failed after an outage.")
