"""`iqray embed INPUT --cache DIR`: run the frozen towers once per image, keep the outputs.

Same readers, decode stage and actor pool as `iqray score`; the model stage is
:class:`Embedder` and the sink writes image embeddings into the cache (keyed by the image
bytes' sha256) plus a per-shard index (keys, source row, prompt, sha256). Prompt token
features are computed once per distinct prompt on the driver. Reruns skip committed shards;
images already in the cache are not embedded again, wherever they came from.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field

from iqray.model.checkpoint import iqray_version
from iqray.pipeline.embed_cache import EmbeddingCache, index_written_for
from iqray.pipeline.execution import RunConfig, RunSummary, ensure_ray, execute, warn_to
from iqray.pipeline.readers import Shard, discover_shards, inspect_input
from iqray.pipeline.scoring import ModelSpec, ModelStage, split_on_oom, stage_model
from iqray.pipeline.storage import check_separate
from iqray.pipeline.writer import ShardWriter, plan_resume, read_output_metadata

INDEX_COLUMNS = {
    "source_file": pa.string(),
    "source_row": pa.int64(),
    "prompt": pa.string(),
    "image_sha256": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
}
PROMPT_CHUNK = 256


class EmbedConfig(RunConfig):
    """`iqray embed`: cache the frozen towers' embeddings of every image in INPUT."""

    cache: str = Field(description="embedding cache directory URL (created if missing)")
    dtype: Literal["float16", "float32"] = Field(
        default="float16", description="storage precision of cached embeddings")

    def index_hash(self, tower_identity: str) -> str:
        return self.options_hash(tower_identity, {"image_root", "dtype"})


class Embedder(ModelStage):
    """Coarse and fine tower embeddings for every decodable image not already cached."""

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int | None = None,
                 prompt_cache_size: int = 4096, known: list | None = None,
                 dtype: str = "float16", precision: str = "fp32", compile: bool = False):
        # A cache is shared by every later run of the same towers: fp32 towers only
        # (compiled towers are fp32 too).
        super().__init__(spec, device, threads, prompt_cache_size, compile=compile)
        import ray

        self.known: set[str] = ray.get(known[0]) if known else set()
        self.dtype = np.dtype(dtype)

    def _embed(self, pixels: torch.Tensor, prompts: list) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            normalised = self.model.transform.normalize(pixels.to(self.model.device))
            coarse, fine = self.model.encode_images(normalised)
        return {"coarse": coarse.cpu().numpy(), "fine": fine.cpu().numpy()}

    def process(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> None:
        count, dim = len(ok), self.model.config.heads.embed_dim
        coarse = np.zeros((count, dim), self.dtype)
        fine = np.zeros((count, dim), self.dtype)
        error = np.zeros(count, np.float32)
        todo = np.array([bool(ok[i]) and batch["image_sha256"][i] not in self.known
                         for i in range(count)], dtype=bool)
        index = np.flatnonzero(todo)
        if index.size:
            out = split_on_oom(self._embed, self.pixels(batch, index), [None] * index.size)
            for name, target in (("coarse", coarse), ("fine", fine)):
                exact = out[name]
                target[index] = exact.astype(self.dtype)
                # Storage error on the unit sphere, which is what the heads consume.
                unit = exact / np.linalg.norm(exact, axis=1, keepdims=True)
                stored = target[index].astype(np.float32)
                stored /= np.linalg.norm(stored, axis=1, keepdims=True)
                error[index] = np.maximum(error[index], np.abs(unit - stored).max(axis=1))
        batch["_coarse"] = coarse
        batch["_fine"] = fine
        batch["_embedded"] = todo
        batch["_embed_error"] = error


class EmbedSink:
    """Embeddings into cache parts, row index into per-shard files (after the parts)."""

    def __init__(self, cache: EmbeddingCache, writer: ShardWriter, dim: int):
        self.cache, self.writer, self.dim = cache, writer, dim
        self.added: set[str] = set()
        self.max_error = 0.0
        self.embedded = 0

    def add(self, table: pa.Table) -> None:
        fresh = table.filter(table["_embedded"])
        if fresh.num_rows:
            shas = fresh["image_sha256"].to_pylist()
            keep = [i for i, sha in enumerate(shas) if sha not in self.added]
            # The same image twice in one run: both rows were embedded, one is stored.
            fresh = fresh.take(pa.array(keep, pa.int64()))
            shas = [shas[i] for i in keep]
            self.added.update(shas)
            self.embedded += len(shas)
            self.cache.add_images(shas, _vectors(fresh["_coarse"], self.dim),
                                  _vectors(fresh["_fine"], self.dim))
            self.max_error = max(self.max_error, pc.max(fresh["_embed_error"]).as_py() or 0.0)
        self.writer.add(table)

    def finish(self) -> None:
        self.writer.finish()
        self.cache.flush()

    def tally(self):
        return self.writer.tally()


def _vectors(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    array = column.combine_chunks()
    if isinstance(array.type, pa.FixedShapeTensorType) or hasattr(array, "to_numpy_ndarray"):
        return array.to_numpy_ndarray()
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False)).reshape(len(array), dim)


def embed_prompts(cache: EmbeddingCache, spec: ModelSpec, prompts: set[str]) -> int:
    """Token features of every prompt not yet cached, on the driver (text tower only)."""
    missing = sorted(prompts - cache.prompt_keys())
    if not missing:
        return 0
    model = spec.load("cpu")
    for start in range(0, len(missing), PROMPT_CHUNK):
        chunk = missing[start : start + PROMPT_CHUNK]
        features = model.prompt_features(chunk)
        cache.add_prompts({p: (t.cpu().numpy(), v.cpu().numpy(), cut)
                           for p, (t, v, cut) in features.items()})
        model.clear_prompt_cache()
    return len(missing)


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


def run_embed(config: EmbedConfig, log=print) -> RunSummary:
    started = time.perf_counter()
    read, storage = config.read_config(), config.storage_config()
    check_separate(config.input, config.cache, "cache")
    shards = discover_shards(config.input, read, storage, exclude=config.cache,
                             warn=warn_to(log))
    key_columns = inspect_input(shards, read, storage, warn=warn_to(log))
    spec = stage_model(config.model, storage)
    if config.precision != "fp32":
        raise ValueError("an embedding cache is shared by every later run of its towers, so "
                         "it is written with fp32 towers only (drop --precision)")
    if spec.config.architecture != "mst-clipiqa":
        raise ValueError(f"iqray embed caches MST-CLIPIQA tower embeddings; "
                         f"{spec.config.architecture} has none to cache (its training keeps "
                         "frozen level features in memory)")
    cache = EmbeddingCache(config.cache, storage)
    dim = spec.config.heads.embed_dim
    cache.bind(spec.tower_identity, spec.towers, dim, config.dtype)
    index_hash = config.index_hash(spec.tower_identity)
    todo, done, _ = plan_resume(shards, cache.index_url(), storage, index_hash, False)
    summary = RunSummary(shards_total=len(shards), shards_skipped=len(done))
    ray = ensure_ray(config) if todo else None
    if ray is not None:
        spec.put_files(ray.put)
    known = cache.image_keys()
    metadata: dict[str, Any] = {"model": spec.name, "tower_identity": spec.tower_identity,
                                "iqray_version": iqray_version(), "scoring_hash": index_hash,
                                "input": config.input, "key_columns": key_columns}
    writer = ShardWriter(todo, cache.index_url(), storage, metadata, complete=True,
                         key_columns=key_columns, keep_prompt=True, keep_image_bytes=False,
                         schema=INDEX_COLUMNS, before_commit=cache.flush)
    sink = EmbedSink(cache, writer, dim)
    log(f"iqray embed: {len(shards)} shards in {config.input}; {len(done)} already indexed, "
        f"{len(todo)} to embed; cache {config.cache} holds {len(known)} images")
    if todo:
        execute(config, ray, spec, Embedder, todo, key_columns, sink, summary,
                stage_kwargs={"known": [ray.put(known)], "dtype": config.dtype})
    summary.shards_scored = len(todo)
    summary.account(writer)
    summary.outputs = sorted(writer.committed)  # commit order depends on timing
    index = index_table(cache, [s.output_name for s in shards])
    prompts = {p for p in index["prompt"].to_pylist() if p}
    new_prompts = embed_prompts(cache, spec, prompts)
    cache.record_error(sink.max_error)
    summary.wall_s = time.perf_counter() - started
    summary.extra = {"images_embedded": sink.embedded,
                     "images_reused": summary.ok - sink.embedded,
                     "prompts_embedded": new_prompts,
                     "fp16_max_abs_error": round(sink.max_error, 6)}
    log(summary.render())
    log(f"embedded {sink.embedded} new images ({summary.ok - sink.embedded} already cached), "
        f"{new_prompts} new prompts; max storage error on unit vectors {sink.max_error:.2e}")
    return summary
