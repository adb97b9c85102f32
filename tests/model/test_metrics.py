"""Metrics agree with scipy; the logistic fit recovers a monotone curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from iqray.model.metrics import (
    agreement,
    bootstrap_srcc_ci,
    bootstrap_srcc_difference,
    fit_logistic4,
    json_ready,
    logistic4,
    mean_std,
    within_groups_srcc,
)


def test_correlations_match_scipy_on_known_arrays():
    rng = np.random.default_rng(3)
    mos = rng.uniform(0, 5, 200)
    pred = mos + rng.normal(0, 1.0, 200)
    result = agreement(pred, mos)
    assert result["srcc"] == pytest.approx(stats.spearmanr(pred, mos).statistic)
    assert result["krcc"] == pytest.approx(stats.kendalltau(pred, mos).statistic)
    assert result["plcc"] == pytest.approx(stats.pearsonr(pred, mos).statistic)
    assert result["n"] == 200
    assert agreement([1, 2, 3, 4], [4, 3, 2, 1])["srcc"] == pytest.approx(-1.0)


def test_the_logistic_fit_linearises_a_monotone_curve():
    x = np.linspace(-3, 3, 300)
    mos = logistic4(x, 4.5, 0.5, 0.3, 0.3)
    params = fit_logistic4(x, mos)
    np.testing.assert_allclose(logistic4(x, *params), mos, atol=1e-3)
    result = agreement(x, mos)
    assert result["plcc"] < 0.97  # a raw linear fit misses the S-shape
    assert result["plcc_logistic"] > 0.9999
    assert result["srcc"] == pytest.approx(1.0)


def test_rows_with_missing_values_are_left_out():
    result = agreement([1.0, np.nan, 2.0, 3.0, 4.0], [1.0, 2.0, np.nan, 3.0, 5.0])
    assert result["n"] == 3 and result["srcc"] == pytest.approx(1.0)
    assert np.isnan(result["plcc_logistic"])  # too few points for a 4-parameter fit


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 5, 300)
    pred = mos + rng.normal(0, 1.5, 300)
    low, high = bootstrap_srcc_ci(pred, mos, samples=300, seed=1)
    estimate = agreement(pred, mos)["srcc"]
    assert low < estimate < high and high - low < 0.2
    assert (low, high) == bootstrap_srcc_ci(pred, mos, samples=300, seed=1)


def test_mean_std_over_repeats():
    assert mean_std([0.7, 0.8, 0.9]) == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1),
                                         "n": 3}


def test_paired_bootstrap_of_the_srcc_difference():
    rng = np.random.default_rng(0)
    mos = rng.random(200)
    good = mos + 0.1 * rng.random(200)
    noisy = mos + 2.0 * rng.random(200)
    result = bootstrap_srcc_difference(good, noisy, mos, samples=300, seed=1)
    expected = stats.spearmanr(good, mos).statistic - stats.spearmanr(noisy, mos).statistic
    assert result["difference"] == pytest.approx(expected)
    low, high = result["ci95"]
    assert 0 < low <= result["difference"] <= high
    assert result["p_better"] == 1.0 and result["samples"] == 300
    # The baseline against itself: no difference in any resample, never better.
    same = bootstrap_srcc_difference(noisy, noisy, mos, samples=50)
    assert same["ci95"] == [0.0, 0.0] and same["p_better"] == 0.0
    # Rows missing in either prediction are left out of both.
    with_gap = good.copy()
    with_gap[0] = np.nan
    assert bootstrap_srcc_difference(with_gap, noisy, mos, samples=10)["difference"] == \
        pytest.approx(stats.spearmanr(good[1:], mos[1:]).statistic
                      - stats.spearmanr(noisy[1:], mos[1:]).statistic)


def test_within_groups_srcc_weights_each_groups_own_ranking_by_its_rows():
    rng = np.random.default_rng(3)
    groups = np.array(["a"] * 10 + ["b"] * 6 + ["c"] * 2 + ["d"] * 5)
    mos = rng.random(groups.size)
    pred = mos + rng.normal(0, 0.3, groups.size)
    pred[groups == "b"] += 5  # an offset between groups changes nothing inside them
    pred[groups == "d"] = 1.0  # constant inside d: ranks nothing, so d is left out
    result = within_groups_srcc(pred, mos, groups)
    a = stats.spearmanr(pred[:10], mos[:10]).statistic
    b = stats.spearmanr(pred[10:16], mos[10:16]).statistic
    assert result == {"srcc": pytest.approx((10 * a + 6 * b) / 16), "groups": 2, "rows": 16}
    constant = np.repeat([1.0, 2.0, 3.0, 4.0], [10, 6, 2, 5])  # a group prior
    assert within_groups_srcc(constant, mos, groups) == {"srcc": None, "groups": 0, "rows": 0}


def test_json_ready_writes_undefined_metrics_as_null():
    constant = agreement([1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 2.0, 3.0])  # SRCC undefined
    report = {"groups": {"glide": constant}, "ci": (np.float32(0.25), float("inf")),
              "n": np.int64(4), "name": "x"}
    ready = json_ready(report)
    assert ready["groups"]["glide"]["srcc"] is None and ready["groups"]["glide"]["n"] == 4
    assert ready["ci"] == [0.25, None] and ready["n"] == 4 and ready["name"] == "x"
    # Strict JSON: the default encoder would have written a bare NaN.
    assert "NaN" in json.dumps(report, default=int)
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready
