"""`iqray score` end to end through Ray: scores like model.score, footers, run records,
previews, dry runs, checkpoints on S3. Each input layout's reader is tested without Ray in
test_formats.py."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pipeline_data import (
    SAMPLE,
    TEST_MODEL,
    assert_scores_match,
    img2dataset_table,
    read_output,
    write_parquet,
)

from iqray.jobs.score import ScoreConfig, run_score
from iqray.pipeline.runtime import RAY_PROGRESS_LOGGER


def score(**kwargs):
    kwargs.setdefault("executor", "ray")  # this module is about the Ray graph
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
    assert summary.operators == ["FromArrow", "MapBatches(ReadShards)",
                                 "MapBatches(Decode)", "MapBatches(Scorer)"]


def test_img2dataset_parquet_shards_on_s3(ray_local, s3_bucket, s3_endpoint, sample,
                                          reference_model):
    fs, bucket = s3_bucket
    tables = [img2dataset_table(sample, start, 12) for start in (0, 12, 24)]
    for i, table in enumerate(tables):
        write_parquet(fs, f"{bucket}/in/{i:05d}.parquet", table)
    summary = score(input=f"s3://{bucket}/in", output=f"s3://{bucket}/out",
                    s3_endpoint=s3_endpoint)
    assert [p.rsplit("/", 1)[1] for p in summary.outputs] == [
        "00000.parquet", "00001.parquet", "00002.parquet"]
    paths = [p.removeprefix("s3://") for p in summary.outputs]
    assert fs.exists(f"{bucket}/out/_SUCCESS")
    table = read_output(fs, paths)
    source_table = pa.concat_tables(tables)
    assert table["key"].to_pylist() == source_table["key"].to_pylist()
    assert "jpg" not in table.column_names and "url" not in table.column_names
    assert table["image_sha256"].to_pylist() == [
        hashlib.sha256(b).hexdigest() for b in source_table["jpg"].to_pylist()]
    assert_scores_match(table, reference_model, source_table["jpg"].to_pylist(),
                        source_table["caption"].to_pylist())
    # The footer names the model, version, config and input.
    with fs.open(paths[0], "rb") as handle:
        meta = json.loads(pq.read_schema(handle).metadata[b"iqray"])
    assert meta["model"] == "mst-clipiqa-tiny-random" and meta["rows"] == 12
    assert meta["input_url"].endswith("00000.parquet") and meta["iqray_version"]
    assert {"checkpoint_sha256", "scoring_hash", "written", "score_mode"} <= set(meta)
    assert "config_hash" not in meta  # one hash, written once


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
