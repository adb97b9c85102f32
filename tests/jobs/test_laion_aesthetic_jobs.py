"""The LAION aesthetic predictor end to end: `iqray embed`, `train` (the head fitted on cached
embeddings of ratings), `score` from images and from the cache, `score_dataset`, `filter`,
`preferences`, `report`, `clean` and `info`, on a tiny random tower with a head in the
published layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from laion_layout import published_checkpoint
from pipeline_data import SAMPLE, img2dataset_table, write_parquet

import iqray.model
from iqray.jobs.cli import main
from iqray.jobs.embed import EmbedConfig, run_embed
from iqray.jobs.score import ScoreConfig, run_score
from iqray.jobs.train import TrainConfig, run_train

quiet = dict(progress=False)


def scores_of(folder) -> dict:
    (path,) = sorted(folder.rglob("*.parquet"))
    table = pq.read_table(path)
    return dict(zip(table["key"].to_pylist(), table["aesthetic"].to_pylist(), strict=True))


@pytest.fixture()
def checkpoint(tmp_path):
    published_checkpoint(tmp_path / "laion")
    return tmp_path / "laion"


def test_score_cache_dataset_and_the_dataset_jobs(ray_local, sample, checkpoint, tmp_path,
                                                  capsys):
    model = str(checkpoint)
    source = tmp_path / "in"
    write_parquet(None, str(source / "part-00000.parquet"), img2dataset_table(sample, 0, 12))

    assert run_score(ScoreConfig(input=str(source), output=str(tmp_path / "scores"),
                                 model=model, **quiet), log=lambda *a: None).ok == 12
    direct = scores_of(tmp_path / "scores")
    table = pq.read_table(next((tmp_path / "scores").rglob("*.parquet")))
    assert "prompt_truncated" not in table.column_names
    footer = json.loads(table.schema.metadata[b"iqray"])
    assert footer["outputs"] == ["aesthetic"] and footer["architecture"] == "laion-aesthetic"
    expected = iqray.model.load(model).score(img2dataset_table(sample, 0, 12)["jpg"].to_pylist())
    np.testing.assert_allclose(list(direct.values()), expected["aesthetic"], atol=1e-5)

    # --cache: re-scored from float32 embeddings without reading an image
    run_embed(EmbedConfig(input=str(source), cache=str(tmp_path / "cache"), model=model,
                          dtype="float32", **quiet), log=lambda *a: None)
    lines = []
    run_score(ScoreConfig(input=str(source), output=str(tmp_path / "rescored"), model=model,
                          cache=str(tmp_path / "cache"), **quiet), log=lines.append)
    assert any("1 shards rescored from the embedding cache" in line for line in lines), lines
    rescored = scores_of(tmp_path / "rescored")
    np.testing.assert_allclose(list(rescored.values()), list(direct.values()), atol=1e-5)

    # score_dataset: a user's own Ray Data pipeline
    import ray.data

    from iqray.pipeline import score_dataset

    rows = img2dataset_table(sample, 0, 12).select(["key", "jpg"]).to_pylist()
    out = score_dataset(ray.data.from_items(rows), model, image_column="jpg").take_all()
    got = {row["key"]: row["aesthetic"] for row in out}
    assert got.keys() == direct.keys()
    np.testing.assert_allclose([got[k] for k in direct], list(direct.values()), atol=1e-5)

    # filter, preferences, report: ranked by aesthetic, the run's only output
    assert main(["filter", str(tmp_path / "scores"), str(tmp_path / "kept"),
                 "--keep-top", "0.5"]) == 0
    kept = pq.read_table(tmp_path / "kept" / "scores.parquet")
    best = sorted(direct.values(), reverse=True)[:6]
    assert sorted(kept["aesthetic"].to_pylist(), reverse=True) == pytest.approx(best)
    assert main(["preferences", str(tmp_path / "scores"), str(tmp_path / "prefs"),
                 "--margin", "0"]) == 0
    card = (tmp_path / "prefs" / "README.md").read_text()
    assert "ranked by `aesthetic`" in card
    assert main(["report", str(tmp_path / "scores"), str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<h4>best aesthetic</h4>" in page and "<th>mean aesthetic</th>" in page

    # clean: score what is new, filter everything scored so far
    job = tmp_path / "nightly.yaml"
    job.write_text(yaml.safe_dump({"sources": [str(source)], "output": str(tmp_path / "clean"),
                                   "model": model, "progress": False,
                                   "rules": {"keep_top": 0.25}}))
    assert main(["clean", "--config", str(job)]) == 0
    manifest = pq.read_table(tmp_path / "clean" / "manifests" / "kept.parquet")
    assert sorted(manifest["aesthetic"].to_pylist(), reverse=True) == pytest.approx(best[:3])

    capsys.readouterr()
    assert main(["info", "--model", model]) == 0
    printed = capsys.readouterr().out
    assert "[laion-aesthetic (LAION improved aesthetic predictor" in printed
    assert "tower tower: iqray-tiny-ViT-32" in printed and "output aesthetic:" in printed


def test_train_fits_the_head_on_cached_embeddings_of_ratings(ray_local, sample, tmp_path):
    config = TrainConfig(input=str(SAMPLE / "prompts.csv"), val=str(SAMPLE / "prompts.csv"),
                         model="laion-aesthetic-tiny-random", cache=str(tmp_path / "cache"),
                         output=str(tmp_path / "run"), quality_column="mos_quality",
                         epochs=3, train_batch_size=8, image_path_column="name",
                         image_root=str(SAMPLE / "images"),
                         key_columns=["name"], **quiet)
    metrics = run_train(config, log=lambda *a: None)
    assert list(metrics["val_srcc"]) == ["aesthetic", "mean"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    with open(SAMPLE / "prompts.csv", newline="") as handle:
        mos = [float(row["mos_quality"]) for row in csv.DictReader(handle)]
    assert saved["model"]["trained"] is True
    assert saved["model"]["aesthetic_scale"] == {"low": pytest.approx(min(mos)),
                                                 "high": pytest.approx(max(mos))}
    assert saved["model"]["score_reference"]["aesthetic"]["n"] == 32
    trained = iqray.model.load(tmp_path / "run")
    assert sorted(trained.trainable_state_dict()) == sorted(
        f"layers.{n}.{p}" for n in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    scores = trained.score(sorted((SAMPLE / "images").iterdir())[:4])
    assert np.all(np.isfinite(scores["aesthetic"]))
