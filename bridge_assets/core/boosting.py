"""scikit-learn's histogram gradient boosting as a bridge model: the second built-in trainer,
proof that a round, the gates, the registry and serving need nothing of bridge's network.

It fits the same encoded features as the network (the round's `Preprocessor`), on the log of
the target when `config.log_target`, with per-row `sample_weights` (recency), and chooses its
number of trees on the validation rows: it grows `config.max_epochs` trees at most, stops when
`config.patience` trees in a row did not lower the validation loss by `config.min_improvement`,
and keeps the best count. Fine-tuning (`warm_start`) grows more trees on the new rows from the
incumbent's, with the incumbent's preprocessing and binning.

Saved as `estimator.pkl` (the estimator, pickled as MLflow's scikit-learn flavor does: load
only models from a registry you trust) and `model.json` (configuration, preprocessing, history).
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingRegressor

from bridge_assets.core.contract import TARGET
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.model_api import CannotContinue, read_description, write_description
from bridge_assets.core.presets import TrainConfig

LOADER = "bridge_assets.core.boosting:BoostedModel"
ESTIMATOR = "estimator.pkl"


@dataclass
class BoostedModel:
    """A fitted gradient-boosting model with the preprocessing it was fitted with."""

    config: TrainConfig
    preprocessor: Preprocessor
    estimator: HistGradientBoostingRegressor
    history: list[dict[str, float | None]] = field(default_factory=list)  # per tree; 0: before any
    best_epoch: int = 0  # trees kept

    def predict_encoded(self, features: np.ndarray) -> np.ndarray:
        raw = self.estimator.predict(np.ascontiguousarray(features, dtype=np.float64))
        return np.exp(raw) if self.config.log_target else raw

    def predict(self, rows: pl.DataFrame | pl.LazyFrame) -> np.ndarray:
        return self.predict_encoded(self.preprocessor.transform(rows))

    def save(self, directory: str | Path) -> dict[str, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        estimator = directory / ESTIMATOR
        estimator.write_bytes(pickle.dumps(self.estimator, protocol=pickle.HIGHEST_PROTOCOL))
        description = write_description(directory, LOADER, self)
        return {"estimator": estimator, "model": description}

    @classmethod
    def load_dir(cls, directory: str | Path) -> BoostedModel:
        meta = read_description(directory)
        return cls(
            config=meta["config"],
            preprocessor=meta["preprocessor"],
            estimator=pickle.loads(
                (Path(directory) / ESTIMATOR).read_bytes()
            ),  # the registry's own file (see the docstring)
            history=meta["history"],
            best_epoch=meta["best_epoch"],
        )


def _target(rows: pl.DataFrame, config: TrainConfig) -> np.ndarray:
    values = rows[TARGET].to_numpy().astype(np.float64)
    return np.log(values) if config.log_target else values


def _mse(actual: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None) -> float:
    return float(np.average(np.square(actual - predicted), weights=weights))


def train_boosting(
    train_rows: pl.DataFrame,
    validation_rows: pl.DataFrame,
    config: TrainConfig,
    preprocessor: Preprocessor | None = None,
    *,
    sample_weights: np.ndarray | None = None,
    warm_start: BoostedModel | None = None,
) -> BoostedModel:
    """Grow trees on the training rows and keep as many as the validation rows favour (see the
    module's docstring); `warm_start` continues a model of this trainer on new rows."""
    if warm_start is not None and not isinstance(warm_start, BoostedModel):
        raise CannotContinue(
            f"the boosting trainer can only continue a boosting model, not a {type(warm_start).__name__}"
        )
    preprocessor = warm_start.preprocessor if warm_start is not None else preprocessor or Preprocessor.fit(train_rows)
    x_train, x_val = preprocessor.transform(train_rows), preprocessor.transform(validation_rows)
    y_train, y_val = _target(train_rows, config), _target(validation_rows, config)
    if warm_start is not None:
        estimator = copy.deepcopy(warm_start.estimator)
        first = estimator.n_iter_
        estimator.set_params(warm_start=True, max_iter=first + config.max_epochs)
    else:
        estimator = HistGradientBoostingRegressor(
            learning_rate=config.learning_rate,
            max_iter=config.max_epochs,
            early_stopping=False,  # the validation rows below decide, not a split of the training rows
            random_state=config.seed,
        )
        first = 0
    estimator.fit(x_train, y_train, sample_weight=sample_weights)

    train_losses = [_mse(y_train, p, sample_weights) for p in estimator.staged_predict(x_train)]
    val_losses = [_mse(y_val, p) for p in estimator.staged_predict(x_val)]
    start_loss = (
        _mse(
            y_val, np.log(warm_start.predict_encoded(x_val)) if config.log_target else warm_start.predict_encoded(x_val)
        )
        if warm_start is not None
        else _mse(y_val, np.full_like(y_val, np.average(y_train, weights=sample_weights)))
    )
    history: list[dict[str, float | None]] = [{"epoch": first, "train_loss": None, "val_loss": start_loss}]
    best_loss, best_trees = start_loss, first
    for trees in range(first + 1, estimator.n_iter_ + 1):
        val_loss = val_losses[trees - 1]
        history.append({"epoch": trees, "train_loss": train_losses[trees - 1], "val_loss": val_loss})
        if val_loss < best_loss * (1 - config.min_improvement):
            best_loss, best_trees = val_loss, trees
        elif trees - best_trees >= config.patience:
            break
    if best_trees == first and warm_start is not None:  # no new tree helped: the incumbent as it was
        return BoostedModel(config, preprocessor, copy.deepcopy(warm_start.estimator), history, first)
    if best_trees < estimator.n_iter_:  # refit to the best count: deterministic from the seed
        estimator = _refit(warm_start, config, x_train, y_train, sample_weights, best_trees)
    return BoostedModel(config, preprocessor, estimator, history, best_trees)


def _refit(
    warm_start: BoostedModel | None,
    config: TrainConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    sample_weights: np.ndarray | None,
    trees: int,
) -> HistGradientBoostingRegressor:
    if warm_start is not None:
        estimator = copy.deepcopy(warm_start.estimator)
        estimator.set_params(warm_start=True, max_iter=trees)
    else:
        estimator = HistGradientBoostingRegressor(
            learning_rate=config.learning_rate, max_iter=max(trees, 1), early_stopping=False, random_state=config.seed
        )
    return estimator.fit(x_train, y_train, sample_weight=sample_weights)
