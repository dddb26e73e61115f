"""Error before labels arrive: direct loss estimation (NannyML's DLE, in a few lines).

House prices are known months after the prediction. On held-out rows the model never
trained on, each row's squared error is known; a small "nanny" regressor learns it from the
row's features and prediction, and its mean over an unlabelled window estimates the MSE
(root: RMSE). Squared-error objective, because the mean is what is estimated (an absolute
objective would estimate the median: biased low). Valid under covariate shift within the
region the held-out rows cover; concept drift and label shift are invisible to it — those
are caught by realised error once labels land (`decay`).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingRegressor

from bridge_assets.core.contract import CATEGORICAL_FEATURES, CATEGORY_LEVELS, COUNT_FEATURES, MEASURES

NUMERIC_INPUTS = (*MEASURES, *COUNT_FEATURES)


def loss_features(rows: pl.DataFrame, predictions: np.ndarray) -> np.ndarray:
    """The nanny's inputs: numeric features, category codes (-1 unknown) and the prediction."""
    columns = [rows[c].cast(pl.Float64).to_numpy() for c in NUMERIC_INPUTS]
    for name in CATEGORICAL_FEATURES:
        text = rows[name].cast(pl.String).str.strip_chars().str.to_lowercase()
        levels = CATEGORY_LEVELS[name]
        columns.append(
            text.replace_strict(list(levels), list(range(len(levels))), default=-1, return_dtype=pl.Float64).to_numpy()
        )
    columns.append(np.asarray(predictions, dtype=np.float64))
    return np.column_stack(columns)


@dataclass
class LossEstimator:
    """A fitted nanny model and what it saw on the held-out rows."""

    model: HistGradientBoostingRegressor
    heldout_rows: int
    heldout_rmse: float

    @classmethod
    def fit(cls, rows: pl.DataFrame, predictions: np.ndarray, actual: np.ndarray, seed: int = 0) -> LossEstimator:
        squared = (np.asarray(predictions, dtype=np.float64) - np.asarray(actual, dtype=np.float64)) ** 2
        model = HistGradientBoostingRegressor(
            loss="squared_error",
            max_iter=150,
            learning_rate=0.05,
            max_leaf_nodes=15,
            min_samples_leaf=20,
            l2_regularization=1.0,
            early_stopping=False,
            random_state=seed,
        )
        model.fit(loss_features(rows, predictions), squared)
        return cls(model, len(squared), float(np.sqrt(squared.mean())))

    def squared_errors(self, rows: pl.DataFrame, predictions: np.ndarray) -> np.ndarray:
        """Estimated squared error per row (never negative)."""
        return np.clip(self.model.predict(loss_features(rows, predictions)), 0.0, None)

    def estimate_rmse(self, rows: pl.DataFrame, predictions: np.ndarray) -> float:
        """Estimated RMSE of a window from its features and predictions alone."""
        if rows.height == 0:
            return float("nan")
        return float(np.sqrt(self.squared_errors(rows, predictions).mean()))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        pickle.dump(self, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LossEstimator:
        """Only for bytes bridge wrote to its own lake (pickle runs code on load)."""
        loaded = pickle.loads(data)
        if not isinstance(loaded, cls):
            raise TypeError("not a LossEstimator")
        return loaded
