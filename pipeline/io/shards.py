"""What an input is: the reading options, the shard (the unit of work, retry and resume),
and how a table's columns are told apart. Shared by every reader; imports no Ray, no torch.

Three input layouts, any fsspec URL, a single file, a directory or a glob:

* Parquet or CSV with an image-bytes column (img2dataset ``jpg``, HF ``image`` struct with
  ``bytes``/``path``, ...) or an image path/URL column, a prompt column and key columns
  (:mod:`.tables`);
* WebDataset tar shards (``<key>.jpg|png|webp`` + ``<key>.txt|json``), as img2dataset writes
  (:mod:`.webdataset`);
* a folder of images, with prompts from a CSV/JSONL sidecar or none (quality only); the
  folder is cut into chunks of ``folder_chunk_size`` images, each chunk a shard
  (:mod:`.folder`).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from iqray.pipeline.io.storage import ROW_READ_FAILURES, StorageConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUTO_IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "image_bytes", "img", "bytes")
AUTO_PATH_COLUMNS = ("image_path", "path", "file_name", "filename", "file", "url", "image_url")
AUTO_PROMPT_COLUMNS = ("prompt", "caption", "text", "txt")
AUTO_KEY_COLUMNS = ("key", "id", "uid", "__key__")
AUTO_SIDECARS = ("prompts.csv", "metadata.csv", "captions.csv", "metadata.jsonl",
                 "prompts.jsonl", "captions.jsonl")


InputFormat = Literal["auto", "parquet", "csv", "webdataset", "folder"]
TABLE_FORMATS = ("parquet", "csv")


class InputColumns(BaseModel):
    """What to read and which columns mean what (None = detect the usual names)."""

    model_config = ConfigDict(extra="forbid")
    group_title: ClassVar[str] = "input"

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


class Sampling(BaseModel):
    """A deterministic fraction of the rows (previews)."""

    model_config = ConfigDict(extra="forbid")
    group_title: ClassVar[str] = "preview"

    sample: float | None = Field(default=None, gt=0, le=1,
                                 description="keep this fraction of rows (deterministic)")
    seed: int = Field(default=0, description="seed of --sample")


class ReadConfig(InputColumns, Sampling):
    """Everything a reader takes: the columns and, for previews, the sampling."""


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

    # How a shard travels to the read tasks: one typed row each (a folder chunk's prompts as
    # two lists, since Arrow has no dict of arbitrary keys).
    ARROW_SCHEMA: ClassVar[pa.Schema] = pa.schema([
        ("index", pa.int64()), ("url", pa.string()), ("format", pa.string()),
        ("output_name", pa.string()), ("fingerprint", pa.string()),
        ("members", pa.list_(pa.string())), ("names", pa.list_(pa.string())),
        ("prompts", pa.list_(pa.string())), ("only_rows", pa.list_(pa.int64())),
        ("estimated_rows", pa.int64())])

    def record(self) -> dict[str, Any]:
        record = {name: getattr(self, name) for name in self.ARROW_SCHEMA.names
                  if name not in ("names", "prompts")}
        record["names"] = None if self.prompts is None else list(self.prompts)
        record["prompts"] = None if self.prompts is None else list(self.prompts.values())
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Shard:
        record = dict(record)
        names, prompts = record.pop("names"), record.pop("prompts")
        return cls(**record, prompts=None if names is None else
                   dict(zip(names, prompts, strict=True)))


@dataclass(slots=True)
class SourceRow:
    """One row as a format's reader produces it, before it joins a batch (see
    :class:`iqray.pipeline.io.read.RowBuffer`): encoded bytes, never decoded.

    ``reference_ref`` (the reference column's value: bytes, a path or a Hugging Face
    ``Image`` struct) and ``name`` (the image's name, for ``--reference-template``) are for
    full-reference reads; ``reference`` is the reference's bytes once read."""

    source_file: str
    row: int
    image: bytes | None
    prompt: str | None
    keys: dict[str, Any]  # the user's --key-column values, nothing else
    error: str | None = None
    error_kind: str | None = None
    reference_ref: Any = None
    name: str | None = None
    reference: bytes | None = None

    def failed(self, error: str, kind: str) -> SourceRow:
        """This row as an error row (no bytes travel on)."""
        return SourceRow(self.source_file, self.row, self.image, self.prompt, self.keys,
                         error, kind, name=self.name)


def pick_column(columns: list[str], candidates: tuple[str, ...], explicit: str | None, where: str,
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


class ShardSchemaError(ValueError):
    """A shard lacks a configured column: a configuration mistake, not broken bytes."""


def check_columns(columns: list[str], read: ReadConfig, where: str) -> None:
    """The columns the configuration names exist (ValueError naming them, else)."""
    if read.reference_column is not None and read.reference_column not in columns:
        raise ValueError(f"{where}: no reference column {read.reference_column!r}; columns: "
                         f"{', '.join(columns)}")
    missing = [k for k in read.key_columns or () if k not in columns]
    if missing:
        raise ValueError(f"{where}: no key column {', '.join(map(repr, missing))}; columns: "
                         f"{', '.join(columns)}")


def column_roles(columns: list[str], read: ReadConfig, where: str
                    ) -> tuple[str | None, str | None, str | None]:
    image_col = pick_column(columns, AUTO_IMAGE_COLUMNS, read.image_column, where, "image bytes",
                      required=False)
    path_col = None
    if image_col is None:
        path_col = pick_column(columns, AUTO_PATH_COLUMNS, read.image_path_column, where,
                         "image bytes or image path")
    prompt_col = pick_column(columns, AUTO_PROMPT_COLUMNS, read.prompt_column, where, "prompt",
                       required=read.prompt_column is not None)
    return image_col, path_col, prompt_col


def reference_path(template: str, image_name: str, key: Any) -> str:
    """The reference path ``--reference-template`` gives an image: ``{name}`` its file name,
    ``{stem}`` without the extension, ``{key}`` its key."""
    base = posixpath.basename(str(image_name))
    return template.format(name=base, stem=posixpath.splitext(base)[0], key=key)


def wants_references(read: ReadConfig) -> bool:
    return read.reference_column is not None or read.reference_template is not None


def source_file_kind(source_file: str) -> Literal["table", "webdataset", "image"]:
    """What a score row's ``source_file`` names: a Parquet/CSV shard, a tar shard, or (folder
    inputs) the image file itself."""
    if source_file.endswith((".parquet", ".csv")):
        return "table"
    return "webdataset" if source_file.endswith(".tar") else "image"


def image_cell(value: Any, where: str, read_path: Callable[[str], bytes], paths: bool
               ) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, error, error kind) of one image cell: bytes as they are; a Hugging Face
    ``Image`` struct's bytes, else its path, read with ``read_path``; with ``paths`` a string
    is a path/URL to read. Exactly one of bytes and error is None."""
    ref = None
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value, ref = value.get("bytes"), value.get("path")
    elif paths and isinstance(value, str):
        value, ref = None, value
    if value is None and ref:
        try:
            return read_path(ref), None, None
        except ROW_READ_FAILURES as exc:
            return None, f"{ref}: cannot read image: {type(exc).__name__}: {exc}", "read"
    if value is None or (isinstance(value, float) and value != value):  # NaN: Ray's None
        return None, f"{where}: no image", "missing_image"
    if not isinstance(value, bytes | bytearray):
        return None, f"{where}: image column holds {type(value).__name__}, not bytes", \
            "bad_type"
    return bytes(value), None, None


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
