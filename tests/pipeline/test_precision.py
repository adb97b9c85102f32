"""`iqray score --precision int8`: gated on the input's first images, recorded in the footer,
scores equal to the quantised model's."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_data import SAMPLE, TEST_MODEL, read_output

import iqray.model
from iqray.jobs.score import ScoreConfig, run_score
from iqray.model.fastpath import apply_precision


def test_score_gates_int8_on_the_first_images_of_the_input(ray_local, tmp_path, sample_rows):
    summary = run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "int8"),
                                    model=iqray.model.DEFAULT_MODEL, precision="int8",
                                    progress=False), log=lambda *a: None)
    footer = json.loads(pq.read_schema(summary.outputs[0]).metadata[b"iqray"])
    check = footer["precision_check"]
    assert footer["precision"] == "int8" and check["passes"] and check["images"] == 32
    assert check["quality"]["spearman"] >= 0.999
    table = read_output(None, summary.outputs)
    by_name = {r["name"]: r for r in sample_rows}
    names = [k.removeprefix("images/") for k in table["key"].to_pylist()]
    fast = apply_precision(iqray.model.load(iqray.model.DEFAULT_MODEL), "int8")
    expected = fast.score([by_name[n]["path"] for n in names],
                          [by_name[n]["prompt"] for n in names])
    np.testing.assert_allclose(table["quality"].to_numpy(), expected["quality"], atol=1e-4)
    # The tiny random towers' scores barely vary: int8 reorders them, so it is refused.
    with pytest.raises(ValueError, match="changes this model's ranking"):
        run_score(ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "tiny"),
                              model=TEST_MODEL, precision="int8", progress=False),
                  log=lambda *a: None)


def test_score_with_compiled_towers_matches_the_eager_model(ray_local, tmp_path, sample_rows):
    """--compile: every actor compiles its image towers; the rows are the eager model's
    scores up to float rounding, and the run does not share resume identity with eager."""
    config = ScoreConfig(input=str(SAMPLE), output=str(tmp_path / "compiled"),
                         model=TEST_MODEL, compile=True, batch_size=16, progress=False)
    summary = run_score(config, log=lambda *a: None)
    assert summary.rows == summary.ok == len(sample_rows)
    table = read_output(None, summary.outputs)
    by_name = {r["name"]: r for r in sample_rows}
    names = [k.removeprefix("images/") for k in table["key"].to_pylist()]
    eager = iqray.model.load(TEST_MODEL).score([by_name[n]["path"] for n in names],
                                               [by_name[n]["prompt"] for n in names])
    for name in ("quality", "alignment"):
        np.testing.assert_allclose(table[name].to_numpy(), eager[name], rtol=1e-4, atol=1e-5)
    assert config.options_hash("m") != config.model_copy(update={"compile": False}
                                                          ).options_hash("m")
