"""`iqray bench` smoke run on tiny towers: every measurement, ratios, JSON/PNG/MD outputs."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pipeline_data import TEST_MODEL

from iqray.jobs.bench import BenchConfig, run_bench


def test_bench_measures_all_three_ways_and_writes_its_outputs(ray_local, tmp_path):
    lines = []
    results = run_bench(BenchConfig(model=TEST_MODEL, images=12, images_per_prompt=4,
                                    batch_size=4, actors=[1], precisions=["fp32", "int8"],
                                    fidelity_models=[], output=str(tmp_path / "b")),
                        log=lines.append)
    written = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(results["limit"]) == {"fp32", "int8"}
    assert results["dataloader"]["fp32"]["images_per_s"] > 0
    runs = {(r["actors"], r["precision"]): r for r in results["pipeline"]}
    assert set(runs) == {(1, "fp32"), (1, "int8")}
    for run in runs.values():
        assert run["rows"] == 12 and run["images_per_s"] > 0
        assert set(run["stage_busy_s"]) == {"read", "decode", "model", "write"}
        assert run["bottleneck"].split("-")[0] in run["stage_busy_s"]
    limit = results["limit"]["fp32"]["images_per_s"]
    assert results["ratios"]["pipeline_over_limit"] == pytest.approx(
        runs[(1, "fp32")]["steady_images_per_s"] / limit)
    (check,) = results["fidelity"]
    assert check["precision"] == "int8" and check["images"] == 12
    assert check["passes"] == all(check[k]["spearman"] >= 0.999
                                  for k in ("quality", "alignment"))
    table = (tmp_path / "b" / "bench.md").read_text()
    assert table.count("| 3. iqray score") == 4 and "| 1. limit" in table
    with Image.open(tmp_path / "b" / "bench.png") as png:
        assert png.size[0] > 600
    assert any(line.startswith("pipeline_over_limit:") for line in lines)
