"""`iqray clean` on S3: scores only what is new, reruns do no work, manifests never duplicate."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import yaml
from pipeline_data import TEST_MODEL, img2dataset_table, write_parquet

from iqray.jobs.cli import main


def test_nightly_clean_scores_new_shards_only_and_is_safe_to_rerun(
        ray_local, sample, s3_bucket, s3_endpoint, tmp_path):
    fs, bucket = s3_bucket
    for shard in range(2):
        write_parquet(fs, f"{bucket}/incoming/part-{shard:05d}.parquet",
                      img2dataset_table(sample, shard * 8, 8))
    job = tmp_path / "nightly.yaml"
    job.write_text(yaml.safe_dump({
        "sources": [f"s3://{bucket}/incoming"], "output": f"s3://{bucket}/clean",
        "model": TEST_MODEL, "s3_endpoint": s3_endpoint, "progress": False,
        "rules": {"keep_top": 0.5, "dedupe": "exact"}}))

    def records():
        return [json.loads(fs.cat_file(p)) for p in sorted(fs.glob(f"{bucket}/clean/runs/*"))]

    def manifest(name):
        with fs.open(f"{bucket}/clean/manifests/{name}.parquet", "rb") as handle:
            return pq.read_table(handle)

    assert main(["clean", "--config", str(job)]) == 0
    (first,) = records()
    (source,) = first["sources"].values()
    assert (source["scored"], source["skipped"], source["rows_scored"]) == (2, 0, 16)
    kept, rejected = manifest("kept"), manifest("rejected")
    assert kept.num_rows == 8 and rejected.num_rows == 8
    assert set(rejected["reason"].to_pylist()) == {"below_top"}
    assert first["manifests"] == "rebuilt" and first["kept"] == 8

    # A rerun after success scores nothing and leaves the manifests alone.
    before = fs.info(f"{bucket}/clean/manifests/kept.parquet")["LastModified"]
    assert main(["clean", "--config", str(job)]) == 0
    second = records()[-1]
    (source,) = second["sources"].values()
    assert (source["scored"], source["skipped"]) == (0, 2)
    assert second["manifests"].startswith("unchanged") and second["kept"] == 8
    assert fs.info(f"{bucket}/clean/manifests/kept.parquet")["LastModified"] == before

    # New shard: only it is scored; the manifests cover all three, each row once.
    write_parquet(fs, f"{bucket}/incoming/part-00002.parquet",
                  img2dataset_table(sample, 16, 8))
    assert main(["clean", "--config", str(job), "--rules.keep-top", "0.25"]) == 0
    third = records()[-1]
    (source,) = third["sources"].values()
    assert (source["scored"], source["skipped"], source["rows_scored"]) == (1, 2, 8)
    keys = manifest("kept")["key"].to_pylist() + manifest("rejected")["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 24
    assert manifest("kept").num_rows == 6

    # A crash after scoring but before the manifests were replaced: the rerun rebuilds
    # them from the score files, scoring nothing.
    fs.rm(f"{bucket}/clean/manifests/state.json")
    fs.rm(f"{bucket}/clean/manifests/kept.parquet")
    assert main(["clean", "--config", str(job), "--rules.keep-top", "0.25"]) == 0
    fourth = records()[-1]
    (source,) = fourth["sources"].values()
    assert source["scored"] == 0 and fourth["manifests"] == "rebuilt"
    assert sorted(manifest("kept")["key"].to_pylist()) == sorted(
        k for k, keep in zip(manifest("kept")["key"].to_pylist(),
                             manifest("kept")["keep"].to_pylist(), strict=True) if keep)
    assert manifest("kept").num_rows == 6


def test_clean_never_builds_manifests_from_a_source_with_unfinished_shards(
        ray_local, sample, tmp_path):
    incoming = tmp_path / "incoming"
    write_parquet(None, str(incoming / "part-0.parquet"), img2dataset_table(sample, 0, 4))
    # The second shard lacks the prompt column named below: a mistake the first shard did
    # not show, so that shard is left unfinished (never committed as done).
    write_parquet(None, str(incoming / "part-1.parquet"),
                  img2dataset_table(sample, 4, 4).drop_columns(["caption"]))
    args = ["clean", "--sources", str(incoming), "--output", str(tmp_path / "clean"),
            "--model", TEST_MODEL, "--no-progress", "--prompt-column", "caption",
            "--max-error-fraction", "1"]  # half the rows are in the unfinished shard
    assert main(args) == 4
    (record_file,) = (tmp_path / "clean" / "runs").iterdir()
    record = json.loads(record_file.read_text())
    (source,) = record["sources"].values()
    assert list(source["unfinished"]) == [str(incoming / "part-1.parquet")]
    assert "no column 'caption' for the prompt" in source["unfinished"][str(incoming /
                                                                           "part-1.parquet")]
    assert record["manifests"].startswith("not rebuilt") and record["exit_code"] == 4
    assert not (tmp_path / "clean" / "manifests").exists()

    write_parquet(None, str(incoming / "part-1.parquet"), img2dataset_table(sample, 4, 4))
    assert main(args) == 0
    kept = pq.read_table(tmp_path / "clean" / "manifests" / "kept.parquet")
    assert kept.num_rows == 8
