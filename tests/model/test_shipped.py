"""The offline model that ships in the package: loads, scores, fits the size budget."""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import spearmanr

import iqray.model


def test_the_shipped_model_is_the_default_and_scores_the_sample(sample_rows):
    shipped = iqray.model.shipped_models()
    assert iqray.model.DEFAULT_MODEL in shipped
    directory = shipped[iqray.model.DEFAULT_MODEL]
    files = list(directory.rglob("*"))
    assert all(f.suffix in (".json", ".safetensors") for f in files if f.is_file())
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 25 * 2**20
    config = json.loads((directory / "config.json").read_text())
    # Chosen on validation only; its val numbers and the reference set travel with it.
    assert config["metrics"]["val_srcc"]["quality"]["n"] >= 2
    assert config["model"]["score_reference"]["quality"]["n"] == 2092

    model = iqray.model.load(iqray.model.DEFAULT_MODEL)
    assert model.mode == "trained" and model.transform.fine_resize == 512
    scores = model.score([r["path"] for r in sample_rows], [r["prompt"] for r in sample_rows])
    assert np.all((scores["quality"] >= 0) & (scores["quality"] <= 5))
    # The sample is drawn from the training split, so a trained model must rank it the way
    # people did; random or broken weights do not (the tiny random model: |SRCC| < 0.3).
    mos = np.array([float(r["mos_quality"]) for r in sample_rows])
    assert spearmanr(scores["quality"], mos).statistic > 0.6
    mos_align = np.array([float(r["mos_align"]) for r in sample_rows])
    assert spearmanr(scores["alignment"], mos_align).statistic > 0.4
