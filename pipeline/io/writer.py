"""Shard assembly: one output file per input shard, committed atomically, exactly once.

Score rows are small (keys + a few numbers), so the driver gathers them per shard as they
stream out of the actor pool and commits a shard's file the moment its last row arrives
(the reader marks a shard's final batch with the shard's row count). A file is written in
one go (temp + rename locally, a single PUT on object stores) in an output format
(:mod:`iqray.pipeline.io.formats`: Parquet), so no partial output is ever visible, and its
footer records the input's fingerprint and the scorer's identity. A rerun skips every shard
whose committed output matches both (:mod:`iqray.pipeline.io.resume`).

The writer never replaces a file it did not write: a file at an output shard's name without
an iqray footer stops the run before it starts. A shard the readers could not finish (their
``shard_unfinished`` marker row) or whose output could not be written after every retry is
not committed: it is listed in :attr:`ShardWriter.unfinished`, ``_SUCCESS`` is not written
(``_UNFINISHED`` says which shards and why), and the next run scores exactly those.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from iqray.pipeline import rows as R
from iqray.pipeline.io.formats import PARQUET, OutputFormat
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import (
    StorageConfig,
    StorageUnavailable,
    join_url,
    note_written,
    output_name_within,
    write_atomic,
)

SUCCESS_NAME = "_SUCCESS"
UNFINISHED_NAME = "_UNFINISHED"
# The columns of every score file, around the model's own outputs (from the registry).
ROW_COLUMNS = {
    "source_file": pa.string(),
    "source_row": pa.int64(),
    "prompt": pa.string(),
    "image_sha256": pa.string(),
}
PROMPT_COLUMNS = {"prompt_truncated": pa.bool_()}  # models whose scores read the prompt
STATUS_COLUMNS = {
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}


def score_schema(output_names: list[str], prompt_aware: bool = True
                 ) -> dict[str, pa.DataType]:
    """A score file's columns: the row's identity, one float32 column per model output (in
    the order the architecture declares them), ``prompt_truncated`` for models that read
    the prompt, then the row's status."""
    return {**ROW_COLUMNS, **{name: pa.float32() for name in output_names},
            **(PROMPT_COLUMNS if prompt_aware else {}), **STATUS_COLUMNS}


def shard_parts(table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """(shard index, its rows) for each shard a batch holds rows of."""
    shard_ids = table[R.SHARD]
    for shard_id in pc.unique(shard_ids).to_pylist():
        yield shard_id, table.filter(pc.equal(shard_ids, shard_id))


@dataclass
class ShardState:
    tables: list[pa.Table]
    received: int = 0
    expected: int | None = None
    ok: int = 0
    errors: Counter = field(default_factory=Counter)


class ShardWriter:
    """Gathers a run's rows per input shard and commits each shard once its last row has
    arrived; counts ok, error and unfinished rows (the error budget's tally); writes the
    run record. Commit actors and re-scoring use it too."""

    def __init__(self, shards: list[Shard], output: str, storage: StorageConfig,
                 metadata: dict[str, Any], complete: bool, key_columns: list[str],
                 keep_prompt: bool, keep_image_bytes: bool,
                 previous: dict[int, pa.Table] | None = None, *,
                 schema: dict[str, pa.DataType],
                 before_commit: Callable[[], None] | None = None,
                 output_format: OutputFormat = PARQUET):
        self.shards = {s.index: s for s in shards}
        self.format = output_format
        self._kwargs = {"output": output, "storage": storage, "metadata": metadata,
                        "complete": complete, "key_columns": key_columns,
                        "keep_prompt": keep_prompt, "keep_image_bytes": keep_image_bytes,
                        "schema": schema, "output_format": output_format}
        self.output = output
        self.storage = storage
        self.fs, self.root = storage.filesystem(output)
        self.metadata = metadata
        self.complete = complete
        self.previous = previous or {}
        self.schema = schema
        self.before_commit = before_commit  # e.g. flush side outputs the shard depends on
        self.columns = [*dict.fromkeys([*key_columns, *self.schema])]
        if not keep_prompt and "prompt" in self.columns:
            self.columns.remove("prompt")
        if keep_image_bytes:
            self.columns.append("image")
        self.state: dict[int, ShardState] = defaultdict(lambda: ShardState([]))
        self.committed: list[str] = []
        self.done: set[int] = set()
        self.rows_written = 0
        # Rows of this run's shards so far (committed or still gathering), by outcome.
        self.ok = 0
        self.errors: Counter = Counter()
        self.unfinished: dict[int, str] = {}  # shard -> why it is not committed
        self.unfinished_seen: Counter = Counter()  # rows that arrived for those shards
        self.unknown_size = 0  # committed broken files whose row count is unknown
        # What a shard of unknown size weighs in the error budget: a typical shard of this
        # run. Worked out once: tally() runs for every block, and a run may have 100k shards.
        sizes = [s.estimated_rows for s in shards if s.estimated_rows is not None]
        self.typical_rows = round(sum(sizes) / len(sizes)) if sizes else 1

    def add(self, table: pa.Table) -> list[int]:
        """Take a batch from the pipeline; return the shards it completed (now committed)."""
        finished = []
        for shard_id, part in shard_parts(table):
            if shard_id in self.unfinished:  # in flight when the shard failed: dropped
                self.unfinished_seen[shard_id] += part.num_rows
                continue
            if shard_id in self.done:
                raise RuntimeError(f"rows for already committed shard {shard_id} arrived")
            kinds = part["error_kind"] if "error_kind" in part.column_names else None
            if kinds is not None and pc.any(pc.equal(kinds, R.SHARD_UNFINISHED)).as_py():
                marker = part.filter(pc.equal(kinds, R.SHARD_UNFINISHED))
                reason = marker["error"][0].as_py()  # "<shard url>: why"
                self.fail(shard_id, reason.removeprefix(f"{self.shards[shard_id].url}: "),
                          part.num_rows)
                continue
            state = self.state[shard_id]
            state.tables.append(part)
            state.received += part.num_rows
            self._count(state, part)
            ends = pc.max(part[R.SHARD_END]).as_py()
            if ends is not None and ends >= 0:
                state.expected = ends
            if state.expected is not None and state.received == state.expected:
                if self.commit(shard_id):
                    finished.append(shard_id)
        return finished

    def remote_kwargs(self, shards: list[Shard]) -> dict[str, Any]:
        """This writer's arguments for a writer of ``shards`` elsewhere (a commit actor)."""
        return {**self._kwargs,
                "previous": {s.index: self.previous[s.index] for s in shards
                             if s.index in self.previous}}

    def absorb(self, report: dict[str, Any]) -> None:
        """Take over the outcome of another writer of some of these shards (a commit
        actor's :meth:`CommitActor.report`), as if this writer had written them."""
        self.committed += report["committed"]
        note_written(len(report["committed"]))
        self.done.update(report["done"])
        self.unfinished.update(report["unfinished"])
        self.unfinished_seen.update(report["unfinished_seen"])
        self.ok += report["ok"]
        self.errors.update(report["errors"])
        self.unknown_size += report["unknown_size"]
        self.rows_written += report["rows_written"]

    def _count(self, state: ShardState, part: pa.Table) -> None:
        if "status" not in part.column_names:
            state.ok += part.num_rows
            self.ok += part.num_rows
            return
        failed = part.filter(pc.equal(part["status"], "error"))
        kinds = Counter(k or "unknown" for k in failed["error_kind"].to_pylist())
        state.ok += part.num_rows - failed.num_rows
        self.ok += part.num_rows - failed.num_rows
        state.errors.update(kinds)
        self.errors.update(kinds)

    def fail(self, shard_id: int, reason: str, rows_seen: int = 0) -> None:
        """Leave a shard unfinished: whatever arrived for it is dropped, nothing is written."""
        state = self.state.pop(shard_id, None)
        if state is not None:
            self.ok -= state.ok
            self.errors.subtract(state.errors)
            self.errors = +self.errors  # drop zero counts
            rows_seen += state.received
        self.unfinished[shard_id] = reason
        self.unfinished_seen[shard_id] += rows_seen

    def unfinished_rows(self) -> tuple[int, int]:
        """(input rows of the unfinished shards whose row count is known, how many shards
        have no known count)."""
        sizes = [self.shards[i].estimated_rows for i in self.unfinished]
        return sum(n for n in sizes if n is not None), sum(n is None for n in sizes)

    def unfinished_urls(self) -> dict[str, str]:
        return {self.shards[i].url: why for i, why in sorted(self.unfinished.items())}

    def finish(self) -> None:
        """After the run: commit shards that produced no rows, and (for --limit/--sample
        previews) whatever partial shards arrived."""
        for shard_id in self.shards:
            if shard_id in self.done or shard_id in self.unfinished:
                continue
            state = self.state.get(shard_id)
            if state is None:
                if self.complete:
                    self.commit(shard_id)
            elif state.expected is None or state.received != state.expected:
                if self.complete:  # rows were lost on the way: never commit a partial shard
                    self.fail(shard_id, f"{state.received} rows arrived, "
                              f"{state.expected or 'more'} expected")
                else:
                    self.commit(shard_id)

    def _shape(self, table: pa.Table) -> pa.Table:
        columns = {}
        for name in self.columns:
            wanted = self.schema.get(name) or (pa.binary() if name == "image" else None)
            if name in table.column_names:
                column = table[name]
                if wanted is not None and column.type != wanted:
                    column = column.cast(wanted)
            else:
                column = pa.nulls(table.num_rows, wanted or pa.string())
            columns[name] = column
        return pa.table(columns)

    def commit(self, shard_id: int) -> bool:
        """Write a shard's file; False (the shard left unfinished) when storage keeps failing.
        """
        if self.before_commit is not None:
            self.before_commit()
        shard = self.shards[shard_id]
        state = self.state.get(shard_id)
        tables = [self._shape(t) for t in (state.tables if state else [])]
        if shard_id in self.previous:  # --retry-failed: new rows replace the old error rows
            old = self._shape(self.previous[shard_id])
            redone = pa.array(sorted({r for t in tables for r in t["source_row"].to_pylist()}),
                              pa.int64())
            tables.insert(0, old.filter(pc.invert(pc.is_in(old["source_row"], redone))))
        if tables:
            table = pa.concat_tables(tables, promote_options="permissive")
        else:
            table = self._shape(pa.table({"source_row": pa.array([], pa.int64())}))
        table = table.sort_by([("source_row", "ascending")])
        errors = (pc.sum(pc.equal(table["status"], "error")).as_py() or 0
                  if "status" in table.column_names else 0)
        corrupt = ("error_kind" in table.column_names
                   and pc.any(pc.equal(table["error_kind"], R.SHARD_CORRUPT)).as_py())
        # A broken file's row count is known only where its metadata gave it.
        input_rows = (table.num_rows if not corrupt or shard.estimated_rows == table.num_rows
                      else None)
        meta = {**self.metadata, "input_url": shard.url, "input_fingerprint": shard.fingerprint,
                "complete": self.complete, "rows": table.num_rows, "errors": errors,
                "input_rows": input_rows,
                "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        body = self.format.encode(table, meta)
        url = join_url(self.output, shard.output_name)
        try:
            self.storage.retry(lambda: write_atomic(self.fs, self._path(shard.output_name),
                                                    body), "write", url)
        except StorageUnavailable as exc:
            self.fail(shard_id, str(exc))
            return False
        self.state.pop(shard_id, None)
        self.committed.append(url)
        self.done.add(shard_id)
        self.rows_written += table.num_rows
        self.unknown_size += input_rows is None
        return True

    def tally(self) -> tuple[int, Counter, int]:
        """(ok rows, error rows by kind, rows of unfinished shards) of this run so far."""
        # A shard of unknown size counts as a typical shard of this run (or the rows seen of
        # it, if more), so that a shard failing whole weighs what its rows would.
        return self.ok, self.errors, self.unfinished_rows()[0] + sum(
            max(self.unfinished_seen[i], self.typical_rows) for i in self.unfinished
            if self.shards[i].estimated_rows is None)

    def _path(self, name: str) -> str:
        name = output_name_within(name, self.output)  # never a file outside the output
        return (posixpath.join(self.root, name) if "://" not in self.output
                else self.root.rstrip("/") + "/" + name)

    def clear_run_records(self) -> None:
        """Before scoring: an earlier run's _SUCCESS / _UNFINISHED no longer tells the truth
        (both are iqray's own: plan_resume refused foreign ones)."""
        for name in (SUCCESS_NAME, UNFINISHED_NAME):
            path = self._path(name)
            if self.storage.retry(lambda path=path: self.fs.exists(path), "look up",
                                  join_url(self.output, name)):
                self.storage.retry(lambda path=path: self.fs.rm_file(path), "remove",
                                   join_url(self.output, name))

    def write_run_record(self, summary: dict[str, Any]) -> str:
        """_SUCCESS when every shard is committed, else _UNFINISHED naming the others."""
        name = UNFINISHED_NAME if self.unfinished else SUCCESS_NAME
        body = json.dumps({**self.metadata, **summary}, indent=2, sort_keys=True,
                          default=str).encode()
        self.storage.retry(lambda: write_atomic(self.fs, self._path(name), body), "write",
                           join_url(self.output, name))
        return name
