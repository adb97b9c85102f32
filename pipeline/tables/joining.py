"""Join score rows back to the source dataset: a filtered copy of the user's own shards.

Each output row names its ``source_file`` and ``source_row`` (the reader's row number in
that file), so the copy needs no key matching:

- Parquet shards -> the same file with only the chosen rows, every original column kept,
  the score columns appended;
- CSV index shards -> Parquet of the chosen index rows (image paths as in the source);
- WebDataset tars -> a tar with only the chosen samples, every member byte-identical, plus a
  ``<key>.iqray.json`` member with the scores;
- folders of images -> one Parquet with the image bytes, prompt and scores.

Outputs mirror the source layout under the output directory; each file is written
atomically, so a rerun overwrites complete files only.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from iqray.pipeline.io.shards import read_bytes, source_file_kind
from iqray.pipeline.io.storage import StorageConfig, join_url, write_atomic
from iqray.pipeline.io.tables import read_table
from iqray.pipeline.io.webdataset import iter_tar_samples


def relative_to(url: str, root: str) -> str:
    """``url``'s path under ``root`` (both URLs or both local paths)."""
    if "://" not in url and "://" not in root:
        url, root = os.path.abspath(url), os.path.abspath(root)
    root = root.rstrip("/")
    if not url.startswith(root + "/"):
        raise ValueError(f"{url} is not under the join source {root}")
    return url[len(root) + 1:]


def join_to_source(chosen: pa.Table, source_root: str, output: str,
                   storage: StorageConfig, score_columns: list[str]) -> list[str]:
    """Write the source rows of ``chosen`` (score rows) under ``output``; returns the URLs."""
    by_file: dict[str, list[int]] = defaultdict(list)
    files = chosen["source_file"].to_pylist()
    for i, source_file in enumerate(files):
        by_file[source_file].append(i)
    written, images = [], []
    for source_file, indices in sorted(by_file.items()):
        rows = chosen.take(pa.array(indices))
        kind = source_file_kind(source_file)
        relative = relative_to(source_file, source_root)
        if kind == "table":
            target = join_url(output, posixpath.splitext(relative)[0] + ".parquet")
            _write_table_rows(source_file, rows, target, storage, score_columns)
        elif kind == "webdataset":
            target = join_url(output, relative)
            _write_tar_samples(source_file, rows, target, storage, score_columns)
        else:  # a folder's image file
            images.append((relative, rows))
            continue
        written.append(target)
    if images:
        target = join_url(output, "images.parquet")
        _write_images(images, source_root, target, storage, score_columns)
        written.append(target)
    return written


def _write_table_rows(source_file: str, rows: pa.Table, target: str, storage: StorageConfig,
                      score_columns: list[str]) -> None:
    source = read_table(source_file, storage)
    order = rows["source_row"].to_pylist()
    table = source.take(pa.array(order))
    for column in score_columns:
        name = column if column not in table.column_names else f"iqray_{column}"
        table = table.append_column(name, rows[column])
    _write_parquet(table, target, storage)


def _write_tar_samples(source_file: str, rows: pa.Table, target: str, storage: StorageConfig,
                       score_columns: list[str]) -> None:
    wanted = {row: i for i, row in enumerate(rows["source_row"].to_pylist())}
    records = rows.select(score_columns).to_pylist()
    fs, path = storage.filesystem(source_file)
    buffer = io.BytesIO()
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=buffer, mode="w") as out:
        for index, (key, sample, members) in enumerate(iter_tar_samples(handle)):
            if index not in wanted:
                continue
            for member in members:
                ext = posixpath.basename(member.name).split(".", 1)[1].lower()
                out.addfile(member, io.BytesIO(sample[ext]))
            data = json.dumps(records[wanted[index]]).encode()
            info = tarfile.TarInfo(f"{key}.iqray.json")
            info.size, info.mtime = len(data), members[0].mtime
            out.addfile(info, io.BytesIO(data))
    out_fs, out_path = storage.filesystem(target)
    write_atomic(out_fs, out_path, buffer.getvalue())


def _write_images(images: list[tuple[str, pa.Table]], source_root: str, target: str,
                  storage: StorageConfig, score_columns: list[str]) -> None:
    columns: dict[str, list] = {"name": [], "image": [], "prompt": []}
    columns.update({c: [] for c in score_columns})
    for relative, rows in images:
        for record in rows.to_pylist():
            columns["name"].append(relative)
            columns["image"].append(read_bytes(join_url(source_root, relative), storage))
            columns["prompt"].append(record.get("prompt"))
            for column in score_columns:
                columns[column].append(record[column])
    table = pa.table({k: pa.array(v, pa.binary() if k == "image" else None)
                      for k, v in columns.items()})
    _write_parquet(table, target, storage)


def _write_parquet(table: pa.Table, target: str, storage: StorageConfig) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs, path = storage.filesystem(target)
    write_atomic(fs, path, sink.getvalue())
