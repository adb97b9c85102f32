"""IQA agreement metrics: SRCC, KRCC, PLCC raw and after the 4-parameter logistic fit.

The logistic mapping is the VQEG standard used across IQA papers:
    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2
fitted by least squares from predictions to MOS before PLCC is taken.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, stats


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # Clipped: a steep fit overflows exp for far-out x, where the curve is flat anyway.
    z = np.clip(-(np.asarray(x, float) - b3) / (abs(b4) + 1e-12), -60.0, 60.0)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic4(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Parameters (b1..b4) of the logistic that maps predictions onto MOS."""
    pred, mos = np.asarray(pred, float), np.asarray(mos, float)
    start = [mos.max(), mos.min(), float(np.mean(pred)), float(np.std(pred)) or 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        try:
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=start, maxfev=20000)
        except RuntimeError:  # no convergence: the identity-like start is the honest fallback
            params = np.asarray(start)
    return params


def _finite(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    pred, mos = np.asarray(pred, float), np.asarray(mos, float)
    keep = np.isfinite(pred) & np.isfinite(mos)
    return pred[keep], mos[keep]


def agreement(pred, mos) -> dict[str, float]:
    """SRCC, KRCC, PLCC and PLCC after the logistic fit, on rows where both are finite."""
    pred, mos = _finite(pred, mos)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(mos) == 0:
        nan = float("nan")
        return {"srcc": nan, "krcc": nan, "plcc": nan, "plcc_logistic": nan, "n": len(pred)}
    # Four parameters need more than four points to mean anything.
    fitted = logistic4(pred, *fit_logistic4(pred, mos)) if len(pred) > 4 else np.zeros(1)
    return {
        "srcc": float(stats.spearmanr(pred, mos).statistic),
        "krcc": float(stats.kendalltau(pred, mos).statistic),
        "plcc": float(stats.pearsonr(pred, mos).statistic),
        "plcc_logistic": float(stats.pearsonr(fitted, mos).statistic)
        if np.ptp(fitted) > 0 else float("nan"),
        "n": int(len(pred)),
    }


def srcc(pred, mos) -> float:
    pred, mos = _finite(pred, mos)
    if len(pred) < 3 or np.ptp(pred) == 0:
        return float("nan")
    return float(stats.spearmanr(pred, mos).statistic)


def within_groups_srcc(pred, mos, groups) -> dict[str, float | int | None]:
    """SRCC inside each group, averaged with the groups' row counts as weights: how well a
    score ranks images of one group (one generator), the ranking a team scoring its own
    model's outputs needs. Groups with fewer than 3 rows or a constant score count as
    unranked (a per-group constant such as a group prior ranks nothing inside a group):
    ``groups`` is how many were ranked, ``rows`` their rows, ``srcc`` None if none were
    (null in JSON, where NaN is not valid)."""
    pred, mos, groups = np.asarray(pred, float), np.asarray(mos, float), np.asarray(groups)
    values, weights = [], []
    for group in dict.fromkeys(groups.tolist()):
        mask = groups == group
        value = srcc(pred[mask], mos[mask])
        if np.isfinite(value):
            values.append(value)
            weights.append(int((np.isfinite(pred[mask]) & np.isfinite(mos[mask])).sum()))
    return {"srcc": float(np.average(values, weights=weights)) if values else None,
            "groups": len(values), "rows": int(sum(weights))}


def _resampled(statistic, n: int, samples: int, seed: int) -> list[float]:
    """``statistic(index)`` on ``samples`` resamples of n rows with replacement (finite
    values only)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        value = statistic(rng.integers(0, n, n))
        if np.isfinite(value):
            values.append(value)
    return values


def _percentile_interval(values: list[float], level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_srcc_ci(pred, mos, samples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of SRCC (rows resampled with replacement)."""
    pred, mos = _finite(pred, mos)
    values = _resampled(lambda index: srcc(pred[index], mos[index]), len(pred), samples, seed)
    if not values:
        return float("nan"), float("nan")
    return _percentile_interval(values, level)


def bootstrap_srcc_difference(pred, baseline, mos, samples: int = 1000, seed: int = 0,
                              level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of SRCC(pred) - SRCC(baseline): the same resampled rows score both,
    so the interval is of the difference itself (two separate intervals overlap far more
    than the difference is uncertain). ``p_better`` is the share of resamples where ``pred``
    ranks better."""
    pred, baseline, mos = (np.asarray(a, float) for a in (pred, baseline, mos))
    keep = np.isfinite(pred) & np.isfinite(baseline) & np.isfinite(mos)
    pred, baseline, mos = pred[keep], baseline[keep], mos[keep]
    values = _resampled(lambda index: srcc(pred[index], mos[index])
                        - srcc(baseline[index], mos[index]), len(pred), samples, seed)
    nan = float("nan")
    if not values:
        return {"difference": nan, "ci95": [nan, nan], "p_better": nan, "samples": 0}
    return {"difference": srcc(pred, mos) - srcc(baseline, mos),
            "ci95": list(_percentile_interval(values, level)),
            "p_better": float(np.mean(np.asarray(values) > 0)), "samples": len(values)}


def json_ready(value):
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, so that reports
    are strict JSON: Python writes NaN as a bare ``NaN``, which jq, browsers and most JSON
    parsers reject. Metrics are NaN where they are undefined (a group of two rows, a
    constant score), and null says the same in JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def mean_std(values) -> dict[str, float]:
    values = np.asarray(values, float)
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values))}
