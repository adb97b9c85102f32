"""``--commit actors``: shard files written by a pool of commit actors, not by the driver.

By default the driver gathers every scored row and commits each shard's Parquet
(:class:`~iqray.pipeline.io.writer.ShardWriter`). On a large cluster that one process is the
ceiling (``iqray bench --measure overhead``), so here the model actors send their rows to
commit actors instead, each a ShardWriter over the shards routed to it (shard index modulo
the pool size: all rows of a shard meet in one actor). The contract is the writer's own:
one file per shard, atomic, committed only when its last row arrived; unfinished shards are
dropped and named. The driver gets one small tally row per shard part (:func:`tally`), which
drives progress, the per-stage timing and the error budget; at the end it waits until every
actor holds every row routed to it, then collects what each committed and left unfinished.

    model actor --rows of shard s--> commit actor s % N   (ShardWriter: split, Parquet, PUT)
                --tally rows-------> driver               (counts only)
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iqray.pipeline import rows as R
from iqray.pipeline.io.writer import ShardWriter, shard_parts

# Batches a model actor may have sent without their rows having reached the commit actors:
# bounds the rows in flight and surfaces a commit actor's error within two batches.
IN_FLIGHT_BATCHES = 2
TALLY_EVERY_S = 1.0  # how often the driver asks the commit actors for their counts
ROUTED_WAIT_S = 300.0  # at the end: how long rows sent to a commit actor may take to arrive


class CommitActor:
    """A ShardWriter in a Ray actor, over the shards routed to it."""

    def __init__(self, shards, writer_kwargs: dict[str, Any]):
        self.writer = ShardWriter(shards, **writer_kwargs)
        self.received: Counter = Counter()  # rows that arrived, per shard
        self.failure: str | None = None  # the first error adding rows (reported at the end)

    def add(self, table: pa.Table) -> None:
        for shard_id, count in zip(*_counts(table[R.SHARD]), strict=True):
            self.received[shard_id] += count
        if self.failure is not None:
            return
        try:
            self.writer.add(table)
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which raises
            self.failure = f"{type(exc).__name__}: {exc}"

    def tally(self) -> tuple[int, Counter, int]:
        return self.writer.tally()

    def received_rows(self) -> dict[int, int]:
        return dict(self.received)

    def finish(self) -> dict[str, Any]:
        if self.failure is None:
            self.writer.finish()
        return self.report()

    def report(self) -> dict[str, Any]:
        w = self.writer
        return {"committed": list(w.committed), "done": sorted(w.done),
                "unfinished": dict(w.unfinished), "unfinished_seen": dict(w.unfinished_seen),
                "ok": w.ok, "errors": dict(w.errors), "unknown_size": w.unknown_size,
                "rows_written": w.rows_written, "failure": self.failure}


def _counts(shard_ids) -> tuple[list[int], list[int]]:
    counts = pc.value_counts(shard_ids)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


class CommitRouter:
    """Held by a model actor: sends each shard's rows of a batch to its commit actor and
    returns the tally the driver counts (one row per shard part)."""

    def __init__(self, actors: list):
        self.actors = actors
        self.in_flight: deque[list] = deque()

    def route(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray
        from ray.data.block import BlockAccessor

        table = BlockAccessor.batch_to_block(batch)  # the conversion Ray Data would make
        while len(self.in_flight) >= IN_FLIGHT_BATCHES:
            ray.get(self.in_flight.popleft())
        sent, tally = [], []
        for shard_id, part in shard_parts(table):
            sent.append(self.actors[shard_id % len(self.actors)].add.remote(part))
            tally.append(_tally_rows(part, shard_id))
        self.in_flight.append(sent)
        if not tally:  # an empty batch: no rows to stand for
            return {R.SHARD: np.zeros(0, np.int64), R.TALLY_ROWS: np.zeros(0, np.int64),
                    **{c: np.zeros(0) for c in R.STAGE_SECONDS.values()}}
        return {name: np.concatenate([t[name] for t in tally]) for name in tally[0]}


def _tally_rows(part: pa.Table, shard_id: int) -> dict[str, np.ndarray]:
    """One row per (shard, decode node, model node): how many rows it stands for and the
    stage seconds they took (sums), which the driver adds up as it would the rows."""
    keys = [c for c in R.STAGE_NODES.values() if c in part.column_names]
    seconds = [c for c in R.STAGE_SECONDS.values() if c in part.column_names]
    if keys:
        part = part.cast(pa.schema([f.with_type(pa.string()) if f.name in keys else f
                                    for f in part.schema]))
        grouped = part.group_by(keys, use_threads=False).aggregate(
            [(R.SHARD, "count"), *[(c, "sum") for c in seconds]])
    else:
        grouped = pa.table({f"{R.SHARD}_count": [part.num_rows],
                            **{f"{c}_sum": [pc.sum(part[c]).as_py()] for c in seconds}})
    count = grouped.num_rows
    out = {R.SHARD: np.full(count, shard_id, np.int64),
           R.TALLY_ROWS: grouped[f"{R.SHARD}_count"].to_numpy().astype(np.int64)}
    out.update({c: grouped[f"{c}_sum"].to_numpy(zero_copy_only=False).astype(np.float64)
                for c in seconds})
    for c in keys:
        out[c] = np.array(grouped[c].to_pylist(), dtype=object)
    return out


class CommitPool:
    """The driver's side of ``--commit actors``: a sink (see
    :class:`~iqray.pipeline.execution.Sink`) over tally rows, which starts the commit actors
    and, at the end, folds what they committed into the driver's ``writer`` (so the run's
    summary, ``_SUCCESS`` / ``_UNFINISHED`` and resume read it as if the driver had written)."""

    def __init__(self, writer: ShardWriter, shards: list, size: int):
        import ray

        self.writer = writer
        size = max(1, min(size, len(shards)))
        owned: list[list] = [[] for _ in range(size)]
        for shard in shards:
            owned[shard.index % size].append(shard)
        remote = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy="SPREAD")(
            CommitActor)
        self.owned = owned
        self.actors = [remote.remote(part, writer.remote_kwargs(part)) for part in owned]
        self.routed: Counter = Counter()  # rows sent to the commit actors, per shard
        self.snapshots: list[tuple[int, Counter, int]] = [(0, Counter(), 0)] * size
        self.asked_at = 0.0

    def stage_kwargs(self) -> dict[str, Any]:
        """What the model stage needs to route its rows here."""
        return {"commit_to": self.actors}

    def add(self, table: pa.Table) -> None:
        for shard_id, rows in zip(table[R.SHARD].to_pylist(),
                                  table[R.TALLY_ROWS].to_pylist(), strict=True):
            self.routed[shard_id] += rows
        if time.monotonic() - self.asked_at >= TALLY_EVERY_S:
            self._refresh()

    def _refresh(self) -> None:
        import ray

        self.asked_at = time.monotonic()
        self.snapshots = ray.get([a.tally.remote() for a in self.actors])

    def tally(self) -> tuple[int, Counter, int]:
        ok, errors, unfinished = 0, Counter(), 0
        for actor_ok, actor_errors, actor_unfinished in self.snapshots:
            ok += actor_ok
            errors.update(actor_errors)
            unfinished += actor_unfinished
        return ok, errors, unfinished

    def finish(self) -> None:
        """Wait until each actor holds the rows routed to it, then let it commit what is
        left, and fold its report into the driver's writer. An actor that died leaves its
        uncommitted shards unfinished (the next run scores them)."""
        import ray

        for actor, shards in zip(self.actors, self.owned, strict=True):
            try:
                self._await_routed(actor, shards)
                report = ray.get(actor.finish.remote())
            except ray.exceptions.RayError as exc:
                report = self._lost(actor, shards, exc)
            if report.get("failure"):
                raise RuntimeError(f"a commit actor failed: {report['failure']}")
            self.writer.absorb(report)
        self.snapshots = [self.writer.tally()]  # the final counts, all in the writer now

    def _await_routed(self, actor, shards) -> None:
        import ray

        wanted = {s.index: self.routed[s.index] for s in shards if self.routed[s.index]}
        deadline = time.monotonic() + ROUTED_WAIT_S
        while True:
            received = ray.get(actor.received_rows.remote())
            if all(received.get(i, 0) >= n for i, n in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("rows sent to a commit actor did not arrive in "
                                   f"{ROUTED_WAIT_S:g} s")
            time.sleep(0.05)

    def _lost(self, actor, shards, exc: Exception) -> dict[str, Any]:
        """The report of an actor that cannot answer: all its shards count as unfinished.
        Those it did commit are whole files on storage, which the next run skips."""
        why = f"its commit actor was lost ({type(exc).__name__}); rerun to score it"
        return {"committed": [], "done": [], "ok": 0, "errors": {}, "unknown_size": 0,
                "rows_written": 0, "unfinished_seen": {},
                "unfinished": {s.index: why for s in shards}, "failure": None}

    def committed_count(self, timeout_s: float = 5.0) -> int:
        """Shards committed so far (asked of the actors; for Ctrl-C's one line)."""
        import ray

        try:
            reports = ray.get([a.report.remote() for a in self.actors], timeout=timeout_s)
        except Exception:  # noqa: BLE001 - Ctrl-C: an estimate is better than none
            return len(self.writer.committed)
        return len(self.writer.committed) + sum(len(r["committed"]) for r in reports)
