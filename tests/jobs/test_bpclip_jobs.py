"""BPCLIP through the jobs: `iqray make-fr` -> `iqray train --mode fr` -> `iqray eval`, and
NR training from the CLI, on tiny random towers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from pipeline_data import SAMPLE

import iqray.model
from iqray.jobs.cli import main
from iqray.jobs.evaluate import EvalConfig, run_eval
from iqray.jobs.make_fr import MakeFRConfig, run_make_fr
from iqray.jobs.train import TrainConfig, run_train

MODEL = "bpclip-tiny-random"


@pytest.fixture(scope="module")
def fr_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("fr")
    summary = run_make_fr(MakeFRConfig(
        input=str(SAMPLE / "prompts.csv"), image_root=str(SAMPLE / "images"),
        image_path_column="name", output=str(out), sources=16, size=128, val_fraction=0.25,
        kinds=["blur", "noise"], progress=False), log=lambda *a: None)
    return out, summary


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_make_fr_writes_graded_pairs_split_by_source(fr_set):
    out, summary = fr_set
    train, val = read_rows(out / "train.csv"), read_rows(out / "val.csv")
    assert summary["sources"] == {"train": 12, "val": 4}
    assert len(train) == 12 * 11 and len(val) == 4 * 11  # level 0 + 2 kinds x 5 levels
    assert not {r["source"] for r in train} & {r["source"] for r in val}
    for row in train + val:
        assert float(row["quality"]) == 5 - int(row["level"])
        assert (out / row["image_path"]).is_file() and (out / row["reference"]).is_file()
        if row["level"] == "0":
            assert row["image_path"] == row["reference"]
    def detail(path):  # mean absolute horizontal gradient
        with Image.open(out / path) as image:
            assert image.size == (128, 128)
            return np.abs(np.diff(np.asarray(image.convert("L"), float), axis=1)).mean()

    for kind in ("blur", "noise"):
        worst = [r for r in train if r["distortion"] == kind and r["level"] == "5"]
        assert len(worst) == 12
        ratio = np.mean([detail(r["image_path"]) / detail(r["reference"]) for r in worst])
        assert ratio < 0.6 if kind == "blur" else ratio > 1.5  # blur removes detail, noise adds
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] == 2 * 128  # one row per kind
    # Deterministic: the same seed picks the same sources.
    assert summary == json.loads((out / "make_fr.json").read_text())


def test_fr_trains_on_the_set_and_eval_reproduces_the_held_apart_srcc(fr_set, tmp_path):
    out, _ = fr_set
    columns = dict(image_path_column="image_path", reference_column="reference",
                   quality_column="quality", quality_range=(0.0, 5.0))
    metrics = run_train(TrainConfig(
        input=str(out / "train.csv"), val=str(out / "val.csv"), model=MODEL, mode="fr",
        output=str(tmp_path / "run"), epochs=8, lr=3e-3, train_batch_size=16,
        progress=False, **columns), log=lambda *a: None)
    held_apart = metrics["val_srcc"]["quality"]["mean"]
    assert held_apart > 0.6  # SRCC with the distortion level, on unseen source images
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["architecture"] == "bpclip" and saved["model"]["mode"] == "fr"
    assert not (tmp_path / "run" / "towers").exists()  # frozen backbone: heads only
    assert saved["model"]["score_reference"]["quality"]["n"] == 12 * 11
    model = iqray.model.load(tmp_path / "run")
    assert model.full_reference and not model.zero_shot

    columns.pop("quality_range")
    report = run_eval(EvalConfig(input=str(out / "val.csv"), model=str(tmp_path / "run"),
                                 mode="fr", output=str(tmp_path / "eval"), bootstrap=50,
                                 group_column="distortion", progress=False, **columns),
                      log=lambda *a: None)
    assert list(report["heads"]) == ["quality"]
    assert report["heads"]["quality"]["srcc"] == pytest.approx(held_apart, abs=1e-4)
    assert set(report["heads"]["quality"]["groups"]) == {"none", "blur", "noise"}
    assert (tmp_path / "eval" / "scatter.png").is_file()


def test_nr_trains_from_the_cli(tmp_path, capsys):
    code = main(["train", str(SAMPLE / "prompts.csv"), "--val", str(SAMPLE / "prompts.csv"),
                 "--image-root", str(SAMPLE / "images"), "--image-path-column", "name",
                 "--model", MODEL, "--epochs", "2", "--no-progress",
                 "--output", str(tmp_path / "nr")])
    assert code == 0
    assert "val SRCC (mean +- std over seeds): quality" in capsys.readouterr().err
    model = iqray.model.load(tmp_path / "nr")
    assert not model.full_reference and not model.zero_shot
    assert model.score([SAMPLE / "images" / next((SAMPLE / "images").iterdir()).name]
                       )["quality"].shape == (1,)
    assert main(["train", str(SAMPLE / "prompts.csv"), "--val", str(SAMPLE / "prompts.csv"),
                 "--model", MODEL, "--towers", "finetune", "--output",
                 str(tmp_path / "x")]) == 2
