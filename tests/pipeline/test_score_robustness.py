"""Bad input, error budgets, resume, incremental runs, --retry-failed, resource sizing."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pipeline_data import (
    TEST_MODEL,
    assert_scores_match,
    img2dataset_table,
    read_output,
    write_parquet,
)

from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.execution import ErrorBudgetExceeded
from iqray.pipeline.planning import plan_resources
from iqray.pipeline.scoring import split_on_oom


def score(**kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("model", TEST_MODEL)
    return run_score(ScoreConfig(**kwargs), log=lambda *a: None)


def png_bomb() -> bytes:
    # Small on disk, 40000 x 40000 pixels once decoded.
    buffer = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("commit", ["driver", "actors"])
def test_bad_rows_become_error_rows_and_the_rest_is_scored(ray_local, tmp_path, sample,
                                                           reference_model, commit):
    names, images, prompts = sample
    good = img2dataset_table(sample, 0, 8)
    bad_images = [images[0][: len(images[0]) // 3], b"", b"not an image at all", None,
                  png_bomb(), images[5]]
    bad = pa.table({
        "key": [f"bad-{i}" for i in range(6)],
        "jpg": pa.array(bad_images, pa.binary()),
        "caption": ["truncated", "empty", "text", "missing", "bomb", None],
    })
    write_parquet(None, str(tmp_path / "in" / "a.parquet"), good)
    write_parquet(None, str(tmp_path / "in" / "b.parquet"), bad)
    (tmp_path / "in" / "c.parquet").write_bytes(b"PAR1 this is not really parquet")
    summary = score(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                    max_error_fraction=1.0, max_pixels=100_000_000, commit=commit)
    out = read_output(None, summary.outputs)
    # one file per shard, whoever committed it
    assert sorted(p.rsplit("/", 1)[-1] for p in summary.outputs) == [
        "a.parquet", "b.parquet", "c.parquet"]
    assert (tmp_path / "out" / "_SUCCESS").exists() and summary.exit_code == 0
    by_key = {r["key"]: r for r in out.to_pylist() if r["key"]}
    assert summary.rows == 8 + 6 + 1 and out.num_rows == 15
    for key in ("bad-0", "bad-1", "bad-2", "bad-4"):
        assert by_key[key]["status"] == "error" and by_key[key]["error_kind"] == "decode"
    assert "row 0 (key bad-0)" in by_key["bad-0"]["error"]
    assert "empty image bytes" in by_key["bad-1"]["error"]
    assert "above the limit" in by_key["bad-4"]["error"]
    assert by_key["bad-3"]["error_kind"] == "missing_image"
    # The last row has an image but no prompt: quality only.
    assert by_key["bad-5"]["status"] == "ok" and np.isnan(by_key["bad-5"]["alignment"])
    # Not Parquet at all, the same way on two reads: committed as one error row, its row
    # count unknown (no footer to tell it).
    unreadable = [r for r in out.to_pylist() if r["source_file"].endswith("c.parquet")]
    assert len(unreadable) == 1 and unreadable[0]["error_kind"] == "shard_corrupt"
    assert summary.errors == {"decode": 4, "missing_image": 1, "shard_corrupt": 1}
    assert summary.input_rows is None and summary.input_rows_unknown_shards == 1
    good_rows = out.filter(pa.compute.is_in(out["key"], good["key"]))
    assert_scores_match(good_rows, reference_model, good["jpg"].to_pylist(),
                        good["caption"].to_pylist())


def test_commit_actors_leave_a_shard_they_cannot_finish_uncommitted_and_a_rerun_finishes(
        ray_local, tmp_path, sample):
    inputs = tmp_path / "in"
    write_parquet(None, str(inputs / "a.parquet"), img2dataset_table(sample, 0, 6))
    write_parquet(None, str(inputs / "b.parquet"), img2dataset_table(sample, 6, 4)
                  .drop_columns(["url"]).rename_columns(["key", "photo", "caption"]))
    # b has no image column: a mistake, never committed (not as error rows either)
    write_parquet(None, str(inputs / "c.parquet"), img2dataset_table(sample, 10, 5))
    first = score(input=str(inputs), output=str(tmp_path / "out"), commit="actors",
                  num_actors=1, max_error_fraction=1.0)
    assert first.exit_code == 4 and list(first.unfinished) == [str(inputs / "b.parquet")]
    assert (first.ok, first.rows, first.unfinished_rows) == (11, 11, 4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "_UNFINISHED", "a.parquet", "c.parquet"]

    write_parquet(None, str(inputs / "b.parquet"), img2dataset_table(sample, 6, 4))
    rerun = score(input=str(inputs), output=str(tmp_path / "out"), commit="actors")
    assert (rerun.exit_code, rerun.shards_skipped, rerun.shards_scored, rerun.ok) == (0, 2, 1, 4)
    out = read_output(None, [str(tmp_path / "out" / f"{n}.parquet") for n in "abc"])
    assert out.num_rows == 15 and (tmp_path / "out" / "_SUCCESS").exists()


def test_the_error_budget_aborts_with_counts(ray_local, tmp_path, sample):
    table = pa.table({"key": ["a", "b", "c"], "jpg": pa.array([b"x", b"y", sample[1][0]]),
                      "caption": ["p", "q", "r"]})
    write_parquet(None, str(tmp_path / "in" / "0.parquet"), table)
    with pytest.raises(ErrorBudgetExceeded, match=r"2 of 3 rows failed .*decode: 2"):
        score(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
              max_error_fraction=0.5)


def test_reruns_skip_committed_shards_and_rescore_changed_and_new_ones(ray_local, tmp_path,
                                                                       sample):
    inputs = tmp_path / "in"
    for i in range(3):
        write_parquet(None, str(inputs / f"{i}.parquet"), img2dataset_table(sample, i * 5, 5))
    first = score(input=str(inputs), output=str(tmp_path / "out"))
    assert (first.shards_scored, first.shards_skipped) == (3, 0)
    again = score(input=str(inputs), output=str(tmp_path / "out"))
    assert (again.shards_scored, again.shards_skipped, again.rows) == (0, 3, 0)

    write_parquet(None, str(inputs / "1.parquet"), img2dataset_table(sample, 20, 7))  # changed
    write_parquet(None, str(inputs / "3.parquet"), img2dataset_table(sample, 27, 4))  # new
    nightly = score(input=str(inputs), output=str(tmp_path / "out"))
    assert (nightly.shards_scored, nightly.shards_skipped, nightly.rows) == (2, 2, 11)
    out = read_output(None, [str(tmp_path / "out" / f"{i}.parquet") for i in range(4)])
    assert out.num_rows == 5 + 7 + 5 + 4

    # Another model is another scorer: nothing it finds is reused.
    other = score(input=str(inputs), output=str(tmp_path / "out"),
                  folder_chunk_size=7, keep_prompt=False)
    assert other.shards_skipped == 0


def test_retry_failed_rescores_only_the_error_rows(ray_local, tmp_path, sample,
                                                   reference_model):
    names, images, prompts = sample
    (tmp_path / "data").mkdir()
    for name, data in zip(names[:6], images[:6], strict=True):
        if name != names[2]:  # one image is missing during the first run (an "outage")
            (tmp_path / "data" / name).write_bytes(data)
    write_parquet(None, str(tmp_path / "data" / "index.parquet"),
                  pa.table({"path": names[:6], "prompt": prompts[:6]}))
    first = score(input=str(tmp_path / "data" / "index.parquet"), output=str(tmp_path / "out"),
                  max_error_fraction=1.0)
    assert first.errors == {"read": 1}
    (tmp_path / "data" / names[2]).write_bytes(images[2])
    retry = score(input=str(tmp_path / "data" / "index.parquet"), output=str(tmp_path / "out"),
                  retry_failed=True)
    assert retry.rows == 1 and retry.ok == 1
    out = read_output(None, retry.outputs)
    assert out["source_row"].to_pylist() == list(range(6))
    assert out["status"].to_pylist() == ["ok"] * 6
    assert_scores_match(out, reference_model, images[:6], prompts[:6])
    # Nothing left to retry: a third run does no work.
    assert score(input=str(tmp_path / "data" / "index.parquet"), output=str(tmp_path / "out"),
                 retry_failed=True).rows == 0


def test_actor_pools_are_sized_from_resources_and_never_starve_decode():
    two_cpus = plan_resources(ScoreConfig(input="x", output="y"), {"CPU": 2.0})
    assert two_cpus["actors"] == 1 and two_cpus["actor_cpus"] == 0.5
    assert not two_cpus["use_gpu"] and two_cpus["threads"] == 2
    gpus = plan_resources(ScoreConfig(input="x", output="y", gpus_per_actor=0.5),
                          {"CPU": 16.0, "GPU": 2.0})
    assert gpus["actors"] == 4 and gpus["use_gpu"] and gpus["gpus_per_actor"] == 0.5
    with pytest.raises(ValueError, match="job would hang"):
        plan_resources(ScoreConfig(input="x", output="y", num_actors=2, actor_num_cpus=1),
                       {"CPU": 2.0})
    with pytest.raises(ValueError, match="0 GPUs"):
        plan_resources(ScoreConfig(input="x", output="y", device="cuda"), {"CPU": 4.0})


def test_cuda_out_of_memory_splits_the_batch_instead_of_failing():
    calls = []

    def fake_score(pixels, prompts):
        calls.append(len(prompts))
        if len(prompts) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"quality": pixels[:, 0, 0, 0].numpy().copy()}

    pixels = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    out = split_on_oom(fake_score, pixels, list(range(10)))
    np.testing.assert_array_equal(out["quality"], np.arange(10))
    assert calls[0] == 10 and max(c for c in calls[1:]) <= 5

    def always_oom(pixels, prompts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        split_on_oom(always_oom, pixels[:2], [0, 1])


def test_config_loads_from_yaml_with_flag_overrides(tmp_path):
    from iqray.jobs.cli import build_parser
    from iqray.jobs.config import build_config

    job = tmp_path / "job.yaml"
    job.write_text("input: s3://bucket/shards/\noutput: s3://bucket/scores/\nbatch_size: 16\n"
                   "s3_endpoint: http://127.0.0.1:9000\nmax_error_fraction: 0.01\n")
    args = build_parser().parse_args(["score", "--config", str(job), "--batch-size", "64"])
    config = build_config(ScoreConfig, args)
    assert config.batch_size == 64 and config.max_error_fraction == 0.01
    assert config.input == "s3://bucket/shards/" and config.s3_endpoint.endswith(":9000")
    args = build_parser().parse_args(["score", "in/", "out/", "--limit", "3"])
    config = build_config(ScoreConfig, args)
    assert (config.input, config.output, config.limit) == ("in/", "out/", 3)
    assert json.loads(config.model_dump_json())["limit"] == 3
