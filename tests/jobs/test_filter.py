"""`iqray filter` on real score runs (moto S3): kept rows, counts, join back to the shards."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from pipeline_data import TEST_MODEL, img2dataset_table, wds_members, write_parquet, write_tar

from iqray.jobs.cli import main
from iqray.jobs.filter import FilterConfig, run_filter
from iqray.jobs.score import ScoreConfig, run_score


def read_parquet(fs, url: str):
    with fs.open(url.removeprefix("s3://"), "rb") as handle:
        return pq.read_table(handle)


def test_filter_joins_kept_rows_back_to_parquet_and_tar_shards_on_s3(
        ray_local, sample, s3_bucket, s3_endpoint):
    fs, bucket = s3_bucket
    names, images, prompts = sample
    source = img2dataset_table(sample, 0, 12)
    write_parquet(fs, f"{bucket}/pq/part-00000.parquet", source)
    write_tar(fs, f"{bucket}/wds/shard-00000.tar", wds_members(sample, 0, 10, "json"))
    s3 = {"s3_endpoint": s3_endpoint}
    for name in ("pq", "wds"):
        run_score(ScoreConfig(input=f"s3://{bucket}/{name}", output=f"s3://{bucket}/{name}-scores",
                              model=TEST_MODEL, progress=False, **s3), log=lambda *a: None)

    # Parquet source: the copy has the source's own columns for exactly the kept rows.
    summary = run_filter(FilterConfig(
        input=f"s3://{bucket}/pq-scores", output=f"s3://{bucket}/pq-kept", keep_top=0.5,
        join=f"s3://{bucket}/pq", **s3), log=lambda *a: None)
    kept = read_parquet(fs, f"s3://{bucket}/pq-kept/scores.parquet")
    scores = read_parquet(fs, f"s3://{bucket}/pq-scores/part-00000.parquet")
    best = sorted(scores.to_pylist(), key=lambda r: (-r["quality"], r["key"]))[:6]
    assert sorted(kept["key"].to_pylist()) == sorted(r["key"] for r in best)
    assert summary["kept"] == 6 and summary["dropped_by_rule"] == {"below_top": 6}
    (joined_url,) = summary["joined_files"]
    assert joined_url == f"s3://{bucket}/pq-kept/data/part-00000.parquet"
    joined = read_parquet(fs, joined_url)
    by_key = {r["key"]: r for r in source.to_pylist()}
    for row in joined.to_pylist():
        original = by_key[row["key"]]
        assert row["jpg"] == original["jpg"] and row["caption"] == original["caption"]
        assert row["url"] == original["url"]
    assert sorted(joined["key"].to_pylist()) == sorted(kept["key"].to_pylist())
    assert {"quality", "alignment", "quality_prompt_rank"} <= set(joined.column_names)

    # Tar source: only the kept samples, members byte-identical, scores beside them.
    summary = run_filter(FilterConfig(
        input=f"s3://{bucket}/wds-scores", output=f"s3://{bucket}/wds-kept",
        where="quality >= 0 and alignment >= 0", keep_top=0.3, join=f"s3://{bucket}/wds",
        **s3), log=lambda *a: None)
    kept_keys = read_parquet(fs, f"s3://{bucket}/wds-kept/scores.parquet")["key"].to_pylist()
    assert len(kept_keys) == 3
    (tar_url,) = summary["joined_files"]
    original = dict(wds_members(sample, 0, 10, "json"))
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(tar_url.removeprefix("s3://")))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == sorted(f"{k}.{ext}" for k in kept_keys
                                     for ext in ("jpg", "json", "iqray.json"))
    for key in kept_keys:
        assert members[f"{key}.jpg"] == original[f"{key}.jpg"]
        assert json.loads(members[f"{key}.iqray.json"])["keep"] is True


def test_filter_cli_reports_bad_rules_before_writing(ray_local, tmp_path, capsys):
    from pipeline_data import SAMPLE

    run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "scores"), model=TEST_MODEL,
                          progress=False), log=lambda *a: None)
    code = main(["filter", str(tmp_path / "scores"), str(tmp_path / "kept"),
                 "--where", "qualty > 3"])
    assert code == 2 and "unknown column 'qualty'" in capsys.readouterr().err
    assert not (tmp_path / "kept").exists()
    code = main(["filter", str(tmp_path / "scores"), str(tmp_path / "kept"), "--all-rows",
                 "--dedupe", "exact", "--per-pattern", r"^images/([^_]+)_", "--keep-top", "0.5"])
    assert code == 0
    table = pq.read_table(tmp_path / "kept" / "scores.parquet")
    assert table.num_rows == 32 and sum(table["keep"].to_pylist()) == 17  # ceil per generator
    summary = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert summary["groups"]["midjourney"] == {"kept": 5, "dropped": 4,
                                               "dropped_by_rule": {"below_top": 4}}
    with pytest.raises(SystemExit):
        main(["filter", str(tmp_path / "scores"), str(tmp_path / "kept"), "--keep-top", "2"])
