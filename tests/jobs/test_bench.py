"""`iqray bench` smoke run on tiny towers: every measurement, ratios, JSON/PNG/MD outputs."""

from __future__ import annotations

import json

import pytest
from iqray_bench import BenchConfig, run_bench
from PIL import Image
from pipeline_data import SAMPLE, TEST_MODEL


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
    runs = {(r["actors"], r["precision"], r["decode"]): r for r in results["pipeline"]}
    assert set(runs) == {(1, "fp32", "cpu"), (1, "int8", "cpu"), (1, "fp32", "device")}
    for run in runs.values():
        assert run["rows"] == 12 and run["images_per_s"] > 0
        assert set(run["stage_busy_s"]) == {"read", "decode", "model", "write"}
        assert run["bottleneck"].split("-")[0] in run["stage_busy_s"]
    limit = results["limit"]["fp32"]["images_per_s"]
    assert results["ratios"]["pipeline_over_limit"] == pytest.approx(
        runs[(1, "fp32", "cpu")]["steady_images_per_s"] / limit)
    assert results["ratios"]["pipeline_decode_device_over_fp32_limit"] == pytest.approx(
        runs[(1, "fp32", "device")]["steady_images_per_s"] / limit)
    quantised, decoded = results["fidelity"]
    assert quantised["precision"] == "int8" and quantised["images"] == 12
    assert decoded["decode"] == "device" and decoded["device"] == "cpu"
    assert decoded["images"] == 12  # the sample is all JPEG
    for check in (quantised, decoded):
        assert check["passes"] == all(check[k]["spearman"] >= 0.999
                                      for k in ("quality", "alignment"))
    profile = results["profile"]["model"]
    assert profile["batch"] == 4 and profile["distinct_prompts"] == 1
    # every tower the model scores with is timed on its own, none twice
    assert {"coarse.visual", "coarse.transformer", "fine_visual"} <= set(profile["stage_s"])
    assert sum(profile["stage_s"].values()) == pytest.approx(profile["seconds"], rel=0.01)
    assert sum(profile["op_kind_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert profile["op_kind_share"]["matmul / linear"] > 0
    assert results["profile"]["decode"]["seconds_per_image"] > 0
    loader = results["dataloader"]["fp32"]
    assert loader["model_s"] + loader["waiting_for_loader_s"] == pytest.approx(
        loader["seconds"])
    assert results["ratios"]["pipeline_over_dataloader_ceiling"] == pytest.approx(
        loader["seconds"] / loader["model_s"])
    table = (tmp_path / "b" / "bench.md").read_text()
    assert table.count("| 3. iqray score") == 6 and "| 1. limit" in table
    assert "decode on device, steady |" in table
    assert "| fine_visual |" in table and "| op kind (self CPU time) | share |" in table
    with Image.open(tmp_path / "b" / "bench.png") as png:
        assert png.size[0] > 600
    assert any(line.startswith("pipeline_over_limit:") for line in lines)


@pytest.mark.parametrize(("op", "kind"), [
    ("aten::addmm", "matmul / linear"), ("aten::mm", "matmul / linear"),
    ("quantized::linear_dynamic", "matmul / linear"), ("aten::bmm", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_softmax", "attention"), ("aten::mkldnn_convolution", "convolution"),
    ("aten::native_layer_norm", "normalisation"), ("aten::gelu", "activation"),
    ("aten::copy_", "copies / layout"), ("aten::upsample_bilinear2d", "other")])
def test_profile_groups_ops_by_the_work_they_do(op, kind):
    from iqray_bench.measure import op_kind

    assert op_kind(op) == kind


def test_scale_rescoring_reads_the_right_embeddings_for_every_shard(ray_local, tmp_path):
    """The scale measurement's synthetic cache, re-scored: every row's scores are the heads
    applied to that row's own cached embedding and prompt (found through the key index)."""
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq
    from iqray_bench import measure as bench

    import iqray.model
    from iqray.pipeline.io.embed_cache import EmbeddingCache

    root = bench.synthetic_cached_input(tmp_path / "scale", TEST_MODEL, rows=2500,
                                        shard_rows=1000, distinct_prompts=7)
    assert len(list((root / "input").glob("*.parquet"))) == 3
    result = bench.bench_rescore(TEST_MODEL, root, 2500)
    assert result["rows"] == 2500 and result["peak_pss_bytes"] > 0
    scores = pq.read_table(root / "scores").sort_by("key")
    assert scores.num_rows == 2500 and set(scores["status"].to_pylist()) == {"ok"}
    keys = scores["key"].to_pylist()
    shas = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    cache = EmbeddingCache(str(root / "cache"))
    coarse, fine = cache.load_images(shas[::-1])  # any order: the index finds each row
    model = iqray.model.load(TEST_MODEL)
    prompts = [f"synthetic prompt {(int(k) // 4) % 7}: a photo of object {(int(k) // 4) % 7 % 97}"
               f" in style {(int(k) // 4) % 7 % 13}" for k in keys][::-1]
    model.prime_prompt_cache(cache.load_prompts(set(prompts)))
    expected = model.score_embeddings(coarse, fine, prompts)
    np.testing.assert_allclose(scores["quality"].to_numpy()[::-1], expected["quality"],
                               atol=1e-5)
    np.testing.assert_allclose(scores["alignment"].to_numpy()[::-1], expected["alignment"],
                               atol=1e-5)


def test_image_scale_run_scores_every_row_and_measures_the_whole_cluster(ray_local, tmp_path):
    """The scale-images measurement: every synthetic row scored ok, memory summed over the
    driver and the Ray processes it started, object-store peak read from Ray."""
    results = run_bench(BenchConfig(measure=["scale-images"], scale_image_rows=[300, 600],
                                    scale_image_batch_size=32, scale_prompts=50,
                                    output=str(tmp_path / "s")), log=lambda *a: None)
    runs = results["scale_images"]
    assert [r["rows"] for r in runs] == [300, 600]
    for run in runs:
        assert run["processes"] > 2  # driver, GCS, raylet, workers
        assert run["peak_pss_bytes"] > 0 and run["peak_object_store_bytes"] is not None
        assert run["bottleneck"]
    written = json.loads((tmp_path / "s" / "scale.json").read_text())
    assert written["scale_images"] == json.loads(json.dumps(runs))
    table = (tmp_path / "s" / "scale.md").read_text()
    assert "Image pipeline" in table and "| 600 |" in table


def test_process_tree_finds_children_and_their_memory():
    import os
    import subprocess
    import sys

    from iqray_bench.measure import _pss, process_tree

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree(os.getpid())
        assert os.getpid() in tree and child.pid in tree
        assert _pss(child.pid) > 0
    finally:
        child.kill()
        child.wait()
    assert child.pid not in process_tree(os.getpid())


def test_decode_bench_records_every_format_size_and_mode(tmp_path, sample):
    import shutil

    names = sample[0][:3]
    (tmp_path / "src").mkdir()
    for name in names:
        shutil.copy(SAMPLE / "images" / name, tmp_path / "src" / name)
    run_bench(BenchConfig(measure=["decode"], decode_images=3, source=str(tmp_path / "src"),
                          decode_models=[TEST_MODEL], output=str(tmp_path / "b")),
              log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["decode.json", "decode.md"]
    records = json.loads((tmp_path / "b" / "decode.json").read_text())
    cases = {(r["format"], r["size"], r["mode"]) for r in records}
    assert len(records) == len(cases) == 3 * 3 + 2 * 2  # JPEG 3 sizes x 3 modes, PNG, WebP
    assert {("jpeg", 512, "device"), ("jpeg", 2048, "fast"), ("png", 1024, "fast")} <= cases
    for record in records:
        assert record["images_per_s_per_core"] > 0 and record["images"] == 3
        assert (record["spearman_vs_full"] is None) == (record["mode"] != "fast")
    fast = {(r["format"], r["size"]): r["fidelity"][TEST_MODEL] for r in records
            if r["mode"] == "fast"}
    assert fast[("jpeg", 1024)]["reduced"] == 3 and fast[("png", 1024)]["reduced"] == 0
    assert [r["images_from"] for r in records[:3]] == ["real"] * 3
    assert "| jpeg | 2048 | upscaled | fast |" in (tmp_path / "b" / "decode.md").read_text()


def test_gpu_bench_script_smoke_runs_every_measurement_and_writes_its_files(tmp_path):
    """scripts/gpu_bench.sh --smoke: the GPU machine's one command, end to end on tiny towers
    (its own Ray in each step, as on the GPU machine)."""
    import os
    import subprocess
    import sys

    from pipeline_data import REPO

    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh"), "--smoke"],
                          env={**os.environ, "IQRAY_PYTHON": sys.executable,
                               "IQRAY_BENCH_OUTPUT": str(out)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"bench.json", "bench.md", "bench.png", "score_runs.json", "score_runs.md",
            "decode.json", "decode.md", "overhead.json", "overhead.md"} <= {
        p.name for p in out.iterdir()}
    runs = json.loads((out / "score_runs.json").read_text())["runs"]
    assert [(r["batch_size"], r["decode"], r["compile"]) for r in runs] == [
        (8, "cpu", False), (16, "fast", False)]
    assert all(r["images"] == 24 and r["steady_images_per_s"] > 0 for r in runs)
    overhead = json.loads((out / "overhead.json").read_text())
    assert [(r["commit"], r["decode_batch_size"]) for r in overhead["runs"]] == [
        ("driver", 32), ("actors", 32)]
    for run in overhead["runs"]:
        assert run["rows"] == 300 and 0 < run["driver_share"] < 1
        assert run["driver_ceiling_rows_per_s"] > 0
        assert list(run["timeline"])[-3:] == ["first_row", "last_row", "finished"]
    assert overhead["startup"]["timeline"]["first_row"] > 0
    assert set(overhead["stages"]["cpu_s_per_1000_rows"]) >= {"read", "write (split by "
                                                              "shard, Parquet, commit)"}
    assert overhead["projection"]["rows_per_s_needed"] == 64 * 5000
    assert "driver ceiling" in (out / "overhead.md").read_text()


def test_score_runs_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="BATCH:DECODE"):
        BenchConfig(measure=["score-runs"], score_runs=["256:gpu"])


def test_bench_without_the_source_tree_asks_for_a_source_in_one_line(monkeypatch, tmp_path,
                                                                     capsys):
    import iqray_bench as bench_job

    from iqray.jobs.cli import main

    assert bench_job.BenchConfig().source == str(bench_job.REPO_SAMPLE)  # from a checkout
    # installed from a wheel: the package's folder has no examples/ beside it
    monkeypatch.setattr(bench_job, "REPO_SAMPLE", tmp_path / "site-packages" / "examples")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "pass --source FOLDER" in err
    assert bench_job.BenchConfig(source=str(tmp_path)).source == str(tmp_path)
