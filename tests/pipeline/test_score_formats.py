"""`iqray score` reads every input layout, locally and from S3, and scores like model.score."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_data import (
    SAMPLE,
    TEST_MODEL,
    assert_scores_match,
    img2dataset_table,
    read_output,
    wds_members,
    write_parquet,
    write_tar,
)

from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.execution import RAY_PROGRESS_LOGGER


def score(**kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("model", TEST_MODEL)
    return run_score(ScoreConfig(**kwargs), log=lambda *a: None)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_folder_with_a_csv_sidecar(ray_local, tmp_path, sample, reference_model):
    # Ray's "Progress bars disabled. To enable, ..." is logged once per process: reset it so
    # that this run would log it, and listen where Ray logs it.
    from ray.util.debug import reset_log_once

    reset_log_once("ray_data_progress_manager_disabled")
    ray_progress = Records()
    logging.getLogger(RAY_PROGRESS_LOGGER).addHandler(ray_progress)
    try:
        summary = score(input=str(SAMPLE), output=str(tmp_path / "out"))
    finally:
        logging.getLogger(RAY_PROGRESS_LOGGER).removeHandler(ray_progress)
    assert not [m for m in ray_progress.messages if "Progress bars disabled" in m]
    table = read_output(None, summary.outputs)
    names, images, prompts = sample
    by_name = dict(zip(names, zip(images, prompts, strict=True), strict=True))
    keys = [k.removeprefix("images/") for k in table["key"].to_pylist()]
    assert sorted(keys) == sorted(names) and table.num_rows == 32
    assert table["prompt"].to_pylist() == [by_name[k][1] for k in keys]
    assert set(table["status"].to_pylist()) == {"ok"}
    assert_scores_match(table, reference_model, [by_name[k][0] for k in keys],
                        [by_name[k][1] for k in keys])
    success = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert success["summary"]["rows"] == 32 and success["model"] == "mst-clipiqa-tiny-random"
    assert "bottleneck" in success["summary"]
    assert summary.operators == ["FromItems", "MapBatches(read_shards)",
                                 "MapBatches(decode_batch)", "MapBatches(Scorer)"]


def test_a_folder_without_prompts_scores_quality_only(ray_local, tmp_path, sample,
                                                      reference_model):
    shutil.copytree(SAMPLE / "images", tmp_path / "imgs")
    summary = score(input=str(tmp_path / "imgs"), output=str(tmp_path / "out"),
                    folder_chunk_size=10)
    assert len(summary.outputs) == 4  # 32 images in chunks of 10
    table = read_output(None, summary.outputs)
    assert table.num_rows == 32 and table["alignment"].null_count + sum(
        1 for v in table["alignment"].to_pylist() if v != v) == 32


@pytest.mark.parametrize("where", ["local", "s3"])
def test_img2dataset_parquet_shards(where, ray_local, tmp_path, sample, reference_model,
                                    request):
    tables = [img2dataset_table(sample, start, 12) for start in (0, 12, 24)]
    if where == "local":
        fs, root = None, str(tmp_path / "in")
        out = str(tmp_path / "out")
        extra = {}
    else:
        fs, bucket = request.getfixturevalue("s3_bucket")
        root, out = f"{bucket}/in", f"s3://{bucket}/out"
        extra = {"s3_endpoint": request.getfixturevalue("s3_endpoint")}
    for i, table in enumerate(tables):
        write_parquet(fs, f"{root}/{i:05d}.parquet", table)
    source = f"s3://{root}" if fs is not None else root
    summary = score(input=source, output=out, **extra)
    assert [p.rsplit("/", 1)[1] for p in summary.outputs] == [
        "00000.parquet", "00001.parquet", "00002.parquet"]
    output_fs = None
    if fs is not None:
        output_fs = fs
        paths = [p.removeprefix("s3://") for p in summary.outputs]
        assert fs.exists(f"{bucket}/out/_SUCCESS")
    else:
        paths = summary.outputs
    table = read_output(output_fs, paths)
    source_table = pa.concat_tables(tables)
    assert table["key"].to_pylist() == source_table["key"].to_pylist()
    assert "jpg" not in table.column_names and "url" not in table.column_names
    assert table["image_sha256"].to_pylist() == [
        hashlib.sha256(b).hexdigest() for b in source_table["jpg"].to_pylist()]
    assert_scores_match(table, reference_model, source_table["jpg"].to_pylist(),
                        source_table["caption"].to_pylist())
    # The footer names the model, version, config and input.
    handle = fs.open(paths[0], "rb") if fs is not None else open(paths[0], "rb")
    with handle:
        meta = json.loads(pq.read_schema(handle).metadata[b"iqray"])
    assert meta["model"] == "mst-clipiqa-tiny-random" and meta["rows"] == 12
    assert meta["input_url"].endswith("00000.parquet") and meta["iqray_version"]
    assert {"checkpoint_sha256", "config_hash", "written", "score_mode"} <= set(meta)


def test_hugging_face_image_struct_and_prompt_columns(ray_local, tmp_path, sample,
                                                      reference_model):
    names, images, prompts = sample
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "id": list(range(8)),
        "image": pa.array([{"bytes": images[i], "path": names[i]} for i in range(8)],
                          image_type),
        "prompt": prompts[:8],
    })
    write_parquet(None, str(tmp_path / "in" / "train-00000-of-00001.parquet"), table)
    summary = score(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    out = read_output(None, summary.outputs)
    assert out["id"].to_pylist() == list(range(8))
    assert_scores_match(out, reference_model, images[:8], prompts[:8])


def test_image_path_column_relative_to_the_shard_on_s3(ray_local, s3_bucket, s3_endpoint,
                                                       sample, reference_model):
    fs, bucket = s3_bucket
    names, images, prompts = sample
    for name, data in zip(names[:6], images[:6], strict=True):
        fs.pipe_file(f"{bucket}/data/images/{name}", data)
    table = pa.table({"image_path": [f"images/{n}" for n in names[:6]], "text": prompts[:6]})
    write_parquet(fs, f"{bucket}/data/index.parquet", table)
    summary = score(input=f"s3://{bucket}/data/index.parquet", output=f"s3://{bucket}/out",
                    s3_endpoint=s3_endpoint)
    out = read_output(fs, [p.removeprefix("s3://") for p in summary.outputs])
    assert out["status"].to_pylist() == ["ok"] * 6
    assert_scores_match(out, reference_model, images[:6], prompts[:6])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_webdataset_tar_shards(where, ray_local, tmp_path, sample, reference_model, request):
    names, images, prompts = sample
    if where == "local":
        fs, root, out, extra = None, str(tmp_path / "wds"), str(tmp_path / "out"), {}
    else:
        fs, bucket = request.getfixturevalue("s3_bucket")
        root, out = f"{bucket}/wds", f"s3://{bucket}/out"
        extra = {"s3_endpoint": request.getfixturevalue("s3_endpoint")}
    write_tar(fs, f"{root}/00000.tar", wds_members(sample, 0, 10, prompt_as="txt"))
    write_tar(fs, f"{root}/00001.tar", wds_members(sample, 10, 10, prompt_as="json"))
    # img2dataset's per-shard metadata parquet beside the tars is not an input.
    write_parquet(fs, f"{root}/00000.parquet", pa.table({"key": ["x"]}))
    source = f"s3://{root}" if fs is not None else root
    summary = score(input=source, output=out, **extra)
    paths = [p.removeprefix("s3://") for p in summary.outputs]
    table = read_output(fs, paths)
    assert table["key"].to_pylist() == [f"{i:06d}" for i in range(20)]
    assert_scores_match(table, reference_model, images[:20], prompts[:20])


def test_limit_and_sample_give_a_quick_preview_that_a_full_run_replaces(
        ray_local, tmp_path, sample):
    for i, start in enumerate((0, 12, 24)):
        write_parquet(None, str(tmp_path / "in" / f"{i}.parquet"),
                      img2dataset_table(sample, start, 12))
    preview = score(input=str(tmp_path / "in"), output=str(tmp_path / "out"), limit=5)
    assert preview.rows == 5
    sampled = score(input=str(tmp_path / "in"), output=str(tmp_path / "out2"), sample=0.5,
                    seed=1)
    again = score(input=str(tmp_path / "in"), output=str(tmp_path / "out3"), sample=0.5,
                  seed=1)
    assert 6 <= sampled.rows <= 30 and sampled.rows == again.rows
    full = score(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert full.shards_skipped == 0 and full.rows == 36  # previews are never "committed"


def test_dry_run_projects_the_whole_input(ray_local, tmp_path, sample):
    for i in range(4):
        write_parquet(None, str(tmp_path / "in" / f"{i}.parquet"),
                      img2dataset_table(sample, i, 30))
    def scratch_dirs() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("iqray-dry-run-*")}

    before = scratch_dirs()
    lines: list[str] = []
    summary = run_score(ScoreConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                    dry_run=True, dry_run_rows=20, model=TEST_MODEL,
                                    progress=False), log=lines.append)
    assert summary.rows == 20 and summary.estimated_rows == 120
    assert summary.projected_s is not None and summary.projected_s > 0
    assert not (tmp_path / "out").exists()  # a dry run never writes the real output
    shown = [line for line in lines if line.startswith("  key ")]
    assert len(shown) == 5 and all("quality " in line and "alignment " in line
                                   for line in shown)
    assert "dry run: about 120 rows in the whole input; projected " in lines[-1]
    assert scratch_dirs() == before  # the scratch output is removed


def test_a_checkpoint_on_s3_is_staged_once_and_scores_like_the_local_model(
        ray_local, tmp_path, s3_bucket, s3_endpoint, sample):
    import iqray.model

    fs, bucket = s3_bucket
    model = iqray.model.load(TEST_MODEL)
    model.config = model.config.model_copy(update={"trained": True})
    with torch.no_grad():
        model.alignment_head.alpha.fill_(0.5)
    local = iqray.model.save_checkpoint(model, tmp_path / "ckpt")
    fs.put(str(local / "config.json"), f"{bucket}/models/v1/config.json")
    fs.put(str(local / "model.safetensors"), f"{bucket}/models/v1/model.safetensors")
    write_parquet(None, str(tmp_path / "in" / "0.parquet"), img2dataset_table(sample, 0, 10))
    summary = score(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                    model=f"s3://{bucket}/models/v1", s3_endpoint=s3_endpoint)
    out = read_output(None, summary.outputs)
    source = img2dataset_table(sample, 0, 10)
    assert_scores_match(out, iqray.model.load(local), source["jpg"].to_pylist(),
                        source["caption"].to_pylist())
    meta = json.loads(pq.read_schema(summary.outputs[0]).metadata[b"iqray"])
    assert meta["score_mode"] == "trained"
    assert meta["checkpoint_sha256"] == hashlib.sha256(
        (local / "model.safetensors").read_bytes()).hexdigest()


def test_a_glob_selects_the_shards(ray_local, tmp_path, sample):
    for name in ("a-0.parquet", "a-1.parquet", "b-0.parquet"):
        write_parquet(None, str(tmp_path / "in" / name), img2dataset_table(sample, 0, 3))
    summary = score(input=str(tmp_path / "in" / "a-*.parquet"), output=str(tmp_path / "out"))
    assert sorted(p.rsplit("/", 1)[1] for p in summary.outputs) == ["a-0.parquet",
                                                                   "a-1.parquet"]


def test_a_folder_with_a_jsonl_sidecar_on_s3(ray_local, s3_bucket, s3_endpoint, sample,
                                             reference_model):
    fs, bucket = s3_bucket
    names, images, prompts = sample
    for name, data in zip(names[:9], images[:9], strict=True):
        fs.pipe_file(f"{bucket}/gen/{name}", data)
    sidecar = "\n".join(json.dumps({"file_name": n, "text": p})
                        for n, p in zip(names[:8], prompts[:8], strict=True))
    fs.pipe_file(f"{bucket}/gen/metadata.jsonl", sidecar.encode())
    summary = score(input=f"s3://{bucket}/gen", output=f"s3://{bucket}/out",
                    s3_endpoint=s3_endpoint, folder_chunk_size=4)
    assert len(summary.outputs) == 3
    out = read_output(fs, [p.removeprefix("s3://") for p in summary.outputs])
    order = [names.index(k) for k in out["key"].to_pylist()]
    assert sorted(order) == list(range(9))
    expected_prompts = [prompts[i] if i < 8 else None for i in order]
    assert out["prompt"].to_pylist() == expected_prompts  # the 9th image has no sidecar entry
    assert_scores_match(out, reference_model, [images[i] for i in order], expected_prompts)


def test_a_csv_index_with_an_image_root(ray_local, tmp_path, sample, reference_model):
    names, images, prompts = sample
    index = SAMPLE / "prompts.csv"  # name,prompt,mos_quality,mos_align; images/ beside it
    summary = score(input=str(index), output=str(tmp_path / "out"), image_path_column="name",
                    image_root=str(SAMPLE / "images"), key_columns=["name"])
    out = read_output(None, summary.outputs)
    assert out["name"].to_pylist() == names and out.num_rows == 32
    assert_scores_match(out, reference_model, images, prompts)


def test_the_shipped_two_view_model_scores_alike_in_the_pipeline(ray_local, tmp_path, sample):
    # Decode tasks build the 6-channel (coarse + native-detail) crops the actors feed to
    # the towers; the pipeline must give what model.score gives.
    import iqray.model

    summary = score(input=str(SAMPLE), output=str(tmp_path / "out"),
                    model=iqray.model.DEFAULT_MODEL)
    table = read_output(None, summary.outputs)
    names, images, prompts = sample
    by_name = dict(zip(names, zip(images, prompts, strict=True), strict=True))
    keys = [k.removeprefix("images/") for k in table["key"].to_pylist()]
    assert_scores_match(table, iqray.model.load(iqray.model.DEFAULT_MODEL),
                        [by_name[k][0] for k in keys], [by_name[k][1] for k in keys])
    footer = pq.read_schema(summary.outputs[0]).metadata[b"iqray"]
    assert json.loads(footer)["score_reference"]["quality"]["n"] == 2092
