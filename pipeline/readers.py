"""Readers: input URL -> shards (the unit of work, retry and resume) -> rows of raw bytes.

Three input layouts, any fsspec URL, a single file, a directory or a glob:

* Parquet with an image-bytes column (img2dataset ``jpg``, HF ``image`` struct with
  ``bytes``/``path``, ...) or an image path/URL column, a prompt column and key columns;
* WebDataset tar shards (``<key>.jpg|png|webp`` + ``<key>.txt|json``), as img2dataset writes;
* a folder of images, with prompts from a CSV/JSONL sidecar or none (quality only); the
  folder is cut into chunks of ``folder_chunk_size`` images, each chunk a shard.

Readers never decode: they emit the encoded bytes, and decoding happens late in the decode
stage. What happens when a shard cannot be read (see :func:`read_shard`):

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

import csv
import hashlib
import io
import json
import os
import posixpath
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from iqray.pipeline.storage import (
    StorageConfig,
    StorageUnavailable,
    fingerprint,
    inside,
    is_broken_bytes,
    is_transient,
    location,
    to_url,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUTO_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "image_bytes", "img", "bytes")
AUTO_PATH_COLUMNS = ("image_path", "path", "file_name", "filename", "file", "url", "image_url")
AUTO_PROMPT_COLUMNS = ("prompt", "caption", "text", "txt")
AUTO_KEY_COLUMNS = ("key", "id", "uid", "__key__")
AUTO_SIDECARS = ("prompts.csv", "metadata.csv", "captions.csv", "metadata.jsonl",
                 "prompts.jsonl", "captions.jsonl")

# Error kinds of rows a reader makes for a whole shard.
SHARD_UNFINISHED = "shard_unfinished"  # not committed; the next run reads the shard again
SHARD_CORRUPT = "shard_corrupt"  # the file's bytes are broken: committed as error rows

InputFormat = Literal["auto", "parquet", "csv", "webdataset", "folder"]
TABLE_FORMATS = ("parquet", "csv")


class ReadConfig(BaseModel):
    """What to read and which columns mean what (None = detect the usual names)."""

    model_config = ConfigDict(extra="forbid")

    format: InputFormat = Field(default="auto", description="input layout")
    image_column: str | None = Field(default=None, description="column with image bytes")
    image_path_column: str | None = Field(
        default=None, description="column with an image path/URL (relative to the shard)")
    prompt_column: str | None = Field(default=None, description="column with the prompt")
    key_columns: list[str] | None = Field(default=None,
                                          description="id columns passed through to the output")
    image_root: str | None = Field(
        default=None, description="base URL for relative image paths (default: the table's dir)")
    sidecar: str | None = Field(default=None,
                                description="folder input: CSV/JSONL with name + prompt")
    folder_chunk_size: int = Field(default=1000, gt=0,
                                   description="folder input: images per shard")
    read_batch_rows: int = Field(default=64, gt=0, description="rows per batch out of a reader")
    reference_column: str | None = Field(
        default=None, description="full-reference models: column with the reference image "
        "(bytes, or a path/URL resolved like image paths)")
    reference_template: str | None = Field(
        default=None, description="full-reference models: reference path per row, from "
        "{name} (image file name), {stem} (name without extension) or {key}; relative to "
        "--image-root or the input's folder, e.g. 'refs/{stem}.png'")
    sample: float | None = Field(default=None, gt=0, le=1,
                                 description="keep this fraction of rows (deterministic)")
    seed: int = Field(default=0, description="seed of --sample")


@dataclass
class Shard:
    index: int
    url: str
    format: str
    output_name: str
    fingerprint: str
    members: list[str] | None = None  # folder chunks: image URLs
    prompts: dict[str, str | None] | None = None  # folder chunks: name -> prompt
    only_rows: list[int] | None = None  # --retry-failed: rows to read again
    estimated_rows: int | None = None


@dataclass
class RowBuffer:
    """Accumulates reader rows into column lists."""

    key_columns: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    references: bool = False

    def __post_init__(self) -> None:
        names = ["source_file", "source_row", "prompt", "_image", "_error", "_error_kind",
                 *self.key_columns] + (["_reference"] if self.references else [])
        self.columns = {name: [] for name in names}

    def __len__(self) -> int:
        return len(self.columns["source_row"])

    def add(self, source_file: str, row: int, image: bytes | None, prompt: str | None,
            keys: dict[str, Any], error: str | None = None, kind: str | None = None) -> None:
        values = {"source_file": source_file, "source_row": row, "prompt": prompt,
                  "_image": image, "_error": error, "_error_kind": kind, **keys}
        for name, column in self.columns.items():
            column.append(values.get(name))

    def take(self) -> dict[str, list[Any]]:
        out = self.columns
        self.__post_init__()
        return out


# -- discovery ---------------------------------------------------------------------------

def discover_shards(input_url: str, read: ReadConfig, storage: StorageConfig,
                    exclude: str | None = None, warn=None) -> list[Shard]:
    """The input's shards. Listings and footer reads are retried on storage errors (then
    :class:`StorageUnavailable`); nothing under ``exclude`` (the job's output) is ever
    taken as input. ``warn`` gets a line for each silent gap found (sidecar misses)."""
    fs, root = storage.filesystem(input_url)

    def listed(what: str, action):
        return storage.retry(action, what, input_url)

    if any(ch in root for ch in "*?["):
        paths = sorted(listed("list", lambda: fs.glob(root)))
        base = root.split("*")[0].rsplit("/", 1)[0] if "/" in root else ""
    elif listed("look up", lambda: fs.isdir(root)):
        paths = sorted(p for p in listed("list", lambda: fs.find(root))
                       if not _hidden(posixpath.relpath(p, root)))
        base = root
    elif listed("look up", lambda: fs.exists(root)):
        paths = [root]
        base = posixpath.dirname(root)
    else:
        raise FileNotFoundError(f"input {input_url} does not exist")
    if exclude is not None:
        excluded = location(exclude)
        paths = [p for p in paths if not _under_location(location(to_url(fs, p, input_url)),
                                                         excluded)]
    infos = {p: listed("look up", lambda p=p: fs.info(p)) for p in paths}
    paths = [p for p in paths if infos[p].get("type") != "directory"]

    fmt = read.format
    if fmt == "auto":
        fmt = _detect_format(paths, input_url)
    if fmt == "parquet":
        chosen = [p for p in paths if p.endswith(".parquet")]
        return [_file_shard(i, fs, p, base, input_url, "parquet", infos[p], storage)
                for i, p in enumerate(chosen)]
    if fmt == "csv":
        chosen = [p for p in paths if p.endswith(".csv")]
        return [_file_shard(i, fs, p, base, input_url, "csv", infos[p], storage)
                for i, p in enumerate(chosen)]
    if fmt == "webdataset":
        chosen = [p for p in paths if p.endswith(".tar")]
        return [_file_shard(i, fs, p, base, input_url, "webdataset", infos[p], storage)
                for i, p in enumerate(chosen)]
    return _folder_shards(fs, paths, base, input_url, infos, read, storage, warn)


def _under_location(path: tuple[str, str], folder: tuple[str, str]) -> bool:
    return path[0] == folder[0] and inside(path[1], folder[1])


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _detect_format(paths: list[str], input_url: str) -> str:
    # img2dataset writes NNNNN.tar beside NNNNN.parquet (metadata): tars win when present.
    if any(p.endswith(".tar") for p in paths):
        return "webdataset"
    if any(p.endswith(".parquet") for p in paths):
        return "parquet"
    if any(p.lower().endswith(IMAGE_EXTENSIONS) for p in paths):
        return "folder"  # a prompts.csv beside images is a sidecar, not the input
    if any(p.endswith(".csv") for p in paths):
        return "csv"
    raise ValueError(f"input {input_url}: found no .parquet, .csv, .tar or image files "
                     f"({len(paths)} files looked at); set --format explicitly")


def _file_shard(index: int, fs, path: str, base: str, input_url: str, fmt: str,
                info: dict, storage: StorageConfig) -> Shard:
    relative = posixpath.relpath(path, base) if base else posixpath.basename(path)
    output_name = posixpath.splitext(relative)[0] + ".parquet"
    url = to_url(fs, path, input_url)
    estimated = None
    if fmt in TABLE_FORMATS:
        try:
            estimated = storage.retry(lambda: table_num_rows(fs, path), "read the footer of",
                                      url)
        except Exception:  # the read stage tries again, and decides and records what it is
            estimated = None
    return Shard(index, url, fmt, output_name, fingerprint(info), estimated_rows=estimated)


def _folder_shards(fs, paths: list[str], base: str, input_url: str, infos: dict,
                   read: ReadConfig, storage: StorageConfig, warn=None) -> list[Shard]:
    images = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
    sidecar, prompts = _load_sidecar(fs, paths, input_url, read, storage)
    if sidecar is not None and warn is not None:
        names = [posixpath.relpath(p, base) if base else posixpath.basename(p) for p in images]
        missed = [n for n in names if not _in_sidecar(prompts, n)]
        matched = len(names) - len(missed)
        if missed:
            examples = ", ".join(missed[:5])
            warn(f"sidecar {sidecar} names {matched} of {len(names)} images; the other "
                 f"{len(missed)} get no prompt (alignment null), e.g. {examples}")
    shards = []
    for number, start in enumerate(range(0, len(images), read.folder_chunk_size)):
        chunk = images[start : start + read.folder_chunk_size]
        digest = hashlib.sha256()
        names = []
        for path in chunk:
            name = posixpath.relpath(path, base) if base else posixpath.basename(path)
            names.append(name)
            prompt = _sidecar_prompt(prompts, name)
            digest.update(f"{name}\0{fingerprint(infos[path])}\0{prompt}\n".encode())
        shards.append(Shard(
            number, to_url(fs, base, input_url) + f"#chunk-{number:05d}", "folder",
            f"images-{number:05d}.parquet", digest.hexdigest(),
            members=[to_url(fs, p, input_url) for p in chunk],
            prompts={n: _sidecar_prompt(prompts, n) for n in names},
            estimated_rows=len(chunk)))
    return shards


def _sidecar_prompt(prompts: dict[str, str | None], name: str) -> str | None:
    """Sidecars name images relative to the folder, or by bare file name."""
    if name in prompts:
        return prompts[name]
    return prompts.get(posixpath.basename(name))


def _in_sidecar(prompts: dict[str, str | None], name: str) -> bool:
    return name in prompts or posixpath.basename(name) in prompts


def _load_sidecar(fs, paths: list[str], input_url: str, read: ReadConfig,
                  storage: StorageConfig) -> tuple[str | None, dict[str, str | None]]:
    """(the sidecar's URL or None, image name -> prompt)."""
    if read.sidecar:
        side_fs, side_path = storage.filesystem(read.sidecar)
        side_url = read.sidecar
    else:
        found = [p for p in paths if posixpath.basename(p) in AUTO_SIDECARS]
        if not found:
            return None, {}
        side_fs, side_path = fs, found[0]
        side_url = to_url(fs, side_path, input_url)
    raw = storage.retry(lambda: side_fs.cat_file(side_path), "read the sidecar", side_url)
    text = raw.decode("utf-8-sig")
    if side_path.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = list(csv.DictReader(io.StringIO(text)))
    if not records:
        return side_url, {}
    columns = list(records[0])
    name_col = _pick(columns, ("name", "file_name", "filename", "file", "image", "path"),
                     None, f"sidecar {side_path}", "image name")
    prompt_col = _pick(columns, AUTO_PROMPT_COLUMNS, read.prompt_column,
                       f"sidecar {side_path}", "prompt")
    return side_url, {str(r[name_col]): (r.get(prompt_col) or None) for r in records}


def _pick(columns: list[str], candidates: tuple[str, ...], explicit: str | None, where: str,
          what: str, required: bool = True) -> str | None:
    if explicit:
        if explicit not in columns:
            raise ValueError(f"{where}: no column {explicit!r} for the {what}; columns: "
                             f"{', '.join(columns)}")
        return explicit
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise ValueError(f"{where}: no {what} column found (looked for "
                         f"{', '.join(candidates)}); columns: {', '.join(columns)}. "
                         f"Name it with the matching --*-column flag.")
    return None


# -- reading ------------------------------------------------------------------------------

def keep_row(shard_url: str, row: int, read: ReadConfig) -> bool:
    if read.sample is None:
        return True
    digest = hashlib.blake2b(f"{read.seed}:{shard_url}:{row}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / 2**64 < read.sample


class ShardSchemaError(ValueError):
    """A shard lacks a configured column: a configuration mistake, not broken bytes."""


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
        number, kind = row[1], row[6]
        if kind != SHARD_UNFINISHED:
            if wanted is not None and number not in wanted:
                continue
            if wanted is None and not keep_row(shard.url, number, read):
                continue
            if references:
                row = with_reference(row, shard, read, storage)
        buffer.add(*row)
        emitted += 1
        if len(buffer) >= read.read_batch_rows:
            if held is not None:
                yield _finish(held, shard, -1, clock)
            held = buffer.take()
    rest = buffer.take()
    if held is not None and rest["source_row"]:
        yield _finish(held, shard, -1, clock)
        held = None
    last = held if held is not None else rest
    if last["source_row"]:
        yield _finish(last, shard, emitted, clock)


def _resilient_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                    key_columns: list[str], on_failure: str) -> Iterator[tuple]:
    """The format's rows, read again from the first row not yet yielded after a storage
    error (bounded attempts, backoff), so a recovered shard has exactly a clean read's rows.
    """
    produce = {"parquet": _table_rows, "csv": _table_rows, "webdataset": _tar_rows,
               "folder": _folder_rows}[shard.format]
    start, failures, last_broken = 0, 0, None
    while True:
        try:
            for row in produce(shard, read, storage, key_columns, start):
                yield row
                start, failures, last_broken = row[1] + 1, 0, None  # progress: a fresh budget
            return
        except ShardSchemaError as exc:
            reason = str(exc)
        except Exception as exc:
            signature = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            broken = is_broken_bytes(exc)
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
        yield (shard.url, start, None, None, {k: None for k in key_columns},
               f"{shard.url}: {reason}", SHARD_UNFINISHED)
        return


def _corrupt_rows(shard: Shard, start: int, signature: str, key_columns: list[str]
                  ) -> Iterator[tuple]:
    """Error rows for what a broken file holds from ``start`` on: one per row when its
    metadata gave the row count, else one."""
    keys = {k: None for k in key_columns}
    end = shard.estimated_rows if shard.estimated_rows is not None else start + 1
    for row in range(start, max(end, start + 1)):
        yield (shard.url, row, None, None, dict(keys),
               f"{shard.url}: file unreadable from row {start} on: {signature}", SHARD_CORRUPT)


def wants_references(read: ReadConfig) -> bool:
    return read.reference_column is not None or read.reference_template is not None


def with_reference(row: tuple, shard: Shard, read: ReadConfig, storage: StorageConfig
                   ) -> tuple:
    """The row with its reference image's bytes in ``keys['_reference']``, or an error row.

    Producers leave ``_reference_ref`` (the reference column's value) and ``_name`` (the
    image's name, for the template) in the row's keys."""
    source_file, number, image, prompt, keys, error, kind = row
    keys = dict(keys)
    ref = keys.pop("_reference_ref", None)
    name = keys.pop("_name", None)
    if error is not None:
        return (source_file, number, image, prompt, keys, error, kind)
    if isinstance(ref, dict):  # Hugging Face Image feature
        ref = ref.get("bytes") or ref.get("path")
    if ref is None and read.reference_template is not None and name is not None:
        base = posixpath.basename(str(name))
        ref = read.reference_template.format(name=base, stem=posixpath.splitext(base)[0],
                                             key=keys.get("key", name))
    where = f"{source_file} row {number}"
    if ref is None or ref == "":
        return (source_file, number, image, prompt, keys,
                f"{where}: no reference image", "missing_reference")
    if isinstance(ref, str):
        try:
            ref = read_bytes(resolve_ref(shard.url, ref, read.image_root), storage)
        except Exception as exc:
            return (source_file, number, image, prompt, keys,
                    f"{where}: cannot read reference {ref}: {type(exc).__name__}: {exc}",
                    "read_reference")
    if not isinstance(ref, bytes | bytearray):
        return (source_file, number, image, prompt, keys,
                f"{where}: reference column holds {type(ref).__name__}, not bytes or a path",
                "bad_type")
    keys["_reference"] = bytes(ref)
    return (source_file, number, image, prompt, keys, None, None)


def _finish(columns: dict[str, list[Any]], shard: Shard, end: int, clock: list[float]
            ) -> dict[str, list[Any]]:
    count = len(columns["source_row"])
    now = time.perf_counter()
    columns["_shard"] = [shard.index] * count
    columns["_shard_end"] = [end] * count
    columns["_read_s"] = [(now - clock[0]) / count] * count
    clock[0] = now
    return columns


def read_table(url: str, storage: StorageConfig) -> pa.Table:
    """A whole CSV or Parquet table (labelled-data tables, source shards to copy rows from)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        return pa_csv.read_csv(handle) if path.endswith(".csv") else pq.read_table(handle)


def source_file_kind(source_file: str) -> Literal["table", "webdataset", "image"]:
    """What a score row's ``source_file`` names: a Parquet/CSV shard, a tar shard, or (folder
    inputs) the image file itself."""
    if source_file.endswith((".parquet", ".csv")):
        return "table"
    return "webdataset" if source_file.endswith(".tar") else "image"


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


def check_columns(columns: list[str], read: ReadConfig, where: str) -> None:
    """The columns the configuration names exist (ValueError naming them, else)."""
    if read.reference_column is not None and read.reference_column not in columns:
        raise ValueError(f"{where}: no reference column {read.reference_column!r}; columns: "
                         f"{', '.join(columns)}")
    missing = [k for k in read.key_columns or () if k not in columns]
    if missing:
        raise ValueError(f"{where}: no key column {', '.join(map(repr, missing))}; columns: "
                         f"{', '.join(columns)}")


def _table_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                key_columns: list[str], start: int = 0) -> Iterator[tuple]:
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


def column_roles(columns: list[str], read: ReadConfig, where: str
                    ) -> tuple[str | None, str | None, str | None]:
    image_col = _pick(columns, AUTO_IMAGE_COLUMNS, read.image_column, where, "image bytes",
                      required=False)
    path_col = None
    if image_col is None:
        path_col = _pick(columns, AUTO_PATH_COLUMNS, read.image_path_column, where,
                         "image bytes or image path")
    prompt_col = _pick(columns, AUTO_PROMPT_COLUMNS, read.prompt_column, where, "prompt",
                       required=read.prompt_column is not None)
    return image_col, path_col, prompt_col


def _table_row(shard: Shard, row: int, record: dict, image_col: str | None,
               path_col: str | None, prompt_col: str | None, key_columns: list[str],
               read: ReadConfig, storage: StorageConfig) -> tuple:
    keys = {k: record.get(k) for k in key_columns}
    if read.reference_column is not None:
        keys["_reference_ref"] = record.get(read.reference_column)
    if path_col is not None:
        keys["_name"] = record.get(path_col)
    prompt = record.get(prompt_col) if prompt_col else None
    prompt = prompt if isinstance(prompt, str) else None
    image, ref = None, None
    if image_col is not None:
        value = record.get(image_col)
        if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
            image, ref = value.get("bytes"), value.get("path")
        else:
            image = value
    else:
        ref = record.get(path_col)
    if image is None and ref:
        try:
            image = read_bytes(resolve_ref(shard.url, ref, read.image_root), storage)
        except Exception as exc:
            return (shard.url, row, None, prompt, keys,
                    f"{ref}: cannot read image: {type(exc).__name__}: {exc}", "read")
    if image is None:
        return (shard.url, row, None, prompt, keys, f"{shard.url} row {row}: no image",
                "missing_image")
    if not isinstance(image, bytes | bytearray):
        return (shard.url, row, None, prompt, keys,
                f"{shard.url} row {row}: image column holds {type(image).__name__}, not bytes",
                "bad_type")
    return (shard.url, row, bytes(image), prompt, keys, None, None)


def resolve_ref(shard_url: str, ref: str, root: str | None = None) -> str:
    """An image reference from a table as a URL: absolute as is, else relative to ``root``
    (default: the table's own folder)."""
    if "://" in ref or os.path.isabs(ref):
        return ref
    if root is not None:
        return _under(root, ref) if "://" in root else os.path.join(root, ref)
    if "://" in shard_url:
        return _under(shard_url.rsplit("/", 1)[0], ref)
    return os.path.join(os.path.dirname(shard_url), ref)


def _under(base_url: str, ref: str) -> str:
    """``ref`` joined to an object-store folder URL; '..' is resolved here because object
    stores take keys literally (``a/../b`` is a different key from ``b``)."""
    protocol, rest = base_url.split("://", 1)
    return f"{protocol}://" + posixpath.normpath(posixpath.join(rest.rstrip("/"), ref))


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    """A whole file, retried on storage errors (then :class:`StorageUnavailable`)."""
    fs, path = storage.filesystem(url)

    def read_all() -> bytes:
        with fs.open(path, "rb") as handle:
            return handle.read()

    return storage.retry(read_all, "read", url)


def iter_tar_samples(handle) -> Iterator[tuple[str, dict[str, bytes], list[tarfile.TarInfo]]]:
    """WebDataset samples of a tar stream in order: (key, {extension: bytes}, members).

    A sample is a run of consecutive files sharing a key (path up to the first dot of the
    name); the sample's index in this sequence is its ``source_row``.
    """
    current: str | None = None
    sample: dict[str, bytes] = {}
    members: list[tarfile.TarInfo] = []
    with tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = posixpath.split(member.name)
            if "." not in base:
                continue
            key = posixpath.join(directory, base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if key != current and current is not None:
                yield current, sample, members
                sample, members = {}, []
            current = key
            data = tar.extractfile(member)
            sample[ext] = data.read() if data is not None else b""
            members.append(member)
    if current is not None:
        yield current, sample, members


def _tar_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
              key_columns: list[str], start: int = 0) -> Iterator[tuple]:
    fs, path = storage.filesystem(shard.url)
    with fs.open(path, "rb") as handle:
        for row, (key, sample, _) in enumerate(iter_tar_samples(handle)):
            if row >= start:  # a tar is a stream: samples before a resume are read past
                yield _tar_sample(shard, row, key, sample, read, key_columns)


def _tar_sample(shard: Shard, row: int, key: str, sample: dict[str, bytes], read: ReadConfig,
                key_columns: list[str]) -> tuple:
    keys = {k: None for k in key_columns}
    if "key" in keys:
        keys["key"] = key
    keys["_name"] = key
    prompt = None
    if read.prompt_column and read.prompt_column in sample:
        prompt = sample[read.prompt_column].decode("utf-8", "replace")
    elif "txt" in sample:
        prompt = sample["txt"].decode("utf-8", "replace")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            for k in key_columns:
                if k != "key" and k in meta:
                    keys[k] = meta[k]
            if prompt is None:
                for name in ((read.prompt_column,) if read.prompt_column else ()) + \
                        AUTO_PROMPT_COLUMNS:
                    if isinstance(meta.get(name), str):
                        prompt = meta[name]
                        break
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in sample), None)
    if image_ext is None:
        return (shard.url, row, None, prompt, keys,
                f"{shard.url} sample {key}: no image member (.jpg/.png/.webp)", "missing_image")
    return (shard.url, row, sample[image_ext], prompt, keys, None, None)


def _folder_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                 key_columns: list[str], start: int = 0) -> Iterator[tuple]:
    names = list(shard.prompts or {})
    for row, (url, name) in enumerate(zip(shard.members or [], names, strict=True)):
        if row < start:
            continue
        keys = {k: None for k in key_columns}
        if "key" in keys:
            keys["key"] = name
        keys["_name"] = name
        prompt = (shard.prompts or {}).get(name)
        try:
            image = read_bytes(url, storage)
        except Exception as exc:
            yield (url, row, None, prompt, keys,
                   f"{url}: cannot read: {type(exc).__name__}: {exc}", "read")
            continue
        yield (url, row, image, prompt, keys, None, None)


def inspect_input(shards: list[Shard], read: ReadConfig, storage: StorageConfig,
                  warn=None) -> list[str]:
    """Check the input against the configuration on the driver, before anything starts, and
    return the key columns to pass through (configured, or the usual names present).

    The first table shard whose schema can be read must have every column the flags name
    (ValueError, one line, else); ``warn`` hears when no key column is found."""
    if not shards or shards[0].format not in TABLE_FORMATS:
        return list(read.key_columns) if read.key_columns is not None else ["key"]
    for shard in shards:
        fs, path = storage.filesystem(shard.url)
        try:
            columns = storage.retry(lambda fs=fs, path=path: table_columns(fs, path),
                                    "read the schema of", shard.url)
        except StorageUnavailable:
            raise
        except Exception:  # broken bytes: that shard's read decides and records it
            continue
        check_columns(columns, read, shard.url)
        column_roles(columns, read, shard.url)
        if read.key_columns is not None:
            return list(read.key_columns)
        keys = [c for c in AUTO_KEY_COLUMNS if c in columns]
        if not keys and warn is not None:
            warn(f"{shard.url}: no key column (looked for {', '.join(AUTO_KEY_COLUMNS)}; "
                 f"columns: {', '.join(columns)}): output rows are identified by source_file "
                 "+ source_row only; name id columns with --key-columns")
        return keys
    return list(read.key_columns or [])
