"""Comparing two served variants on delayed ground truth (step 6), framework-free.

Traffic is assigned per client (sticky), so rows of one client are not independent: the test
compares per-client mean absolute errors between the arms (Welch's t, unequal variances), the
variant MAE/RMSE intervals are cluster-robust (clients as clusters), and the sample size is
counted in clients, then converted to labels with the observed labels per client.

Verdict: `promote` when Staging's per-client MAE is lower and the difference is significant;
`keep` when Staging is significantly worse, or when the experiment has the power to see the
configured minimum effect and saw none; `inconclusive` otherwise (the report says how many
clients it still needs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

VARIANTS = ("production", "staging")


@dataclass(frozen=True)
class VariantSummary:
    """One arm: how much feedback it has and its errors with confidence intervals."""

    variant: str
    labels: int
    clients: int
    mae: float
    mae_ci: tuple[float, float]
    rmse: float
    rmse_ci: tuple[float, float]


@dataclass(frozen=True)
class ABReport:
    """The comparison of Staging against Production and the verdict with its reason."""

    production: VariantSummary
    staging: VariantSummary
    difference: float  # Staging − Production, mean of per-client MAEs (negative: Staging better)
    difference_ci: tuple[float, float]
    relative_difference: float
    t_statistic: float
    degrees_of_freedom: float
    p_value: float
    required_clients_per_arm: int
    required_labels_per_arm: int
    min_effect: float
    alpha: float
    power: float
    verdict: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cluster_mean_ci(values: np.ndarray, clients: np.ndarray, z: float) -> tuple[float, tuple[float, float]]:
    """Mean of `values` and its interval with clients as clusters (ratio-estimator variance)."""
    mean = float(values.mean())
    _, codes = np.unique(clients, return_inverse=True)
    sums = np.bincount(codes, weights=values)
    counts = np.bincount(codes)
    k = len(sums)
    if k < 2:
        return mean, (float("nan"), float("nan"))
    residual = sums - mean * counts
    se = math.sqrt(k / (k - 1) * float(np.sum(residual**2))) / len(values)
    return mean, (mean - z * se, mean + z * se)


def summarise(variant: str, errors: np.ndarray, clients: np.ndarray, alpha: float = 0.05) -> VariantSummary:
    """MAE and RMSE of one arm with cluster-robust (1 − alpha) intervals."""
    errors = np.asarray(errors, dtype=np.float64)
    if not len(errors):
        nan = float("nan")
        return VariantSummary(variant, 0, 0, nan, (nan, nan), nan, (nan, nan))
    z = float(stats.norm.ppf(1 - alpha / 2))
    mae, mae_ci = _cluster_mean_ci(np.abs(errors), clients, z)
    mse, (mse_low, mse_high) = _cluster_mean_ci(errors**2, clients, z)
    rmse_ci = (
        (math.sqrt(max(mse_low, 0.0)), math.sqrt(mse_high)) if math.isfinite(mse_high) else (float("nan"), float("nan"))
    )
    return VariantSummary(variant, len(errors), len(np.unique(clients)), mae, mae_ci, math.sqrt(mse), rmse_ci)


def per_client_mae(errors: np.ndarray, clients: np.ndarray) -> np.ndarray:
    """Mean absolute error of each client: the unit the arms are compared on."""
    _, codes = np.unique(clients, return_inverse=True)
    return np.bincount(codes, weights=np.abs(np.asarray(errors, dtype=np.float64))) / np.bincount(codes)


def required_clients(sd: float, effect: float, alpha: float, power: float) -> int:
    """Clients per arm for a two-sided test at `alpha` to detect `effect` with `power`."""
    if effect <= 0 or not math.isfinite(sd):
        return 0
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * (z * sd / effect) ** 2)


def compare_variants(
    production_errors: np.ndarray,
    production_clients: np.ndarray,
    staging_errors: np.ndarray,
    staging_clients: np.ndarray,
    *,
    min_effect: float = 0.05,
    alpha: float = 0.05,
    power: float = 0.8,
) -> ABReport:
    """Compare the arms on prediction errors (prediction − price) of labelled requests.

    `min_effect` is the smallest relative MAE difference worth detecting (0.05: 5% of
    Production's MAE); it sets the sample size and when "no difference" means `keep`.
    """
    production = summarise("production", production_errors, production_clients, alpha)
    staging = summarise("staging", staging_errors, staging_clients, alpha)
    a = per_client_mae(production_errors, production_clients) if len(production_errors) else np.array([])
    b = per_client_mae(staging_errors, staging_clients) if len(staging_errors) else np.array([])
    nan = float("nan")
    if len(a) < 2 or len(b) < 2:
        verdict, reason = (
            "inconclusive",
            f"too few clients with feedback (production {len(a)}, staging {len(b)}; need ≥ 2 each)",
        )
        return ABReport(
            production, staging, nan, (nan, nan), nan, nan, nan, nan, 0, 0, min_effect, alpha, power, verdict, reason
        )

    var_a, var_b = a.var(ddof=1), b.var(ddof=1)
    difference = float(b.mean() - a.mean())
    se = math.sqrt(var_a / len(a) + var_b / len(b))
    df = (
        (var_a / len(a) + var_b / len(b)) ** 2
        / ((var_a / len(a)) ** 2 / (len(a) - 1) + (var_b / len(b)) ** 2 / (len(b) - 1))
        if se > 0
        else float(len(a) + len(b) - 2)
    )
    t = difference / se if se > 0 else 0.0
    p = float(2 * stats.t.sf(abs(t), df)) if se > 0 else 1.0
    margin = float(stats.t.ppf(1 - alpha / 2, df)) * se
    effect = min_effect * float(a.mean())
    needed = required_clients(math.sqrt((var_a + var_b) / 2), effect, alpha, power)
    labels_per_client = (production.labels + staging.labels) / (len(a) + len(b))
    needed_labels = math.ceil(needed * labels_per_client)
    relative = difference / float(a.mean()) if a.mean() > 0 else nan
    figures = f"Staging − Production per-client MAE {difference:+,.0f} ({relative:+.1%}), p = {p:.3g}"
    if p < alpha and difference < 0:
        verdict, reason = "promote", f"Staging is better: {figures} < {alpha}"
    elif p < alpha:
        verdict, reason = "keep", f"Staging is worse: {figures} < {alpha}"
    elif min(len(a), len(b)) >= needed:
        verdict, reason = (
            "keep",
            f"no difference of {min_effect:.0%} or more with {min(len(a), len(b))} clients per arm (needed {needed}): {figures}",
        )
    else:
        verdict, reason = (
            "inconclusive",
            f"not significant yet: {figures}; needs ~{needed} clients (~{needed_labels} labels) per arm, has {len(a)}/{len(b)}",
        )
    return ABReport(
        production,
        staging,
        difference,
        (difference - margin, difference + margin),
        relative,
        float(t),
        float(df),
        p,
        needed,
        needed_labels,
        min_effect,
        alpha,
        power,
        verdict,
        reason,
    )
