"""WebDataset tar shards, as img2dataset writes them: a sample is a run of files sharing a key
(``<key>.jpg|png|webp`` + ``<key>.txt`` and/or ``<key>.json``), read as a stream."""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator

from iqray.pipeline.io.shards import (
    AUTO_PROMPT_COLUMNS,
    WDS_IMAGE_EXTENSIONS,
    ReadConfig,
    Shard,
    SourceRow,
)
from iqray.pipeline.io.storage import StorageConfig


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


def tar_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
              key_columns: list[str], start: int = 0) -> Iterator[SourceRow]:
    fs, path = storage.filesystem(shard.url)
    with fs.open(path, "rb") as handle:
        for row, (key, sample, _) in enumerate(iter_tar_samples(handle)):
            if row >= start:  # a tar is a stream: samples before a resume are read past
                yield _tar_sample(shard, row, key, sample, read, key_columns)


def _tar_sample(shard: Shard, row: int, key: str, sample: dict[str, bytes], read: ReadConfig,
                key_columns: list[str]) -> SourceRow:
    keys = {k: None for k in key_columns}
    if "key" in keys:
        keys["key"] = key
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
        return SourceRow(shard.url, row, None, prompt, keys,
                         f"{shard.url} sample {key}: no image member (.jpg/.png/.webp)",
                         "missing_image", name=key)
    return SourceRow(shard.url, row, sample[image_ext], prompt, keys, name=key)
