"""`iqray train`: losses, selection on validation only, repeats, outputs."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pipeline_data import TEST_MODEL

import iqray.model
from iqray.jobs.train import TrainConfig, run_train
from iqray.model.training import HeadData, TrainSettings, fit_heads, head_loss, ranking_hinge
from iqray.pipeline.io.embed_cache import EmbeddingCache

SAMPLE_COLUMNS = dict(image_path_column="name", key_columns=["name"])


def test_ranking_hinge_counts_misordered_pairs_within_the_margin():
    target = torch.tensor([0.0, 0.5, 1.0])
    assert float(ranking_hinge(torch.tensor([0.0, 0.5, 1.0]), target, 0.1)) == 0.0
    reversed_pred = torch.tensor([1.0, 0.5, 0.0])
    # pairs (1>0, 2>0, 2>1): pred differences -0.5, -1.0, -0.5 -> hinge 0.6, 1.1, 0.6
    assert float(ranking_hinge(reversed_pred, target, 0.1)) == pytest.approx(2.3 / 3)
    assert float(ranking_hinge(torch.tensor([0.0, 0.05]), torch.tensor([0.0, 1.0]), 0.1)) == \
        pytest.approx(0.05)
    # Ties carry no ranking information.
    assert float(ranking_hinge(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), 0.1)) == 0.0


def test_head_loss_ignores_rows_without_a_target():
    pred = torch.tensor([0.2, 0.9, 0.4])
    target = torch.tensor([0.2, float("nan"), 0.5])
    expected = ((0.0**2 + 0.1**2) / 2) + 1.0 * max(0.0, 0.1 - (0.4 - 0.2))
    assert float(head_loss(pred, target, 0.1, 1.0)) == pytest.approx(expected)


def sample_head_data(model, sample, rows, seed=0):
    names, images, prompts = sample
    with torch.inference_mode():
        pixels = torch.stack([model.transform.load(images[i]) for i in rows])
        coarse, fine = model.encode_images(pixels)
    # A learnable synthetic target: a fixed direction of the coarse embedding.
    direction = torch.randn(coarse.shape[1], generator=torch.Generator().manual_seed(seed))
    score = torch.sigmoid(3 * torch.nn.functional.normalize(coarse, dim=-1) @ direction)
    return HeadData((coarse.clone(), fine.clone()), [prompts[i] for i in rows],
                    {"quality": score, "alignment": score.flip(0)})


def test_training_lowers_the_loss_and_keeps_the_best_validation_epoch(sample):
    model = iqray.model.load(TEST_MODEL)
    train = sample_head_data(model, sample, range(0, 24))
    val = sample_head_data(model, sample, range(24, 32))
    settings = TrainSettings(epochs=8, train_batch_size=8, lr=3e-3)
    result = fit_heads(model, train, val, settings, seed=0)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    best = max(result.history, key=lambda h: h["val_srcc_mean"])
    assert result.best_epoch == best["epoch"]
    assert not model.zero_shot
    # The model holds the selected epoch's weights.
    for name, value in result.state.items():
        torch.testing.assert_close(model.trainable_state_dict()[name], value)
    # Same seed, same run.
    again = fit_heads(model, train, val, settings, seed=0)
    assert [h["train_loss"] for h in again.history] == losses


def test_training_refuses_to_choose_without_a_defined_validation_metric(sample):
    from iqray.model.training import ValidationUndefined

    model = iqray.model.load(TEST_MODEL)
    train = sample_head_data(model, sample, range(0, 24))
    settings = TrainSettings(epochs=2, train_batch_size=8, lr=3e-3)
    constant = sample_head_data(model, sample, range(24, 32))
    constant.targets = {k: torch.full_like(v, 0.5) for k, v in constant.targets.items()}
    with pytest.raises(ValidationUndefined, match="undefined in all 2 epochs"):
        fit_heads(model, train, constant, settings, seed=0)  # SRCC of a constant: NaN
    with pytest.raises(ValidationUndefined, match="2 validation rows"):
        fit_heads(model, train, sample_head_data(model, sample, range(24, 26)), settings,
                  seed=0)


def test_train_job_with_undefined_validation_exits_2_and_writes_no_checkpoint(
        ray_local, tmp_path, sample, capsys):
    from iqray.jobs.cli import main

    folder, _ = write_split_table(tmp_path, sample)
    table = pa_csv.read_csv(folder / "all.csv")
    is_val = pa.compute.equal(table["split"], "val")
    constant = pa.compute.if_else(is_val, 3.0, table["mos_quality"])
    pa_csv.write_csv(table.set_column(table.schema.get_field_index("mos_quality"),
                                      "mos_quality", constant), folder / "all.csv")
    code = main(["train", str(folder / "all.csv"), "--split-column", "split", "--model",
                 TEST_MODEL, "--cache", str(tmp_path / "cache"), "--output",
                 str(tmp_path / "run"), "--epochs", "2", "--no-progress",
                 "--image-path-column", "name", "--key-columns", "name"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "every validation rating in 'mos_quality' is 3" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_auxiliary_group_loss_shapes_training_and_needs_train_groups_only(sample):
    model = iqray.model.load("mst-clipiqa-tiny-random")
    train = sample_head_data(model, sample, range(0, 24))
    val = sample_head_data(model, sample, range(24, 32))  # no groups: never needed
    settings = TrainSettings(epochs=3, train_batch_size=8, lr=3e-3, group_weight=1.0)
    with pytest.raises(ValueError, match="at least two groups"):
        fit_heads(model, train, val, settings, seed=0)
    train.groups = torch.arange(24) % 3
    with_groups = fit_heads(model, train, val, settings, seed=0)
    without = fit_heads(model, train, val, settings.model_copy(update={"group_weight": 0.0}),
                        seed=0)
    # The cross-entropy term is part of the loss, and it moves the heads.
    assert with_groups.history[0]["train_loss"] > without.history[0]["train_loss"] + 0.5
    assert not torch.equal(with_groups.state["fusion.hidden.weight"],
                           without.state["fusion.hidden.weight"])


def write_split_table(tmp_path, sample):
    """train/val/test rows in one table; the test rows' images exist and are unique, so
    reading them would put them in the cache."""
    names, images, prompts = sample
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i, name in enumerate(names):
        (folder / name).write_bytes(images[i])
        split = "train" if i < 20 else "val" if i < 28 else "test"
        rows.append({"name": name, "prompt": prompts[i], "split": split,
                     "mos_quality": float(i % 7), "mos_align": float((i * 3) % 5)})
    test_images = []
    for i in range(4):
        image = Image.new("RGB", (64, 64), (i * 60, 10, 10))
        path = folder / f"held-out-{i}.png"
        image.save(path)
        test_images.append(hashlib.sha256(path.read_bytes()).hexdigest())
        rows.append({"name": path.name, "prompt": "held out", "split": "test",
                     "mos_quality": 4.0, "mos_align": 4.0})
    table = pa.Table.from_pylist(rows)
    pa_csv.write_csv(table, folder / "all.csv")
    return folder, test_images


def test_train_job_reads_only_train_and_val_rows_and_reports_mean_and_std(
        ray_local, tmp_path, sample):
    folder, test_images = write_split_table(tmp_path, sample)
    config = TrainConfig(input=str(folder / "all.csv"), split_column="split", model=TEST_MODEL,
                         cache=str(tmp_path / "cache"), output=str(tmp_path / "run"),
                         epochs=3, train_batch_size=8, repeats=2, progress=False,
                         **SAMPLE_COLUMNS)
    metrics = run_train(config, log=lambda *a: None)
    cache = EmbeddingCache(str(tmp_path / "cache"))
    cached = cache.image_keys()
    assert len(cached) == 28 and not cached & set(test_images)
    assert metrics["rows"] == {"train": 20, "val": 8}
    quality = metrics["val_srcc"]["quality"]
    assert quality["n"] == 2 and math.isfinite(quality["mean"]) and quality["std"] >= 0
    assert [r["seed"] for r in metrics["repeats"]] == [0, 1]

    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["trained"] and saved["data_hash"]
    assert saved["model"]["quality_scale"] == {"low": 0.0, "high": 6.0}
    # The reference set z-scores are measured against: the selected model on its train rows.
    reference = saved["model"]["score_reference"]
    assert reference["quality"]["n"] == 20 and reference["quality"]["std"] > 0
    assert json.loads((run / "metrics.json").read_text())["history"]
    with Image.open(run / "training_curves.png") as png:
        assert png.size[0] > 400
    model = iqray.model.load(run)
    scores = model.score([folder / sample[0][0]], [sample[2][0]])
    assert 0.0 <= scores["quality"][0] <= 6.0 and np.isfinite(scores["alignment"][0])


def test_train_needs_exactly_one_way_to_split(tmp_path):
    with pytest.raises(ValueError, match="either --val"):
        TrainConfig(input="a.csv", cache=str(tmp_path))
    with pytest.raises(ValueError, match="either --val"):
        TrainConfig(input="a.csv", val="b.csv", split_column="split", cache=str(tmp_path))


def test_distortion_pretraining_is_logged_recorded_and_plotted(tmp_path):
    from pipeline_data import SAMPLE

    def train(name: str, **extra) -> tuple[list[str], dict, tuple[int, int]]:
        config = TrainConfig(input=str(SAMPLE / "prompts.csv"), val=str(SAMPLE / "prompts.csv"),
                             model=TEST_MODEL, image_root=str(SAMPLE / "images"),
                             towers="finetune", epochs=1, train_batch_size=16, repeats=2,
                             output=str(tmp_path / name), progress=False,
                             cache=str(tmp_path / "cache"), **SAMPLE_COLUMNS, **extra)
        lines: list[str] = []
        run_train(config, log=lines.append)
        with Image.open(tmp_path / name / "training_curves.png") as png:
            size = png.size
        return lines, json.loads((tmp_path / name / "metrics.json").read_text()), size

    lines, metrics, size = train("pretrained", pretrain_distortions=2)
    assert metrics["settings"]["pretrain_distortions"] == 2
    assert sorted(metrics["pretrain_history"]) == ["0", "1"]  # one record per epoch and seed
    assert all([r["epoch"] for r in history] == [1, 2]
               for history in metrics["pretrain_history"].values())
    assert sum("distortion pretraining, 2 epochs" in line for line in lines) == 2
    # Without bars every epoch is a log line, pretraining first, in order, per seed.
    epochs = [line.split(",")[0] for line in lines if ": epoch " in line]
    assert epochs == [f"seed {seed}{stage}: epoch {epoch}/{total}" for seed in (0, 1)
                      for stage, total in ((" distortion pretraining", 2), ("", 1))
                      for epoch in range(1, total + 1)]
    assert "accuracy" in next(line for line in lines if "pretraining: epoch" in line)
    assert "val_srcc q " in next(line for line in lines if "seed 0: epoch 1/1" in line)
    plain_lines, plain, plain_size = train("plain")
    assert "pretrain_history" not in plain
    assert not any("distortion pretraining" in line for line in plain_lines)
    assert size[0] > plain_size[0]  # a third panel: pretraining accuracy per tower
    assert metrics["val_srcc"] != plain["val_srcc"]  # the towers started elsewhere


def test_distortion_pretraining_needs_trainable_towers(tmp_path):
    with pytest.raises(ValueError, match="--pretrain-distortions .* needs --towers finetune"):
        TrainConfig(input="a.csv", val="b.csv", cache=str(tmp_path), pretrain_distortions=1)


def test_finetune_trains_small_towers_end_to_end_and_ships_them(ray_local, tmp_path, sample,
                                                                 sample_rows):
    from pipeline_data import SAMPLE, read_output

    from iqray.jobs.score import ScoreConfig, run_score

    config = TrainConfig(input=str(SAMPLE / "prompts.csv"), val=str(SAMPLE / "prompts.csv"),
                         model=TEST_MODEL,
                         image_root=str(SAMPLE / "images"), towers="finetune", epochs=2,
                         train_batch_size=16, output=str(tmp_path / "run"), progress=False,
                         cache=str(tmp_path / "unused-cache"), group_pattern=r"^([^_]+)_",
                         group_weight=0.5, **SAMPLE_COLUMNS)
    lines = []
    run_train(config, log=lines.append)
    assert any(line.startswith("auxiliary groups (") for line in lines)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["coarse"]["pretrained"] == "towers/coarse.safetensors"
    assert not (tmp_path / "unused-cache").exists()  # end to end: no embedding cache
    trained = iqray.model.load(run)
    untrained = iqray.model.load(TEST_MODEL)
    before = dict(untrained.coarse.named_parameters())
    unchanged = [n for n, p in trained.coarse.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == ["logit_scale"]  # CLIP's own logit scale is unused; all else trained
    size = sum(p.stat().st_size for p in run.rglob("*.safetensors"))
    assert size < 25 * 2**20

    # The shipped towers travel through the pipeline too.
    summary = run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "out"),
                                    model=str(run), progress=False), log=lambda *a: None)
    out = read_output(None, summary.outputs)
    by_name = {r["name"]: r for r in sample_rows}
    names = [k.removeprefix("images/") for k in out["key"].to_pylist()]
    expected = trained.score([by_name[n]["path"] for n in names],
                             [by_name[n]["prompt"] for n in names])
    np.testing.assert_allclose(out["quality"].to_numpy(), expected["quality"], atol=1e-5)

    # Its reference set travels with the scores: `iqray filter` adds z-scores against it.
    from iqray.jobs.filter import FilterConfig, run_filter

    run_filter(FilterConfig(input=str(tmp_path / "out"), output=str(tmp_path / "kept")),
               log=lambda *a: None)
    kept = pq.read_table(tmp_path / "kept" / "scores.parquet")
    stats = trained.config.score_reference["quality"]
    np.testing.assert_allclose(kept["quality_z"].to_numpy(),
                               (kept["quality"].to_numpy() - stats["mean"]) / stats["std"],
                               rtol=1e-5)
