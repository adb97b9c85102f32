"""`iqray embed INPUT --cache DIR`: run the frozen towers once per image, keep the outputs.

Same readers, decode stage and actor pool as `iqray score`; the model stage is
:class:`~iqray.pipeline.embed.Embedder` and the sink writes image embeddings into the cache
(keyed by the image bytes' sha256) plus a per-shard index. Reruns skip committed shards;
images already in the cache are not embedded again, wherever they came from.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from iqray.jobs.console import log
from iqray.model.registry import architecture
from iqray.model.version import iqray_version
from iqray.pipeline.embed import Embedder, EmbedSink, embed_prompts
from iqray.pipeline.execution import execute
from iqray.pipeline.io.discovery import discover_shards, inspect_input
from iqray.pipeline.io.embed_cache import INDEX_COLUMNS, EmbeddingCache, index_table
from iqray.pipeline.io.resume import plan_resume
from iqray.pipeline.io.shards import InputColumns
from iqray.pipeline.io.storage import StorageConfig, check_separate
from iqray.pipeline.io.writer import ShardWriter
from iqray.pipeline.local import choose_executor
from iqray.pipeline.options import (
    ClusterOptions,
    InputURL,
    ModelChoice,
    OptionGroup,
    PipelineJob,
    RunOptions,
    StageConfig,
)
from iqray.pipeline.runtime import ensure_ray
from iqray.pipeline.staging import stage_model
from iqray.pipeline.summary import RunSummary, warn_to


class CacheOptions(OptionGroup):
    group_title: ClassVar[str] = "output"

    cache: str = Field(default="cache/embeddings", description="embedding cache directory "
                       "URL (created if missing)")
    dtype: Literal["float16", "float32"] = Field(
        default="float16", description="storage precision of cached embeddings")


class EmbedConfig(PipelineJob, InputURL, InputColumns, CacheOptions, ModelChoice, StageConfig,
                  ClusterOptions, StorageConfig, RunOptions):
    """`iqray embed`: cache the frozen towers' embeddings of every image in INPUT."""

    cache: str = Field(description="embedding cache directory URL (created if missing)")

    def index_hash(self, tower_identity: str) -> str:
        return self.options_hash(tower_identity, {"image_root", "dtype"})


def run_embed(config: EmbedConfig, log=log) -> RunSummary:
    started = time.perf_counter()
    read, storage = config.read_config(), config.storage_config()
    check_separate(config.input, config.cache, "cache")
    storage.check_output(config.cache, "cache")
    shards = discover_shards(config.input, read, storage, exclude=config.cache,
                             warn=warn_to(log))
    key_columns = inspect_input(shards, read, storage, warn=warn_to(log))
    spec = stage_model(config.model, storage)
    architecture(spec.config).require("embedding_cache", "iqray embed (an embedding cache)")
    if config.decode == "fast":
        raise ValueError("an embedding cache is shared by every later run of its towers, so it "
                         "is written from fully decoded images (drop --decode fast)")
    cache = EmbeddingCache(config.cache, storage)
    dim = spec.config.embedding_dim
    cache.bind(spec.tower_identity, spec.towers, dim, config.dtype, spec.config.tower_roles)
    index_hash = config.index_hash(spec.tower_identity)
    todo, done, _ = plan_resume(shards, cache.index_url(), storage, index_hash, False)
    summary = RunSummary(shards_total=len(shards), shards_skipped=len(done))
    ray = ensure_ray(config) if todo and choose_executor(config, todo) == "ray" else None
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
                stage_kwargs={"known": [ray.put(known) if ray is not None else known],
                              "dtype": config.dtype})
    summary.shards_scored = len(todo)
    summary.account(writer)
    summary.outputs = sorted(writer.committed)  # commit order depends on timing
    new_prompts = 0
    if spec.config.prompt_aware:  # prompt token features, for models whose heads read them
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
