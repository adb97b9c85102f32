"""Parquet and CSV shards: one row per table row, the image as bytes in a column (HF
``Image`` structs too) or as a path/URL resolved against ``--image-root`` or the table's
folder. Parquet row groups wholly before a resume point are not read."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from iqray.pipeline.io.shards import (
    ReadConfig,
    Shard,
    ShardSchemaError,
    SourceRow,
    check_columns,
    column_roles,
    image_cell,
    read_bytes,
    resolve_ref,
)
from iqray.pipeline.io.storage import StorageConfig


def read_table(url: str, storage: StorageConfig) -> pa.Table:
    """A whole CSV or Parquet table (labelled-data tables, source shards to copy rows from)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        return pa_csv.read_csv(handle) if path.endswith(".csv") else pq.read_table(handle)


def table_columns(fs, path: str) -> list[str]:
    with fs.open(path, "rb") as handle:
        if path.endswith(".csv"):
            return pa_csv.read_csv(handle).schema.names
        return pq.ParquetFile(handle).schema_arrow.names


def table_num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as handle:
        if path.endswith(".csv"):
            return pa_csv.read_csv(handle).num_rows
        return pq.ParquetFile(handle).metadata.num_rows


def _table_batches(handle, path: str, batch_rows: int, read: ReadConfig, where: str,
                   key_columns: list[str], start: int = 0):
    """(image, path, prompt column names, record batches, number of the batches' first row)
    of a Parquet or CSV table; Parquet row groups wholly before ``start`` are not read."""
    first = 0
    if path.endswith(".csv"):
        # An index names files; keep ids such as "000123" as text, not numbers.
        table = pa_csv.read_csv(handle, convert_options=pa_csv.ConvertOptions(
            column_types={c: pa.string() for c in key_columns}))
        columns = table.schema.names
        batches = table.to_batches(max_chunksize=batch_rows)
    else:
        parquet = pq.ParquetFile(handle)
        columns = parquet.schema_arrow.names
        batches = None
    try:
        check_columns(columns, read, where)
        image_col, path_col, prompt_col = column_roles(columns, read, where)
    except ValueError as exc:
        raise ShardSchemaError(str(exc)) from None
    wanted = [c for c in dict.fromkeys([image_col, path_col, prompt_col, *key_columns,
                                        read.reference_column])
              if c is not None and c in columns]
    if batches is None:
        groups = []
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first + rows <= start and not groups:
                first += rows
                continue
            groups.append(group)
        batches = parquet.iter_batches(batch_size=batch_rows, columns=wanted,
                                       row_groups=groups)
    else:
        batches = (b.select(wanted) for b in batches)
    return image_col, path_col, prompt_col, batches, first


def table_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                key_columns: list[str], start: int = 0) -> Iterator[SourceRow]:
    fs, path = storage.filesystem(shard.url)
    with fs.open(path, "rb") as handle:
        image_col, path_col, prompt_col, batches, row = _table_batches(
            handle, path, read.read_batch_rows, read, shard.url, key_columns, start)
        for batch in batches:
            for record in batch.to_pylist():
                if row >= start:
                    yield _table_row(shard, row, record, image_col, path_col, prompt_col,
                                     key_columns, read, storage)
                row += 1


def _table_row(shard: Shard, row: int, record: dict, image_col: str | None,
               path_col: str | None, prompt_col: str | None, key_columns: list[str],
               read: ReadConfig, storage: StorageConfig) -> SourceRow:
    keys = {k: record.get(k) for k in key_columns}
    prompt = record.get(prompt_col) if prompt_col else None
    prompt = prompt if isinstance(prompt, str) else None
    image, error, kind = image_cell(
        record.get(image_col or path_col), f"{shard.url} row {row}",
        lambda ref: read_bytes(resolve_ref(shard.url, ref, read.image_root), storage),
        paths=image_col is None)
    return SourceRow(shard.url, row, image, prompt, keys, error, kind,
                     reference_ref=(record.get(read.reference_column)
                                    if read.reference_column is not None else None),
                     name=record.get(path_col) if path_col is not None else None)
