"""Embedding and re-scoring from the cache, stage by stage in this process (no Ray cluster):
read -> decode -> Embedder -> EmbedSink, then rescore_from_cache, against model.score."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, write_parquet

from iqray.pipeline import rows as R
from iqray.pipeline.decode import decode_batch
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.embed_cache import INDEX_COLUMNS, EmbeddingCache, index_table
from iqray.pipeline.io.read import read_shard
from iqray.pipeline.io.shards import ReadConfig
from iqray.pipeline.io.storage import StorageConfig
from iqray.pipeline.io.writer import ShardWriter, score_schema
from iqray.pipeline.summary import RunSummary

STORAGE = StorageConfig()


def test_rescoring_from_the_cache_gives_the_scores_of_the_images(tmp_path, sample,
                                                                 reference_model):
    from ray.data.block import BlockAccessor

    from iqray.pipeline.embed import Embedder, EmbedSink, embed_prompts
    from iqray.pipeline.rescore import cached_shards, rescore_from_cache
    from iqray.pipeline.staging import stage_model

    source = img2dataset_table(sample, 0, 10)
    write_parquet(None, str(tmp_path / "in" / "a.parquet"), source)
    read = ReadConfig(read_batch_rows=4)
    shards = discover_shards(str(tmp_path / "in"), read, STORAGE)
    spec = stage_model(TEST_MODEL, STORAGE)
    dim = spec.config.heads.embed_dim

    cache = EmbeddingCache(str(tmp_path / "cache"), STORAGE)
    cache.bind(spec.tower_identity, spec.towers, dim, "float32")
    index = ShardWriter(shards, cache.index_url(), STORAGE,
                        {"tower_identity": spec.tower_identity, "scoring_hash": "test"},
                        complete=True, key_columns=["key"], keep_prompt=True,
                        keep_image_bytes=False, schema=INDEX_COLUMNS, before_commit=cache.flush)
    sink = EmbedSink(cache, index, dim)
    embedder = Embedder(spec, device="cpu", threads=1, dtype="float32")
    for rows in read_shard(shards[0], read, STORAGE, ["key"]):
        batch = decode_batch({k: R.column(v) for k, v in rows.items()},
                             image_size=spec.config.image_size, max_pixels=10**7, timeout_s=5,
                             keep_image_bytes=False, fine_resize=spec.config.fine_resize)
        sink.add(BlockAccessor.batch_to_block(embedder(batch)))
    sink.finish()
    assert sink.embedded == 10 and index_table(cache).num_rows == 10
    assert embed_prompts(cache, spec, set(source["caption"].to_pylist())) == len(
        set(source["caption"].to_pylist()))

    assert cached_shards(shards, cache.url, STORAGE, spec) == shards
    writer = ShardWriter(shards, str(tmp_path / "out"), STORAGE, {"scoring_hash": "test"},
                         complete=True, key_columns=["key"], keep_prompt=True,
                         keep_image_bytes=False, schema=score_schema(spec.config.output_names))
    rescore_from_cache(shards, cache.url, STORAGE, spec, writer, RunSummary())
    (committed,) = writer.committed
    out = pq.read_table(committed)
    assert out["key"].to_pylist() == source["key"].to_pylist()
    expected = reference_model.score(source["jpg"].to_pylist(), source["caption"].to_pylist())
    for name in ("quality", "alignment"):  # float32 cache: the forward's own scores
        np.testing.assert_allclose(out[name].to_numpy(), expected[name], atol=1e-5)


def test_another_models_towers_never_rescore_from_the_cache(tmp_path, sample):
    from iqray.pipeline.rescore import cached_shards
    from iqray.pipeline.staging import stage_model

    write_parquet(None, str(tmp_path / "in" / "a.parquet"), img2dataset_table(sample, 0, 3))
    shards = discover_shards(str(tmp_path / "in"), ReadConfig(), STORAGE)
    spec = stage_model(TEST_MODEL, STORAGE)
    cache = EmbeddingCache(str(tmp_path / "cache"), STORAGE)
    cache.bind("other towers", spec.towers, spec.config.heads.embed_dim, "float16")
    assert cached_shards(shards, cache.url, STORAGE, spec) == []
    with pytest.raises(Exception, match="tower"):
        cache.bind(spec.tower_identity, spec.towers, spec.config.heads.embed_dim, "float16")
