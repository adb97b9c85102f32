"""A new architecture is one registration: a scorer defined outside the package
(``tests/support/made_up_scorer.py``: two made-up outputs, the primary one lower-is-better,
no prompt, no towers) goes through load, `iqray info`, `iqray score`, `filter` and `report`
with nothing in iqray changed for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_data import SAMPLE

import iqray.model
from iqray.jobs.cli import main
from iqray.model import registry

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"


@pytest.fixture()
def made_up(monkeypatch, tmp_path) -> Path:
    """The made-up architecture registered the way a user's plugin is (the environment
    variable, imported on first lookup) for this test only; its model as a bare config."""
    monkeypatch.setattr(registry, "ARCHITECTURES", dict(registry.ARCHITECTURES))
    monkeypatch.setattr(registry, "_plugins_loaded", set())
    monkeypatch.setenv(registry.PLUGINS_ENV, "made_up_scorer")
    monkeypatch.delitem(sys.modules, "made_up_scorer", raising=False)
    folder = tmp_path / "made-up-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "made-up"}))
    return folder / "config.json"


def test_a_registered_architecture_loads_scores_and_describes_itself(made_up, capsys):
    assert "made-up" not in registry.ARCHITECTURES  # nothing until first looked up
    model = iqray.model.load(made_up)
    assert registry.architecture(model).name == "made-up"
    assert isinstance(model, iqray.model.ScoringModel)
    images = sorted((SAMPLE / "images").iterdir())[:5]
    scores = model.score(images)
    assert sorted(scores) == ["clutter", "colourfulness"]
    for name, spec in model.score_range.items():
        assert scores[name].dtype == np.float32 and scores[name].shape == (5,)
        assert np.all((scores[name] >= spec.low) & (scores[name] <= spec.high))
    # one at a time or all together: the same scores
    single = model.score(images[2])
    assert single["clutter"][0] == pytest.approx(scores["clutter"][2], abs=1e-6)
    assert model.score([])["clutter"].shape == (0,)
    assert main(["info", "--model", str(made_up)]) == 0
    printed = capsys.readouterr().out
    assert "[made-up (none (a test's)), zero-shot, checkpoint]" in printed
    assert "output clutter: [0, 2], lower is better" in printed


def test_a_registered_architecture_runs_through_score_filter_and_report(made_up, tmp_path):
    scores = tmp_path / "scores"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "iqray.jobs.cli", "score", str(SAMPLE), str(scores),
         "--model", str(made_up), "--ray-num-cpus", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (output,) = [p for p in scores.rglob("*.parquet")]
    table = pq.read_table(output)
    assert table.column_names == ["key", "source_file", "source_row", "prompt", "image_sha256",
                                  "clutter", "colourfulness", "status", "error", "error_kind"]
    footer = json.loads(table.schema.metadata[b"iqray"])
    assert footer["architecture"] == "made-up"
    assert footer["outputs"] == ["clutter", "colourfulness"]
    assert footer["score_range"]["clutter"]["higher_better"] is False
    assert table["status"].to_pylist() == ["ok"] * 32
    # the same numbers as the model in this process
    model = iqray.model.load(made_up)
    direct = model.score([SAMPLE / p for p in table["source_file"].to_pylist()])
    np.testing.assert_allclose(table["clutter"].to_numpy(), direct["clutter"], atol=1e-6)

    # filter: the default ranking is the primary score in its own direction (least clutter)
    assert main(["filter", str(scores), str(tmp_path / "kept"), "--keep-top", "0.25"]) == 0
    kept = pq.read_table(tmp_path / "kept" / "scores.parquet")
    clutter = np.sort(table["clutter"].to_numpy())
    assert kept.num_rows == 8
    assert sorted(kept["clutter"].to_pylist()) == pytest.approx(clutter[:8].tolist())
    assert {"clutter_percentile", "colourfulness_percentile"} <= set(kept.column_names)
    assert min(kept["clutter_percentile"].to_pylist()) >= 0.75  # 1 = best: least clutter

    # report: every output shown, best and worst by the primary score in its direction
    page = tmp_path / "report.html"
    assert main(["report", str(scores), str(page), "--grid-size", "2"]) == 0
    text = page.read_text()
    assert "<h4>best clutter</h4>" in text and "<h4>worst clutter</h4>" in text
    assert "<th>mean clutter</th><th>mean colourfulness</th>" in text
    assert "<td>clutter</td><td>0 – 2</td><td>lower is better</td>" in text
    least = table["source_file"].to_pylist()[int(np.argmin(table["clutter"].to_numpy()))]
    best = text[text.index("<h4>best clutter</h4>"):text.index("<h4>worst clutter</h4>")]
    assert least.split("/")[-1] in best
