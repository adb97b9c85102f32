"""Re-scoring from the embedding cache: a new head over an already-embedded dataset costs only
the heads. Shards whose row index in the cache matches the input file (same fingerprint, same
towers) are scored from cached embeddings without reading a single image."""

from __future__ import annotations

import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iqray.pipeline import rows as R
from iqray.pipeline.io.embed_cache import EmbeddingCache, index_written_for
from iqray.pipeline.io.resume import read_output_metadata
from iqray.pipeline.io.shards import Shard
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.io.writer import ShardWriter
from iqray.pipeline.staging import ModelSpec
from iqray.pipeline.summary import RunSummary


def cached_shards(shards: list[Shard], cache_url: str, storage: StorageConfig,
                  spec: ModelSpec) -> list[Shard]:
    cache = EmbeddingCache(cache_url, storage)
    if cache.manifest is None or cache.manifest["tower_identity"] != spec.tower_identity:
        return []  # another model's towers: the images have to be read
    fs, root = storage.filesystem(cache.index_url())
    usable = []
    for shard in shards:
        meta = read_output_metadata(fs, posixpath.join(root, shard.output_name))
        if index_written_for(meta, shard.fingerprint, spec.tower_identity):
            usable.append(shard)
    return usable


def rescore_from_cache(shards: list[Shard], cache_url: str, storage: StorageConfig,
                       spec: ModelSpec, writer: ShardWriter, summary: RunSummary) -> None:
    cache = EmbeddingCache(cache_url, storage)
    fs, root = storage.filesystem(cache.index_url())
    model = spec.load("cpu")
    started = time.perf_counter()
    for shard in shards:
        with fs.open(posixpath.join(root, shard.output_name), "rb") as handle:
            index = pq.read_table(handle)
        ok = pc.equal(index["status"], "ok").to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(ok)
        config = spec.config
        outputs = {name: np.full(index.num_rows, np.nan, np.float32)
                   for name in config.output_names}
        truncated = np.zeros(index.num_rows, bool)
        if rows.size:
            take = pa.array(rows)
            shas = index["image_sha256"].take(take).to_pylist()
            prompts = index["prompt"].take(take).to_pylist()
            if config.prompt_aware:
                model.prime_prompt_cache(cache.load_prompts({p for p in prompts if p}))
            scores = model.score_embeddings(*cache.load_images(shas), prompts)
            for name, column in outputs.items():
                column[rows] = scores[name]
            if config.prompt_aware:
                truncated[rows] = scores["prompt_truncated"]
        table = index
        for name, column in outputs.items():
            table = table.append_column(name, pa.array(column))
        if config.prompt_aware:
            table = table.append_column("prompt_truncated", pa.array(truncated))
        table = table \
            .append_column(R.SHARD, pa.array([shard.index] * index.num_rows, pa.int64())) \
            .append_column(R.SHARD_END, pa.array([index.num_rows] * index.num_rows, pa.int64()))
        writer.add(table)
    summary.stage_busy_s["heads (from cache)"] = round(time.perf_counter() - started, 3)
