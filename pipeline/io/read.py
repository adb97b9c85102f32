"""Reading a shard: rows of raw (encoded) bytes in batches, whatever the format, and what
happens when a shard cannot be read. Readers never decode: decoding happens late, in the
decode stage.


* storage errors (5xx, throttling, resets, short bodies, timeouts) are retried with backoff,
  resuming at the first row not yet emitted, so a recovered read gives exactly the rows of
  a clean one; a shard still failing after ``storage_attempts`` is *unfinished*: one marker
  row (``error_kind`` ``shard_unfinished``) tells the writer to drop it, nothing is
  committed, and the next run reads it again;
* a file whose bytes are broken the same way on two reads (truncated tar, bad Parquet
  footer or page) is committed: the rows read before the damage as usual, then
  ``shard_corrupt`` error rows, one per remaining row where the file's metadata gives the
  row count, else one (its row count unknown);
* a shard without the configured columns is unfinished too (a configuration mistake is
  never committed); the driver checks the first shard before anything starts;
* per-row problems (an image that does not decode, a path that does not exist) are error
  rows of a committed shard.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from iqray.pipeline import rows as R
from iqray.pipeline.failures import StageBug, describe
from iqray.pipeline.io.folder import folder_rows
from iqray.pipeline.io.shards import (
    ReadConfig,
    Shard,
    ShardSchemaError,
    SourceRow,
    read_bytes,
    reference_path,
    resolve_ref,
    wants_references,
)
from iqray.pipeline.io.storage import (
    PERMANENT_OS_ERRORS,
    ROW_READ_FAILURES,
    StorageConfig,
    is_broken_bytes,
    is_transient,
)
from iqray.pipeline.io.tables import table_rows
from iqray.pipeline.io.webdataset import tar_rows


@dataclass
class RowBuffer:
    """Accumulates reader rows into column lists."""

    key_columns: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    references: bool = False

    def __post_init__(self) -> None:
        names = [R.SOURCE_FILE, R.SOURCE_ROW, R.PROMPT, R.IMAGE, R.ERROR, R.ERROR_KIND,
                 *self.key_columns] + ([R.REFERENCE] if self.references else [])
        self.columns = {name: [] for name in names}

    def __len__(self) -> int:
        return len(self.columns[R.SOURCE_ROW])

    def add(self, row: SourceRow) -> None:
        columns = self.columns
        columns[R.SOURCE_FILE].append(row.source_file)
        columns[R.SOURCE_ROW].append(row.row)
        columns[R.PROMPT].append(row.prompt)
        columns[R.IMAGE].append(row.image)
        columns[R.ERROR].append(row.error)
        columns[R.ERROR_KIND].append(row.error_kind)
        for name in self.key_columns:
            columns[name].append(row.keys.get(name))
        if self.references:
            columns[R.REFERENCE].append(row.reference)

    def take(self) -> dict[str, list[Any]]:
        out = self.columns
        self.__post_init__()
        return out


def keep_row(shard_url: str, row: int, read: ReadConfig) -> bool:
    if read.sample is None:
        return True
    digest = hashlib.blake2b(f"{read.seed}:{shard_url}:{row}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64 < read.sample


class ShardUnfinished(RuntimeError):
    """A shard could not be read; raised to in-process callers (``on_failure="raise"``)."""


def read_shard(shard: Shard, read: ReadConfig, storage: StorageConfig,
               key_columns: list[str], on_failure: Literal["raise", "marker"] = "raise"
               ) -> Iterator[dict[str, list[Any]]]:
    """Rows of one shard in batches of ``read.read_batch_rows``.

    The last batch carries ``_shard_end`` = the number of rows the shard produced, so the
    writer knows when it holds the whole shard. An empty shard yields nothing; the writer
    commits an empty output for it once the run has finished. A shard that cannot be read
    (see the module docstring) raises :class:`ShardUnfinished`, or with
    ``on_failure="marker"`` (the pipeline) ends with one ``shard_unfinished`` row.
    """
    references = wants_references(read)
    buffer = RowBuffer(key_columns, references=references)
    wanted = set(shard.only_rows) if shard.only_rows is not None else None
    emitted = 0
    clock = [time.perf_counter()]
    held: dict[str, list[Any]] | None = None  # one full batch held back for the end marker
    for row in _resilient_rows(shard, read, storage, key_columns, on_failure):
        if row.error_kind != R.SHARD_UNFINISHED:
            if wanted is not None and row.row not in wanted:
                continue
            if wanted is None and not keep_row(shard.url, row.row, read):
                continue
            if references:
                row = with_reference(row, shard, read, storage)
        buffer.add(row)
        emitted += 1
        if len(buffer) >= read.read_batch_rows:
            if held is not None:
                yield _finish(held, shard, -1, clock)
            held = buffer.take()
    rest = buffer.take()
    if held is not None and rest[R.SOURCE_ROW]:
        yield _finish(held, shard, -1, clock)
        held = None
    last = held if held is not None else rest
    if last[R.SOURCE_ROW]:
        yield _finish(last, shard, emitted, clock)


def _resilient_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                    key_columns: list[str], on_failure: str) -> Iterator[SourceRow]:
    """The format's rows, read again from the first row not yet yielded after a storage
    error (bounded attempts, backoff), so a recovered shard has exactly a clean read's rows.
    """
    produce = {"parquet": table_rows, "csv": table_rows, "webdataset": tar_rows,
               "folder": folder_rows}[shard.format]
    start, failures, last_broken = 0, 0, None
    while True:
        try:
            for row in produce(shard, read, storage, key_columns, start):
                yield row
                start, failures, last_broken = row.row + 1, 0, None  # progress: a fresh budget
            return
        except ShardSchemaError as exc:
            reason = str(exc)
        except Exception as exc:
            signature = describe(exc)
            broken = is_broken_bytes(exc)
            if not (broken or is_transient(exc) or isinstance(exc, PERMANENT_OS_ERRORS)):
                raise StageBug.of("read", f"shard {shard.url} row {start}", exc) from exc
            if broken:
                if last_broken == (start, signature):  # the same damage twice: the file's
                    yield from _corrupt_rows(shard, start, signature, key_columns)
                    return
                last_broken = (start, signature)
            failures += 1
            retry = broken or is_transient(exc)
            # Broken bytes get their confirming read even when the attempts are spent.
            if retry and failures < storage.storage_attempts + broken:
                time.sleep(storage.backoff_s(failures))
                continue
            reason = (f"cannot read (stopped at row {start}, {failures} attempts): {signature}"
                      if retry else f"cannot read: {signature}")
        if on_failure == "raise":
            raise ShardUnfinished(f"{shard.url}: {reason}")
        yield SourceRow(shard.url, start, None, None, dict.fromkeys(key_columns),
                        f"{shard.url}: {reason}", R.SHARD_UNFINISHED)
        return


def _corrupt_rows(shard: Shard, start: int, signature: str, key_columns: list[str]
                  ) -> Iterator[SourceRow]:
    """Error rows for what a broken file holds from ``start`` on: one per row when its
    metadata gave the row count, else one."""
    end = shard.estimated_rows if shard.estimated_rows is not None else start + 1
    for row in range(start, max(end, start + 1)):
        yield SourceRow(shard.url, row, None, None, dict.fromkeys(key_columns),
                        f"{shard.url}: file unreadable from row {start} on: {signature}",
                        R.SHARD_CORRUPT)


def with_reference(row: SourceRow, shard: Shard, read: ReadConfig, storage: StorageConfig
                   ) -> SourceRow:
    """The row with its reference image's bytes in ``reference``, or an error row."""
    if row.error is not None:
        return row
    ref = row.reference_ref
    if isinstance(ref, dict):  # Hugging Face Image feature
        ref = ref.get("bytes") or ref.get("path")
    if ref is None and read.reference_template is not None and row.name is not None:
        ref = reference_path(read.reference_template, row.name, row.keys.get("key", row.name))
    where = f"{row.source_file} row {row.row}"
    if ref is None or ref == "":
        return row.failed(f"{where}: no reference image", "missing_reference")
    if isinstance(ref, str):
        try:
            ref = read_bytes(resolve_ref(shard.url, ref, read.image_root), storage)
        except ROW_READ_FAILURES as exc:
            return row.failed(f"{where}: cannot read reference {ref}: "
                              f"{type(exc).__name__}: {exc}", "read_reference")
    if not isinstance(ref, bytes | bytearray):
        return row.failed(f"{where}: reference column holds {type(ref).__name__}, not bytes "
                          "or a path", "bad_type")
    row.reference = bytes(ref)
    return row


def _finish(columns: dict[str, list[Any]], shard: Shard, end: int, clock: list[float]
            ) -> dict[str, list[Any]]:
    count = len(columns[R.SOURCE_ROW])
    now = time.perf_counter()
    columns[R.SHARD] = [shard.index] * count
    columns[R.SHARD_END] = [end] * count
    columns[R.READ_S] = [(now - clock[0]) / count] * count
    clock[0] = now
    return columns
