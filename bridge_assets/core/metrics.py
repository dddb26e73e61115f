"""Regression metrics on the price scale, and the linear baselines every model is measured against.

The reference reported a "loss" that was not an MSE and no MAE/RMSE/R²; here every model and
baseline is scored with the same three numbers on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def regression_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R² of predictions, in the target's own units."""
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    error = predicted - actual
    total = float(np.sum((actual - actual.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "r2": 1.0 - float(np.sum(error**2)) / total if total > 0 else float("nan"),
    }


@dataclass(frozen=True)
class LinearModel:
    """Least squares on the encoded features, optionally on log price."""

    coefficients: np.ndarray
    intercept: float
    log_target: bool

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        target: np.ndarray,
        *,
        log_target: bool = False,
        ridge: float = 0.0,
        weights: np.ndarray | None = None,
    ) -> LinearModel:
        """Ordinary (or ridge) least squares, optionally weighted per row (recency); the one-hot
        columns' collinearity is harmless."""
        y = np.log(target) if log_target else np.asarray(target, dtype=np.float64)
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
        x_mean, y_mean = np.average(features, axis=0, weights=w), float(np.average(y, weights=w))
        root = np.sqrt(w / w.mean())[:, None]  # mean weight 1: `ridge` keeps its unweighted meaning
        centred, residual = (features - x_mean) * root, (y - y_mean) * root[:, 0]
        if ridge:
            gram = centred.T @ centred + ridge * np.eye(features.shape[1])
            coefficients = np.linalg.solve(gram, centred.T @ residual)
        else:
            coefficients, *_ = np.linalg.lstsq(centred, residual, rcond=None)
        return cls(coefficients, float(y_mean - x_mean @ coefficients), log_target)

    def predict(self, features: np.ndarray) -> np.ndarray:
        raw = features @ self.coefficients + self.intercept
        return np.exp(raw) if self.log_target else raw


BASELINES: dict[str, bool] = {"linear": False, "log_linear": True}
