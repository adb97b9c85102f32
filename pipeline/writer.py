"""Writer and resume: one output Parquet per input shard, committed atomically, exactly once.

Score rows are small (keys + a few numbers), so the driver gathers them per shard as they
stream out of the actor pool and commits a shard's file the moment its last row arrives
(the reader marks a shard's final batch with the shard's row count). A file is written in
one go (temp + rename locally, a single PUT on object stores), so no partial output is ever
visible, and its footer records the input's fingerprint and the scorer's identity. A rerun
skips every shard whose committed output matches both: that is the whole resume protocol,
and it decides before anything is read, so done shards cost one footer read each.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import posixpath
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iqray.pipeline.readers import Shard
from iqray.pipeline.storage import StorageConfig, join_url, write_atomic

METADATA_KEY = b"iqray"
SUCCESS_NAME = "_SUCCESS"
SCORE_COLUMNS = {
    "source_file": pa.string(),
    "source_row": pa.int64(),
    "prompt": pa.string(),
    "image_sha256": pa.string(),
    "quality": pa.float32(),
    "alignment": pa.float32(),
    "prompt_truncated": pa.bool_(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}


def score_schema(output_names: list[str], prompt_truncated: bool = True
                 ) -> dict[str, pa.DataType]:
    """SCORE_COLUMNS with the model's own outputs in place of quality/alignment (BPCLIP:
    quality and one column per quality dimension, no prompt columns of its own)."""
    schema = {}
    for name, kind in SCORE_COLUMNS.items():
        if name == "quality":
            schema.update({o: pa.float32() for o in output_names})
        elif name == "alignment" or (name == "prompt_truncated" and not prompt_truncated):
            continue
        else:
            schema[name] = kind
    return schema


@dataclass
class ShardState:
    tables: list[pa.Table]
    received: int = 0
    expected: int | None = None


def read_output_metadata(fs, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.read_schema(handle).metadata or {}
    except Exception:  # unreadable or foreign file: treat as not committed
        return None
    raw = metadata.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def plan_resume(shards: list[Shard], output: str, storage: StorageConfig, scoring_hash: str,
                retry_failed: bool) -> tuple[list[Shard], list[Shard], dict[int, pa.Table]]:
    """Split shards into (to score, already done) and, for --retry-failed, the old tables
    whose error rows are being rescored."""
    fs, root = storage.filesystem(output)
    existing = set(fs.find(root)) if fs.exists(root) else set()
    todo, done, previous = [], [], {}
    for shard in shards:
        path = posixpath.join(root, shard.output_name)
        meta = read_output_metadata(fs, path) if path in existing else None
        committed = (meta is not None and meta.get("input_fingerprint") == shard.fingerprint
                     and meta.get("scoring_hash") == scoring_hash and meta.get("complete"))
        if not committed:
            todo.append(shard)
            continue
        if not retry_failed or not meta.get("errors"):
            done.append(shard)
            continue
        with fs.open(path, "rb") as handle:
            old = pq.read_table(handle)
        errors = old.filter(pc.equal(old["status"], "error"))
        whole_file = "shard_read" in errors["error_kind"].to_pylist()
        if whole_file:  # the file itself was unreadable: read all of it again
            todo.append(shard)
        else:
            shard.only_rows = sorted(errors["source_row"].to_pylist())
            previous[shard.index] = old
            todo.append(shard)
    return todo, done, previous


class ShardWriter:
    def __init__(self, shards: list[Shard], output: str, storage: StorageConfig,
                 metadata: dict[str, Any], complete: bool, key_columns: list[str],
                 keep_prompt: bool, keep_image_bytes: bool,
                 previous: dict[int, pa.Table] | None = None,
                 schema: dict[str, pa.DataType] | None = None,
                 before_commit: Callable[[], None] | None = None):
        self.shards = {s.index: s for s in shards}
        self.output = output
        self.fs, self.root = storage.filesystem(output)
        self.metadata = metadata
        self.complete = complete
        self.previous = previous or {}
        self.schema = schema or SCORE_COLUMNS
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

    def add(self, table: pa.Table) -> list[int]:
        """Take a batch from the pipeline; return the shards it completed (now committed)."""
        finished = []
        shard_ids = table["_shard"]
        for shard_id in pc.unique(shard_ids).to_pylist():
            part = table.filter(pc.equal(shard_ids, shard_id))
            if shard_id in self.done:
                raise RuntimeError(f"rows for already committed shard {shard_id} arrived")
            state = self.state[shard_id]
            state.tables.append(part)
            state.received += part.num_rows
            ends = pc.max(part["_shard_end"]).as_py()
            if ends is not None and ends >= 0:
                state.expected = ends
            if state.expected is not None and state.received == state.expected:
                self.commit(shard_id)
                finished.append(shard_id)
        return finished

    def finish(self) -> None:
        """After the run: commit shards that produced no rows, and (for --limit/--sample
        previews) whatever partial shards arrived."""
        for shard_id in self.shards:
            if shard_id in self.done:
                continue
            state = self.state.get(shard_id)
            if state is None:
                if self.complete:
                    self.commit(shard_id)
            elif state.expected is None or state.received != state.expected:
                if self.complete:
                    raise RuntimeError(
                        f"shard {self.shards[shard_id].url}: {state.received} rows arrived, "
                        f"{state.expected} expected; not committed")
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

    def commit(self, shard_id: int) -> None:
        if self.before_commit is not None:
            self.before_commit()
        shard = self.shards[shard_id]
        state = self.state.pop(shard_id, None)
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
        meta = {**self.metadata, "input_url": shard.url, "input_fingerprint": shard.fingerprint,
                "complete": self.complete, "rows": table.num_rows, "errors": errors,
                "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        write_atomic(self.fs, posixpath.join(self.root, shard.output_name)
                     if "://" not in self.output else
                     self.root.rstrip("/") + "/" + shard.output_name, buffer.getvalue())
        self.committed.append(join_url(self.output, shard.output_name))
        self.done.add(shard_id)
        self.rows_written += table.num_rows

    def write_success(self, summary: dict[str, Any]) -> None:
        body = json.dumps({**self.metadata, **summary}, indent=2, sort_keys=True).encode()
        write_atomic(self.fs, self.root.rstrip("/") + "/" + SUCCESS_NAME, body)
