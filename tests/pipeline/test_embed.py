"""`iqray embed`: the embedding cache holds what the towers compute, once per image."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
from pipeline_data import SAMPLE, TEST_MODEL, img2dataset_table, write_parquet

import iqray.model
from iqray.jobs.embed import EmbedConfig, run_embed
from iqray.pipeline.io.discovery import discover_shards
from iqray.pipeline.io.embed_cache import (
    EmbeddingCache,
    EmbeddingCacheMismatch,
    index_table,
    shard_index,
)


def embed(**kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("model", TEST_MODEL)
    return run_embed(EmbedConfig(**kwargs), log=lambda *a: None)


def sample_index(**extra):
    return dict(input=str(SAMPLE / "prompts.csv"), image_path_column="name",
                image_root=str(SAMPLE / "images"), key_columns=["name"], **extra)


def test_cached_embeddings_are_what_the_towers_compute(ray_local, tmp_path, sample,
                                                       reference_model):
    summary = embed(cache=str(tmp_path / "cache"), **sample_index())
    assert summary.extra["images_embedded"] == 32 and summary.extra["prompts_embedded"] == 8
    assert summary.extra["fp16_max_abs_error"] < 1e-3

    cache = EmbeddingCache(str(tmp_path / "cache"))
    index = index_table(cache)
    assert index["name"].to_pylist() == sample[0] and index.num_rows == 32
    coarse, fine = cache.load_images(index["image_sha256"].to_pylist()[:4])
    model = reference_model
    with torch.inference_mode():
        pixels = torch.stack([model.transform.load(b) for b in sample[1][:4]])
        exact_coarse, exact_fine = model.encode_images(pixels)
    np.testing.assert_allclose(coarse, exact_coarse.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(fine, exact_fine.numpy(), rtol=2e-3, atol=2e-3)

    features = cache.load_prompts({sample[2][0]})
    tokens, pooled, truncated = features[sample[2][0]]
    exact = model.prompt_features([sample[2][0]])[sample[2][0]]
    np.testing.assert_allclose(tokens, exact[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(pooled, exact[1].numpy(), atol=2e-3, rtol=2e-3)
    assert truncated is False and tokens.shape[1] == 512


def test_images_already_cached_are_not_embedded_again(ray_local, tmp_path, sample):
    cache = str(tmp_path / "cache")
    embed(cache=cache, **sample_index())
    # A second dataset repeating 12 of the same images plus nothing new.
    write_parquet(None, str(tmp_path / "other" / "0.parquet"), img2dataset_table(sample, 0, 12))
    again = embed(cache=cache, input=str(tmp_path / "other"))
    assert again.extra["images_embedded"] == 0 and again.extra["images_reused"] == 12
    assert again.extra["prompts_embedded"] == 0
    rerun = embed(cache=cache, input=str(tmp_path / "other"))
    assert rerun.shards_skipped == 1 and rerun.rows == 0
    assert len(EmbeddingCache(cache).image_keys()) == 32


def test_a_cache_refuses_other_towers(ray_local, tmp_path, sample):
    cache = str(tmp_path / "cache")
    embed(cache=cache, **sample_index())
    other = iqray.model.load(TEST_MODEL)
    other.config = other.config.model_copy(update={
        "fine": other.config.fine.model_copy(update={"init_seed": 7})})
    checkpoint = iqray.model.save_checkpoint(other, tmp_path / "other-towers")
    with pytest.raises(EmbeddingCacheMismatch,
                       match=r"other towers.*its own cache directory \(--cache DIR\)"):
        embed(cache=cache, model=str(checkpoint), **sample_index())
    # Heads alone do not change what the towers compute: a trained checkpoint shares the cache.
    same_towers = iqray.model.load(TEST_MODEL)
    same_towers.config = same_towers.config.model_copy(update={"trained": True})
    checkpoint = iqray.model.save_checkpoint(same_towers, tmp_path / "same-towers")
    assert embed(cache=cache, model=str(checkpoint), **sample_index()).shards_skipped == 1


def test_an_index_replaced_by_a_same_named_input_is_refused_not_misread(ray_local, tmp_path):
    # Two datasets' rows.csv embedded into one cache: index files are named after the input
    # file, so the second replaces the first's, whose source rows would then point into the
    # wrong table.
    table = pacsv.read_csv(SAMPLE / "prompts.csv")
    inputs = {}
    for name, rows in (("a", slice(0, 8)), ("b", slice(8, 20))):
        (tmp_path / name).mkdir()
        inputs[name] = str(tmp_path / name / "rows.csv")
        pacsv.write_csv(table[rows], inputs[name])
    cache_url = str(tmp_path / "cache")
    settings = dict(image_path_column="name", image_root=str(SAMPLE / "images"),
                    key_columns=["name"], cache=cache_url)
    embed(input=inputs["a"], **settings)
    config = EmbedConfig(input=inputs["a"], model=TEST_MODEL, **settings)
    (shard_a,) = discover_shards(inputs["a"], config.read_config(), config.storage_config())
    assert shard_index(EmbeddingCache(cache_url), shard_a)["name"].to_pylist() == \
        table["name"].to_pylist()[:8]

    embed(input=inputs["b"], **settings)
    with pytest.raises(ValueError, match="another file of that name"):
        shard_index(EmbeddingCache(cache_url), shard_a)

    embed(input=inputs["a"], **settings)  # a rerun re-indexes a; its images are all cached
    assert shard_index(EmbeddingCache(cache_url), shard_a)["name"].to_pylist() == \
        table["name"].to_pylist()[:8]


def test_missing_entries_are_named(tmp_path):
    cache = EmbeddingCache(str(tmp_path / "cache"))
    cache.bind("abc", {"coarse": "x"}, 4, "float16")
    cache.add_images(["sha-1"], np.ones((1, 4)), np.zeros((1, 4)))
    cache.flush()
    with pytest.raises(KeyError, match="1 images are not in the cache"):
        cache.load_images(["sha-1", "sha-2"])
    coarse, fine = cache.load_images(["sha-1"])
    assert coarse.dtype == np.float32 and coarse.tolist() == [[1, 1, 1, 1]]
    assert cache.image_keys() == {"sha-1"}


def test_score_with_a_cache_rescores_without_reading_images(ray_local, tmp_path, sample,
                                                            reference_model):
    import shutil

    from pipeline_data import read_output

    from iqray.jobs.score import ScoreConfig, run_score

    images = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", images)
    shutil.copy(SAMPLE / "prompts.csv", tmp_path / "prompts.csv")
    columns = dict(input=str(tmp_path / "prompts.csv"), image_path_column="name",
                   image_root=str(images), key_columns=["name"], progress=False)
    embed(cache=str(tmp_path / "cache"), **columns)
    shutil.rmtree(images)  # from here on, reading any image would fail

    summary = run_score(ScoreConfig(output=str(tmp_path / "out"), cache=str(tmp_path / "cache"),
                                    model=TEST_MODEL, **columns), log=lambda *a: None)
    assert summary.rows == summary.ok == 32 and "heads (from cache)" in summary.stage_busy_s
    out = read_output(None, summary.outputs)
    assert out["name"].to_pylist() == sample[0]
    # fp16 storage: close to the fp32 forward, within the cache's measured error.
    expected = reference_model.score(sample[1], sample[2])
    np.testing.assert_allclose(out["quality"].to_numpy(), expected["quality"], atol=2e-3)
    np.testing.assert_allclose(out["alignment"].to_numpy(), expected["alignment"], atol=2e-3)


def test_a_shard_that_cannot_be_read_is_not_indexed_and_a_rerun_indexes_it(ray_local,
                                                                            tmp_path, sample):
    inputs = tmp_path / "in"
    write_parquet(None, str(inputs / "a.parquet"), img2dataset_table(sample, 0, 4))
    # The second shard lacks the configured key column: left unfinished, never indexed.
    write_parquet(None, str(inputs / "b.parquet"),
                  img2dataset_table(sample, 4, 4).rename_columns(["id", "jpg", "caption",
                                                                  "url"]))
    first = embed(input=str(inputs), cache=str(tmp_path / "cache"), key_columns=["key"],
                  max_error_fraction=1.0)
    assert first.exit_code == 4 and list(first.unfinished) == [str(inputs / "b.parquet")]
    assert "no key column 'key'" in first.unfinished[str(inputs / "b.parquet")]
    cache = EmbeddingCache(str(tmp_path / "cache"))
    assert index_table(cache)["source_file"].to_pylist() == [str(inputs / "a.parquet")] * 4

    write_parquet(None, str(inputs / "b.parquet"), img2dataset_table(sample, 4, 4))
    again = embed(input=str(inputs), cache=str(tmp_path / "cache"), key_columns=["key"])
    assert again.exit_code == 0 and (again.shards_skipped, again.rows) == (1, 4)
    assert index_table(cache).num_rows == 8
