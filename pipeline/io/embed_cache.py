"""The embedding cache: frozen-tower outputs stored once, reused by training, eval, re-scoring.

Layout under the cache URL (local or object storage)::

    manifest.json                 format, tower identity + names/tags, roles, dtype, fp16 error
    images/part-<uuid>.parquet    image_sha256, one [D] column per tower role (MST-CLIPIQA:
                                  coarse, fine), per image, by content
    prompts/part-<uuid>.parquet   prompt, length, truncated, pooled[D], tokens[length*D]
    index/<shard>.parquet         per input shard: keys, source_file/row, prompt, image_sha256

Images are keyed by the sha256 of their encoded bytes, so the same picture in two datasets is
embedded once. Parts are written atomically and never modified; a part is the unit of
crash-safety. A cache records the towers that made it and refuses to mix towers.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iqray.pipeline.io.resume import read_output_metadata
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import StorageConfig, write_atomic

FORMAT = "iqray-embedding-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LEGACY_ROLES = ("coarse", "fine")  # caches from before the manifest named its roles


def index_written_for(meta: dict[str, Any] | None, fingerprint: str, tower_identity: str) -> bool:
    """Whether a shard's index file (its writer metadata) is complete and was written for
    this very input file (fingerprint) by these towers; index files are named after the
    input file, so a same-named input can have replaced it."""
    return bool(meta and meta.get("complete") and meta.get("input_fingerprint") == fingerprint
                and meta.get("tower_identity") == tower_identity)


class EmbeddingCacheMismatch(ValueError):
    """The cache was made by other towers than the model at hand."""


def _vector_column(values: np.ndarray, dtype: str) -> pa.Array:
    values = np.ascontiguousarray(values.astype(dtype))
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def _matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, dim), np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


def _prefixes(keys: list[str]) -> np.ndarray:
    """A 64-bit hash of each key, as sortable integers (lookups confirm the full key)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(),
                                       "big") for k in keys), dtype=np.uint64, count=len(keys))


class EmbeddingCache:
    def __init__(self, url: str, storage: StorageConfig | None = None):
        self.url = url.rstrip("/")
        self.storage = storage or StorageConfig()
        self.fs, self.root = self.storage.filesystem(self.url)
        self.root = self.root.rstrip("/")
        self._pending: list[tuple[list[str], tuple[np.ndarray, ...]]] = []
        self._manifest: dict[str, Any] | None = None

    # -- manifest -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def manifest(self) -> dict[str, Any] | None:
        if self._manifest is None and self.fs.exists(self._path(MANIFEST)):
            self._manifest = json.loads(self.fs.cat_file(self._path(MANIFEST)))
        return self._manifest

    def bind(self, tower_identity: str, towers: dict[str, Any], embed_dim: int,
             dtype: str, roles: tuple[str, ...] = LEGACY_ROLES) -> None:
        """Create the manifest, or check that an existing cache holds these towers' output
        (``roles``: one embedding per image and role, in the model's order)."""
        existing = self.manifest
        if existing is not None:
            if existing.get("format") != FORMAT:
                raise EmbeddingCacheMismatch(f"{self.url}: not an iqray embedding cache")
            if existing["tower_identity"] != tower_identity:
                raise EmbeddingCacheMismatch(
                    f"{self.url} holds embeddings of other towers ({existing['towers']}); this "
                    f"model's towers are {towers}. Mixing them would corrupt training and "
                    "scores: give this model its own cache directory (--cache DIR).")
            return
        self._manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                          "tower_identity": tower_identity, "towers": towers,
                          "embed_dim": embed_dim, "dtype": dtype, "fp16_max_abs_error": 0.0,
                          "roles": list(roles)}
        self._write_manifest()

    def record_error(self, max_abs_error: float) -> None:
        manifest = self.manifest
        if manifest is not None and max_abs_error > manifest.get("fp16_max_abs_error", 0.0):
            manifest["fp16_max_abs_error"] = float(max_abs_error)
            self._write_manifest()

    def _write_manifest(self) -> None:
        body = json.dumps(self._manifest, indent=2, sort_keys=True).encode()
        write_atomic(self.fs, self._path(MANIFEST), body)

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("roles", LEGACY_ROLES))

    # -- images ---------------------------------------------------------------------------
    def _parts(self, folder: str) -> list[str]:
        path = self._path(folder)
        if not self.fs.exists(path):
            return []
        return sorted(p for p in self.fs.ls(path, detail=False)
                      if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def image_keys(self) -> set[str]:
        keys: set[str] = set()
        for part in self._parts("images"):
            keys.update(self._read(part, ["image_sha256"])["image_sha256"].to_pylist())
        return keys

    def add_images(self, shas: list[str], *vectors: np.ndarray) -> None:
        """Buffer embeddings of ``shas``: one (n, D) array per role, in :attr:`roles` order."""
        if len(vectors) != len(self.roles):
            raise ValueError(f"{len(vectors)} embeddings per image; the cache holds "
                             f"{len(self.roles)} ({', '.join(self.roles)})")
        if shas:
            self._pending.append((list(shas), vectors))

    def flush(self) -> None:
        """Write buffered image embeddings as one new part (atomic)."""
        if not self._pending:
            return
        shas = [s for batch in self._pending for s in batch[0]]
        columns = {"image_sha256": pa.array(shas, pa.string())}
        for number, role in enumerate(self.roles):
            columns[role] = _vector_column(
                np.concatenate([vectors[number] for _, vectors in self._pending]), self.dtype)
        self._pending = []
        self._write_part("images", pa.table(columns))

    def _write_part(self, folder: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        write_atomic(self.fs, self._path(folder, f"part-{uuid.uuid4().hex}.parquet"),
                     buffer.getvalue())

    def _key_index(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(part paths, sorted 64-bit key prefixes, their part numbers, their rows).

        Built once from the key columns alone and kept: 20 bytes per cached image (20 MB
        for a million), where a hash table of the hex strings would take hundreds, and a
        lookup is a binary search that reads only the parts holding the wanted rows."""
        parts = self._parts("images")
        cached = getattr(self, "_index_cache", None)
        if cached is not None and cached[0] == parts:
            return cached
        keys, part_numbers, rows = [], [], []
        for number, part in enumerate(parts):
            shas = self._read(part, ["image_sha256"])["image_sha256"].to_pylist()
            keys.append(_prefixes(shas))
            part_numbers.append(np.full(len(shas), number, np.int32))
            rows.append(np.arange(len(shas), dtype=np.int64))
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        order = np.argsort(keys_all, kind="stable")  # stable: the first copy of a key wins
        self._index_cache = (parts, keys_all[order],
                             np.concatenate(part_numbers)[order] if keys else
                             np.zeros(0, np.int32),
                             np.concatenate(rows)[order] if keys else np.zeros(0, np.int64))
        return self._index_cache

    def load_images(self, shas: list[str]) -> tuple[np.ndarray, ...]:
        """float32 embeddings for ``shas`` in that order, one (n, D) array per role
        (MST-CLIPIQA: coarse, fine)."""
        parts, keys, part_numbers, rows = self._key_index()
        vectors = tuple(np.empty((len(shas), self.dim), np.float32) for _ in self.roles)
        found = np.zeros(len(shas), bool)
        if len(keys):
            wanted = _prefixes(shas)
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            hit = keys[at] == wanted
            part_of = np.where(hit, part_numbers[at], -1)
            row_of = rows[at]
            for number in np.unique(part_of[hit]):
                mine = np.flatnonzero(part_of == number)
                table = self._read(parts[int(number)]).take(pa.array(row_of[mine]))
                # The prefix found the row; the full key confirms it.
                same = np.array(table["image_sha256"].to_pylist(), dtype=object) == \
                    np.array([shas[i] for i in mine], dtype=object)
                mine, table = mine[same], table.filter(pa.array(same))
                for role, target in zip(self.roles, vectors, strict=True):
                    target[mine] = _matrix(table[role], self.dim)
                found[mine] = True
        if not found.all():
            missing = [shas[i] for i in np.flatnonzero(~found)]
            raise KeyError(f"{len(missing)} images are not in the cache {self.url} "
                           f"(first: {missing[0]}); run `iqray embed` on them")
        return vectors

    # -- prompts --------------------------------------------------------------------------
    def prompt_keys(self) -> set[str]:
        keys: set[str] = set()
        for part in self._parts("prompts"):
            keys.update(self._read(part, ["prompt"])["prompt"].to_pylist())
        return keys

    def add_prompts(self, features: dict[str, tuple[np.ndarray, np.ndarray, bool]]) -> None:
        """``features``: prompt -> (tokens (L, D), pooled (D,), truncated)."""
        if not features:
            return
        prompts = list(features)
        dtype = self.dtype
        tokens = pa.array([features[p][0].astype(dtype).reshape(-1) for p in prompts])
        table = pa.table({
            "prompt": pa.array(prompts, pa.string()),
            "length": pa.array([features[p][0].shape[0] for p in prompts], pa.int32()),
            "truncated": pa.array([bool(features[p][2]) for p in prompts]),
            "pooled": _vector_column(np.stack([features[p][1] for p in prompts]), dtype),
            "tokens": tokens,
        })
        self._write_part("prompts", table)

    def load_prompts(self, prompts: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
        out: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        for part in self._parts("prompts"):
            table = self._read(part)
            for i, prompt in enumerate(table["prompt"].to_pylist()):
                if prompt in prompts and prompt not in out:
                    length = table["length"][i].as_py()
                    tokens = np.asarray(table["tokens"][i].values.to_numpy(zero_copy_only=False),
                                        np.float32).reshape(length, self.dim)
                    pooled = np.asarray(table["pooled"][i].values.to_numpy(
                        zero_copy_only=False), np.float32)
                    out[prompt] = (tokens, pooled, bool(table["truncated"][i].as_py()))
        missing = prompts - set(out)
        if missing:
            raise KeyError(f"{len(missing)} prompts are not in the cache {self.url}")
        return out

    def index_url(self) -> str:
        return self.url + "/index"


INDEX_COLUMNS = {
    "source_file": pa.string(),
    "source_row": pa.int64(),
    "prompt": pa.string(),
    "image_sha256": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}


def index_table(cache: EmbeddingCache, output_names: list[str] | None = None) -> pa.Table:
    """The per-shard row index of the cache (all shards, or the named ones)."""
    fs, root = cache.storage.filesystem(cache.index_url())
    if not fs.exists(root):
        return pa.table({k: pa.array([], t) for k, t in INDEX_COLUMNS.items()})
    paths = sorted(p for p in fs.find(root) if p.endswith(".parquet")
                   and not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    if output_names is not None:
        wanted = {root.rstrip("/") + "/" + n for n in output_names}
        paths = [p for p in paths if p in wanted]
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables, promote_options="permissive") if tables else \
        pa.table({k: pa.array([], t) for k, t in INDEX_COLUMNS.items()})


def shard_index(cache: EmbeddingCache, shard: Shard) -> pa.Table:
    """One input shard's row index, checked to be this shard's: index files are named after
    the input file, so another input of the same name embedded into the same cache (two
    datasets' train.csv, or a concurrent run) replaces it, and its source rows would then
    point into the wrong table."""
    fs, root = cache.storage.filesystem(cache.index_url())
    path = posixpath.join(root, shard.output_name)
    meta = read_output_metadata(fs, path)
    if meta is None or not meta.get("complete"):
        raise ValueError(f"{shard.url}: the cache {cache.url} holds no complete index for it "
                         "(run iqray embed first)")
    if not index_written_for(meta, shard.fingerprint,
                             (cache.manifest or {}).get("tower_identity")):
        raise ValueError(f"{shard.url}: the cache's index {shard.output_name} was written for "
                         f"another file of that name ({meta.get('input')}, or an older version "
                         "of this one); embed into a separate --cache, or rerun to re-index")
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)
