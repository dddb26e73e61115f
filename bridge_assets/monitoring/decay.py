"""Realised decay: live error from feedback labels, with a confidence interval and a minimum
label count before anything is judged (a handful of labels says nothing about RMSE)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

Z_95 = 1.959964


@dataclass(frozen=True)
class ErrorStats:
    """MAE and RMSE of `labels` errors with 95% normal-approximation intervals."""

    labels: int
    mae: float
    rmse: float
    mae_ci: tuple[float, float]
    rmse_ci: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def error_stats(errors: np.ndarray) -> ErrorStats | None:
    """Interval of RMSE from the interval of MSE (mean of squared errors), square-rooted."""
    errors = np.asarray(errors, dtype=np.float64)
    errors = errors[np.isfinite(errors)]
    n = len(errors)
    if n == 0:
        return None
    absolute, squared = np.abs(errors), errors**2
    spread = (lambda v: float(v.std(ddof=1)) / math.sqrt(n)) if n > 1 else (lambda v: float("inf"))
    mae, mse = float(absolute.mean()), float(squared.mean())
    mae_se, mse_se = spread(absolute), spread(squared)
    return ErrorStats(
        labels=n,
        mae=mae,
        rmse=math.sqrt(mse),
        mae_ci=(max(0.0, mae - Z_95 * mae_se), mae + Z_95 * mae_se),
        rmse_ci=(math.sqrt(max(0.0, mse - Z_95 * mse_se)), math.sqrt(mse + Z_95 * mse_se)),
    )


@dataclass(frozen=True)
class DecayVerdict:
    judged: bool
    decayed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def judge_realised(stats: ErrorStats | None, baseline_rmse: float, min_labels: int, tolerance: float) -> DecayVerdict:
    """Decayed when even the interval's low end exceeds the version's test RMSE by `tolerance`."""
    if stats is None or stats.labels < min_labels:
        have = 0 if stats is None else stats.labels
        return DecayVerdict(False, False, f"{have} labels < {min_labels} needed to judge")
    bar = baseline_rmse * (1 + tolerance)
    low = stats.rmse_ci[0]
    if low > bar:
        return DecayVerdict(
            True,
            True,
            f"live RMSE {stats.rmse:,.0f} (95% CI from {low:,.0f}) > test RMSE {baseline_rmse:,.0f} +{tolerance:.0%}",
        )
    return DecayVerdict(
        True, False, f"live RMSE {stats.rmse:,.0f} within test RMSE {baseline_rmse:,.0f} +{tolerance:.0%}"
    )


def judge_estimated(
    estimated_rmse: float, baseline_rmse: float, rows: int, min_rows: int, tolerance: float
) -> DecayVerdict:
    """The label-free estimate, held to the same bar (it has no labels to wait for, only rows)."""
    if rows < min_rows or not math.isfinite(estimated_rmse):
        return DecayVerdict(False, False, f"{rows} rows < {min_rows} needed to judge")
    bar = baseline_rmse * (1 + tolerance)
    if estimated_rmse > bar:
        return DecayVerdict(
            True, True, f"estimated RMSE {estimated_rmse:,.0f} > test RMSE {baseline_rmse:,.0f} +{tolerance:.0%}"
        )
    return DecayVerdict(
        True, False, f"estimated RMSE {estimated_rmse:,.0f} within test RMSE {baseline_rmse:,.0f} +{tolerance:.0%}"
    )
