"""Folders of image files: cut into shards of ``--folder-chunk-size`` images, prompts from a
CSV/JSONL sidecar (named, or one of the usual names beside the images) or none."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterator

from iqray.pipeline.io.shards import (
    AUTO_PROMPT_COLUMNS,
    AUTO_SIDECARS,
    IMAGE_EXTENSIONS,
    ReadConfig,
    Shard,
    SourceRow,
    pick_column,
    read_bytes,
)
from iqray.pipeline.io.storage import ROW_READ_FAILURES, StorageConfig, fingerprint, to_url


def folder_shards(fs, paths: list[str], base: str, input_url: str, infos: dict,
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
    name_col = pick_column(columns, ("name", "file_name", "filename", "file", "image", "path"),
                     None, f"sidecar {side_path}", "image name")
    prompt_col = pick_column(columns, AUTO_PROMPT_COLUMNS, read.prompt_column,
                       f"sidecar {side_path}", "prompt")
    return side_url, {str(r[name_col]): (r.get(prompt_col) or None) for r in records}


def folder_rows(shard: Shard, read: ReadConfig, storage: StorageConfig,
                 key_columns: list[str], start: int = 0) -> Iterator[SourceRow]:
    names = list(shard.prompts or {})
    for row, (url, name) in enumerate(zip(shard.members or [], names, strict=True)):
        if row < start:
            continue
        keys = {k: None for k in key_columns}
        if "key" in keys:
            keys["key"] = name
        prompt = (shard.prompts or {}).get(name)
        try:
            image = read_bytes(url, storage)
        except ROW_READ_FAILURES as exc:
            yield SourceRow(url, row, None, prompt, keys,
                            f"{url}: cannot read: {type(exc).__name__}: {exc}", "read",
                            name=name)
            continue
        yield SourceRow(url, row, image, prompt, keys, name=name)
