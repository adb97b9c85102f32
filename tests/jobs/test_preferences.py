"""`iqray preferences` on a real score run from S3: every format loads with `datasets`."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image
from pipeline_data import TEST_MODEL, wds_members, write_tar

from iqray.jobs.preferences import PreferencesConfig, run_preferences
from iqray.jobs.score import ScoreConfig, run_score


def test_preference_datasets_from_an_s3_score_run_load_with_datasets(
        ray_local, sample, s3_bucket, s3_endpoint, tmp_path):
    import datasets

    fs, bucket = s3_bucket
    # One tar with the sample's 8 prompts x 4 images; the images are read back from it.
    write_tar(fs, f"{bucket}/wds/shard-00000.tar", wds_members(sample, 0, 32, "json"))
    s3 = {"s3_endpoint": s3_endpoint}
    run_score(ScoreConfig(input=f"s3://{bucket}/wds", output=f"s3://{bucket}/scores",
                          model=TEST_MODEL, progress=False, **s3), log=lambda *a: None)
    with fs.open(f"{bucket}/scores/shard-00000.parquet", "rb") as handle:
        scores = pq.read_table(handle)
    quality_of = {r["image_sha256"]: r["quality"] for r in scores.to_pylist()}

    out = tmp_path / "prefs"
    summary = run_preferences(PreferencesConfig(
        input=f"s3://{bucket}/scores", output=str(out), strategy="margin", margin=0.001,
        max_uses=2, val_fraction=0.25, seed=3, **s3), log=lambda *a: None)
    assert summary["pairs"] > 0

    dpo = datasets.load_dataset(str(out), "dpo", cache_dir=str(tmp_path / "hf-cache"))
    assert dpo["train"].column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    for row in dpo["train"]:
        first, second = (hashlib.sha256(row[c]).hexdigest() for c in ("jpg_0", "jpg_1"))
        winner, loser = (first, second) if row["label_0"] == 1.0 else (second, first)
        assert row["label_0"] + row["label_1"] == 1.0
        assert quality_of[winner] - quality_of[loser] >= 0.001
    assert 0 < sum(r["label_0"] for r in dpo["train"]) < dpo["train"].num_rows  # both sides
    decoded = dpo["train"].cast_column("jpg_0", datasets.Image())[0]["jpg_0"]
    assert isinstance(decoded, Image.Image) and decoded.size == (512, 512)

    reward = datasets.load_dataset(str(out), "reward", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(reward) == ["train", "validation"]  # the split names datasets users expect
    train_prompts = set(reward["train"]["prompt"])
    assert train_prompts and not train_prompts & set(reward["validation"]["prompt"])
    uses = Counter(k for split in ("train", "validation") for c in ("key_chosen", "key_rejected")
                   for k in reward[split][c])
    assert max(uses.values()) <= 2
    row = reward["train"][0]
    assert isinstance(row["image_chosen"], Image.Image)
    assert row["score_chosen"] - row["score_rejected"] >= 0.001
    assert summary["counts"]["reward"]["train"] == reward["train"].num_rows

    pointwise = datasets.load_dataset(str(out), "pointwise", cache_dir=str(tmp_path / "hf-cache"))
    assert pointwise["train"].num_rows + pointwise["validation"].num_rows == 32
    image = pointwise["train"][0]["image"]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert isinstance(image, Image.Image) and buffer.tell() > 0
    card = (out / "README.md").read_text()
    assert "config_name: dpo" in card and TEST_MODEL in card and "margin" in card
