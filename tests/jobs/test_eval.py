"""`iqray eval`: metrics of a checkpoint on labelled data, per group, with baselines."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
import torch
from PIL import Image
from pipeline_data import SAMPLE, TEST_MODEL
from scipy import ndimage, stats

import iqray.model
from iqray.jobs.evaluate import EvalConfig, laplacian_variance, run_eval
from iqray.model.metrics import json_ready

SAMPLE_COLUMNS = dict(image_path_column="name", key_columns=["name"])


@pytest.fixture()
def trained_checkpoint(tmp_path):
    model = iqray.model.load(TEST_MODEL)
    model.config = model.config.model_copy(update={"trained": True})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "fusion" not in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.alignment_head.alpha.fill_(0.5)
    return iqray.model.save_checkpoint(model, tmp_path / "ckpt")


def test_eval_writes_metrics_per_group_with_baselines_and_a_plot(ray_local, tmp_path,
                                                                 trained_checkpoint,
                                                                 sample_rows):
    # The prior table: other images' MOS per generator; glide is missing from it.
    rng = np.random.default_rng(0)
    prior_rows = [{"name": f"{g}_normal_{i:03d}.jpg", "mos_quality": m + rng.random(),
                   "mos_align": 5 - m - rng.random()}
                  for g, m in (("AttnGAN", 1.0), ("DALLE2", 2.5), ("midjourney", 3.5),
                               ("sd1.5", 2.8), ("xl2.2", 3.2)) for i in range(5)]
    pa_csv.write_csv(pa.Table.from_pylist(prior_rows), tmp_path / "prior.csv")
    report = run_eval(EvalConfig(
        input=str(SAMPLE / "prompts.csv"), image_root=str(SAMPLE / "images"),
        model=str(trained_checkpoint), cache=str(tmp_path / "cache"),
        output=str(tmp_path / "eval"), group_pattern=r"^([^_]+)_", bootstrap=200,
        prior_table=str(tmp_path / "prior.csv"), progress=False, **SAMPLE_COLUMNS),
        log=lambda *a: None)

    def strict(constant):
        raise AssertionError(f"eval.json is not strict JSON: {constant}")

    written = json.loads((tmp_path / "eval" / "eval.json").read_text(), parse_constant=strict)
    # glide has 2 rows: its correlations are undefined, NaN in the report, null in the file.
    assert np.isnan(report["heads"]["quality"]["groups"]["glide"]["srcc"])
    assert written["heads"]["quality"]["groups"]["glide"]["srcc"] is None
    assert written["heads"]["quality"]["groups"]["glide"]["n"] == 2
    assert written == json_ready(report)  # everything else exactly as returned
    with Image.open(tmp_path / "eval" / "scatter.png") as png:
        assert png.size[0] > 600

    # The numbers are those of model.score on the same images, against the same MOS.
    model = iqray.model.load(trained_checkpoint)
    scores = model.score([r["path"] for r in sample_rows], [r["prompt"] for r in sample_rows])
    mos_q = np.array([float(r["mos_quality"]) for r in sample_rows])
    quality = report["heads"]["quality"]
    assert quality["n"] == 32
    assert quality["srcc"] == pytest.approx(stats.spearmanr(scores["quality"], mos_q).statistic,
                                            abs=0.02)
    low, high = quality["srcc_ci95"]
    assert low <= quality["srcc"] <= high
    assert set(quality["groups"]) == {"AttnGAN", "DALLE2", "glide", "midjourney", "sd1.5",
                                      "xl2.2"}
    midjourney = sum(r["name"].startswith("midjourney_") for r in sample_rows)
    assert quality["groups"]["midjourney"]["n"] == midjourney == 9
    in_midjourney = [i for i, r in enumerate(sample_rows) if r["name"].startswith("midjourney_")]
    assert quality["groups"]["midjourney"]["mean_mos"] == pytest.approx(mos_q[in_midjourney].mean())
    assert quality["groups"]["midjourney"]["mean_prediction"] == pytest.approx(
        scores["quality"][in_midjourney].mean(), abs=0.02)
    # Ordering the groups alone: every row scored by its group's mean prediction.
    own_group_means = [quality["groups"][r["name"].split("_")[0]]["mean_prediction"]
                       for r in sample_rows]
    assert quality["between_groups_srcc"] == pytest.approx(
        stats.spearmanr(own_group_means, mos_q).statistic)

    # Ranking inside each generator: its SRCCs weighted by rows (groups of >= 3 rows).
    ranked = {g: v for g, v in quality["groups"].items() if v["n"] >= 3}
    assert quality["within_groups"]["groups"] == len(ranked)
    assert quality["within_groups"]["srcc"] == pytest.approx(
        sum(v["srcc"] * v["n"] for v in ranked.values()) / sum(v["n"] for v in ranked.values()))
    sharpness = [laplacian_variance(r["path"].read_bytes()) for r in sample_rows]
    expected = stats.spearmanr(sharpness, mos_q).statistic
    assert quality["baselines"]["laplacian_variance"]["srcc"] == pytest.approx(expected)
    sizes = [r["path"].stat().st_size for r in sample_rows]
    assert quality["baselines"]["file_size"]["srcc"] == pytest.approx(
        stats.spearmanr(sizes, mos_q).statistic)
    assert "alignment" in report["heads"]

    # The group prior predicts each image's generator mean in the prior table (the overall
    # mean for glide), and is compared with the model row for row.
    for head, column in (("quality", "mos_quality"), ("alignment", "mos_align")):
        means = {}
        for row in prior_rows:
            means.setdefault(row["name"].split("_")[0], []).append(row[column])
        overall = np.mean([row[column] for row in prior_rows])
        prior_pred = [np.mean(means[r["name"].split("_")[0]])
                      if r["name"].split("_")[0] in means else overall for r in sample_rows]
        mos = np.array([float(r[column]) for r in sample_rows])
        prior = report["heads"][head]["baselines"]["group_prior"]
        assert prior["srcc"] == pytest.approx(stats.spearmanr(prior_pred, mos).statistic)
        # Inside a generator the prior is a constant: it ranks nothing there.
        assert prior["within_groups"] == {"srcc": None, "groups": 0, "rows": 0}
        model_srcc = report["heads"][head]["srcc"]
        paired = prior["model_minus_baseline"]
        assert paired["difference"] == pytest.approx(model_srcc - prior["srcc"])
        assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
        assert 0.0 <= paired["p_better"] <= 1.0


def test_laplacian_variance_ranks_blur_below_sharp():
    rng = np.random.default_rng(0)
    sharp = (rng.random((64, 64)) * 255).astype(np.uint8)
    blurred = ndimage.gaussian_filter(sharp.astype(float), 2).astype(np.uint8)

    def png(array):
        import io

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    assert laplacian_variance(png(sharp)) > 10 * laplacian_variance(png(blurred))
