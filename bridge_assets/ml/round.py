"""A training round: several configurations on one feature version, scored against baselines."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from bridge_assets.core.contract import TARGET
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.metrics import BASELINES, LinearModel, regression_metrics
from bridge_assets.core.training import TrainConfig, TrainedModel, train_model

SPLIT_COLUMNS = {"hash": "split", "reference": "reference_split"}
SELECTION_METRIC = "val_rmse"
QUALIFYING_METRICS = ("val_rmse", "val_mae")


@dataclass
class Candidate:
    """One trained configuration and its metrics (`val_*`, `test_*`)."""

    config: TrainConfig
    model: TrainedModel
    metrics: dict[str, float]


@dataclass
class RoundResult:
    """Every candidate, the baselines' metrics, and the best candidate (see `best`)."""

    candidates: list[Candidate]
    baselines: dict[str, dict[str, float]]
    split: str
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        """The lowest validation RMSE among candidates at least as good as every linear baseline
        on validation, in RMSE and in MAE — what the `baseline` gate asks later on test rows, so
        a round does not pick a candidate the gate stops while another would pass. With none
        qualifying, the lowest validation RMSE (the gate then says why)."""
        qualifying = [
            c for c in self.candidates
            if all(c.metrics[m] <= b[m] for b in self.baselines.values() for m in QUALIFYING_METRICS)
        ]  # fmt: skip
        return min(qualifying or self.candidates, key=lambda c: c.metrics[SELECTION_METRIC])


def split_rows(features: pl.DataFrame, split: str) -> dict[str, pl.DataFrame]:
    """Train/validation/test rows by the hash split or the reference split (real data only)."""
    if split not in SPLIT_COLUMNS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_COLUMNS)}")
    column = SPLIT_COLUMNS[split]
    parts = {name: features.filter(pl.col(column) == name) for name in ("train", "validation", "test")}
    empty = [name for name, rows in parts.items() if rows.is_empty()]
    if empty:
        raise ValueError(f"the {split} split has no {'/'.join(empty)} rows in this feature version")
    return parts


def _scores(actual_by_split: dict[str, np.ndarray], predicted_by_split: dict[str, np.ndarray]) -> dict[str, float]:
    prefixes = {"validation": "val", "test": "test"}
    return {
        f"{prefixes[name]}_{metric}": value
        for name in prefixes
        for metric, value in regression_metrics(actual_by_split[name], predicted_by_split[name]).items()
    }


def run_round(features: pl.DataFrame, configs: list[TrainConfig], split: str = "hash") -> RoundResult:
    """Train every configuration on the same rows; hyperparameters are chosen on validation only."""
    if not configs:
        raise ValueError("a training round needs at least one configuration")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique within a round (runs are keyed by them): {names}")
    parts = split_rows(features, split)
    actual = {name: rows[TARGET].to_numpy() for name, rows in parts.items()}
    encode = Preprocessor.fit(parts["train"])
    encoded = {name: encode.transform(rows) for name, rows in parts.items()}
    baselines = {}
    for name, log_target in BASELINES.items():
        linear = LinearModel.fit(encoded["train"], actual["train"], log_target=log_target)
        baselines[name] = _scores(actual, {s: linear.predict(encoded[s]) for s in parts})
    candidates = []
    for config in configs:  # one preprocessing fit and encoding serve the baselines and every config
        model = train_model(parts["train"], parts["validation"], config, preprocessor=encode)
        predictions = {s: model.predict_encoded(encoded[s]) for s in parts}
        candidates.append(Candidate(config, model, _scores(actual, predictions)))
    return RoundResult(candidates, baselines, split, {name: rows.height for name, rows in parts.items()})
