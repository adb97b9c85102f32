"""What a run tells its user: ``RunSummary`` (counts, per-stage busy time, the bottleneck,
the run's timeline) and its rendering, and progress (a bar on a terminal, a log line every
30 s where stderr is a file or a pipe)."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iqray.pipeline.exit_codes import EXIT_OK, EXIT_UNFINISHED


@dataclass
class RunSummary:
    rows: int = 0  # rows written this run: ok + error rows
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    shards_total: int = 0
    shards_skipped: int = 0
    shards_scored: int = 0  # shards this run set out to score (committed + unfinished)
    input_rows: int | None = None  # of the shards scored; None: some shard's count unknown
    input_rows_unknown_shards: int = 0
    unfinished: dict[str, str] = field(default_factory=dict)  # shard URL -> why
    unfinished_rows: int = 0  # their rows, where known
    unfinished_unknown_shards: int = 0  # of those, how many have no known row count
    wall_s: float = 0.0
    stage_busy_s: dict[str, float] = field(default_factory=dict)
    stage_workers: dict[str, float] = field(default_factory=dict)
    bottleneck: str = ""
    outputs: list[str] = field(default_factory=list)
    projected_s: float | None = None
    estimated_rows: int | None = None
    steady_rows_per_s: float | None = None  # after the first batch: start-up excluded
    operators: list[str] = field(default_factory=list)  # Ray Data's physical operators
    spilled_bytes: int | None = None  # object-store bytes the operators spilled to disk
    rows_per_node: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> node
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific counts
    # Seconds from the run's start at which each step ended (inputs_listed, model_staged,
    # planned, ray_started, first_row, last_row, finished): where a small run's time goes.
    timeline: dict[str, float] = field(default_factory=dict)
    driver_cpu_s: dict[str, float] = field(default_factory=dict)  # the driver's CPU by then
    started_at: float = field(default_factory=time.perf_counter, repr=False)
    cpu_at_start: float = field(default_factory=time.process_time, repr=False)

    def mark(self, step: str) -> None:
        self.timeline[step] = round(time.perf_counter() - self.started_at, 3)
        self.driver_cpu_s[step] = round(time.process_time() - self.cpu_at_start, 3)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_UNFINISHED if self.unfinished else EXIT_OK

    def account(self, writer) -> None:
        """Counts from what the writer committed and left unfinished (its shards' rows)."""
        self.ok = writer.ok
        self.errors = dict(writer.errors)
        self.rows = self.ok + sum(self.errors.values())
        self.unfinished = writer.unfinished_urls()
        self.unfinished_rows, unknown = writer.unfinished_rows()
        self.unfinished_unknown_shards = unknown
        self.input_rows_unknown_shards = unknown + writer.unknown_size
        self.input_rows = (None if self.input_rows_unknown_shards
                           else self.rows + self.unfinished_rows)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rows_per_s"] = round(self.rows_per_s, 2)
        out["exit_code"] = self.exit_code
        out.pop("outputs")
        out.pop("started_at")
        out.pop("cpu_at_start")
        return out

    def render(self) -> str:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        inputs = ("unknown" if self.input_rows is None else str(self.input_rows))
        if self.input_rows_unknown_shards:
            inputs += f" ({self.input_rows_unknown_shards} shards of unknown row count)"
        unfinished = len(self.unfinished)
        lines = [
            f"rows {self.rows} ({self.ok} ok, {self.rows - self.ok} error: {errors}) in "
            f"{self.wall_s:.1f} s = {self.rows_per_s:.1f} rows/s",
            f"input rows of the shards scored: {inputs}",
            f"shards: {self.shards_total} total, {self.shards_scored - unfinished} scored, "
            f"{self.shards_skipped} already committed and skipped, {unfinished} unfinished",
        ]
        for url, why in self.unfinished.items():
            lines.append(f"unfinished: {url}: {why}")
        if self.unfinished:
            sizes = [f"{self.unfinished_rows} rows"] if (
                self.unfinished_rows or not self.unfinished_unknown_shards) else []
            if self.unfinished_unknown_shards:
                sizes.append(f"{self.unfinished_unknown_shards} of unknown size")
            rows = " + ".join(sizes)
            lines.append(f"{unfinished} shards ({rows}) were not committed; rerun the same "
                         "command to finish them")
        if self.stage_busy_s:
            stages = ", ".join(
                f"{name} {busy:.1f} s busy on {self.stage_workers.get(name, 1):g} workers"
                for name, busy in self.stage_busy_s.items())
            lines.append(f"stages: {stages}")
        if self.bottleneck:
            lines.append(f"bottleneck: {self.bottleneck}")
        if self.projected_s is not None:
            took = (f"{self.projected_s:.0f} s" if self.projected_s < 120 else
                    f"{self.projected_s / 60:.1f} min" if self.projected_s < 7200 else
                    f"{self.projected_s / 3600:.1f} h")
            lines.append(f"dry run: about {self.estimated_rows} rows in the whole input; "
                         f"projected {took} at this rate")
        return "\n".join(lines)


def warn_to(log):
    """A ``warn`` callback for the readers that writes to a job's log."""
    return lambda message: log(f"warning: {message}")


def _bottleneck(summary: RunSummary) -> str:
    per_worker = {name: busy / max(summary.stage_workers.get(name, 1), 1e-9)
                  for name, busy in summary.stage_busy_s.items()}
    if not per_worker:
        return ""
    name = max(per_worker, key=per_worker.get)
    return (f"{name}-bound ({per_worker[name]:.1f} s busy per {name} worker; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in per_worker.items() if k != name) + ")")


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class LoggedProgress:
    """Progress as a log line every ``every_s`` seconds: what a log file (cron, Kubernetes,
    CI) can show, where a bar's carriage returns make one endless line."""

    def __init__(self, total: int | None, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.every_s, self.clock = total, every_s, clock
        self.started = self.last = clock()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        line = f"scored {self.done:,}"
        if self.total:
            line += f" of {self.total:,} images ({100 * self.done / self.total:.1f}%)"
        else:
            line += " images"
        line += f", {rate:.1f} img/s"
        if self.total and rate > 0 and self.done < self.total:
            line += f", about {_duration((self.total - self.done) / rate)} to go"
        logging.getLogger("iqray").info(line)

    def close(self) -> None:
        pass  # the run's summary follows


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _progress(total: int | None, enabled: bool):
    """A bar on a terminal; log lines where stderr is a file or a pipe."""
    if not enabled:
        return _NoProgress()
    if not sys.stderr.isatty():
        return LoggedProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="scoring", file=sys.stderr, dynamic_ncols=True)
