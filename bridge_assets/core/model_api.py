"""What bridge asks of a trained model, whatever trained it, and how a saved one is found again.

A trainer is a function named by an entry point (`package.module:function`: a preset's
`TrainConfig.trainer`, or `BRIDGE_TRAINER` for every preset). It receives the round's training
and validation rows and returns a `Model`: bridge's network (`bridge_assets.core.training`) is the
default, a scikit-learn gradient-boosting model (`bridge_assets.core.boosting`) the second
built-in. Everything after training — baselines, gates, tracking, the registry, serving, batch
scoring, monitoring, recalibration — uses only what `Model` declares.

A saved model is a folder whose `model.json` names the class that loads it (`loader`), so a
registered version loads without knowing what trained it.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import polars as pl

from bridge_assets.core.features import Preprocessor
from bridge_assets.core.presets import TrainConfig

DESCRIPTION = "model.json"  # every saved model's description, naming its `loader`
NETWORK_LOADER = "bridge_assets.core.training:TrainedModel"  # the network; also versions saved before `loader`
ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@runtime_checkable
class Model(Protocol):
    """A fitted model: its configuration, the preprocessing it was fitted with, its training
    history (one entry per epoch or iteration, `val_loss` at least; epoch 0 before training),
    and predictions in the target's units."""

    config: TrainConfig
    preprocessor: Preprocessor
    history: list[dict[str, float | None]]
    best_epoch: int

    def predict_encoded(self, features: np.ndarray) -> np.ndarray:
        """Predictions from the preprocessor's encoded matrix (what serving calls per request)."""
        ...

    def predict(self, rows: pl.DataFrame | pl.LazyFrame) -> np.ndarray:
        """Predictions for raw rows of the contract's features."""
        ...

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write the model into `directory`: its files by artifact name, `model` being
        `model.json` with the `loader` entry point among its fields."""
        ...

    @classmethod
    def load_dir(cls, directory: str | Path) -> Self:
        """The model `save` wrote into `directory`."""
        ...


class Trainer(Protocol):
    """Trains a model on `train_rows`, choosing when to stop on `validation_rows`.

    `preprocessor`: one already fitted on the training rows (a round shares it with the
    baselines), or None to fit one. `sample_weights`: one per training row (recency), or None.
    `warm_start`: a model of this trainer to continue from on new rows (fine-tuning), keeping
    its preprocessing; a trainer that cannot continue raises `CannotContinue` saying why (the
    round then skips fine-tuning, with that reason)."""

    def __call__(
        self,
        train_rows: pl.DataFrame,
        validation_rows: pl.DataFrame,
        config: TrainConfig,
        preprocessor: Preprocessor | None = None,
        *,
        sample_weights: np.ndarray | None = None,
        warm_start: Any = None,
    ) -> Model: ...


class CannotContinue(ValueError):
    """A trainer asked to fine-tune a model it cannot continue from."""


class EntryPointError(ValueError):
    """An entry point that is malformed, cannot be imported, or names nothing."""


def check_entry_point(entry: str, what: str) -> str:
    """`entry` if it has the form `package.module:name`, else an error naming `what` it is for."""
    if not ENTRY_POINT.match(entry):
        raise EntryPointError(f"{what} must be an entry point `package.module:name`, got {entry!r}")
    return entry


def resolve(entry: str, what: str) -> Any:
    """The object an entry point names; an error naming `what` when it cannot be found."""
    module_name, name = check_entry_point(entry, what).split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EntryPointError(f"{what} {entry!r}: cannot import {module_name}: {error}") from error
    try:
        return getattr(module, name)
    except AttributeError:
        raise EntryPointError(f"{what} {entry!r}: {module_name} has no {name!r}") from None


def trainer_of(config: TrainConfig) -> Trainer:
    """The function that trains `config` (its `trainer` entry point)."""
    trainer = resolve(config.trainer, f"the trainer of configuration {config.name!r}")
    if not callable(trainer):
        raise EntryPointError(f"the trainer {config.trainer!r} of configuration {config.name!r} is not callable")
    return trainer


def write_description(directory: Path, loader: str, model: Model, **extra: Any) -> Path:
    """`model.json`: what every model shares (its loader, configuration, preprocessing, history)
    and the trainer's `extra` fields."""
    path = directory / DESCRIPTION
    shared = {"loader": loader, "config": model.config.to_dict(), "preprocessor": model.preprocessor.to_dict()}
    history = {"best_epoch": model.best_epoch, "history": model.history}
    path.write_text(json.dumps(shared | extra | history, indent=2))
    return path


def read_description(directory: str | Path) -> dict[str, Any]:
    """`model.json` as written, `config` and `preprocessor` rebuilt."""
    meta = json.loads((Path(directory) / DESCRIPTION).read_text())
    return meta | {
        "config": TrainConfig.from_dict(meta["config"]),
        "preprocessor": Preprocessor.from_dict(meta["preprocessor"]),
    }


def load_model(directory: str | Path) -> Model:
    """A saved model, loaded by the class its `model.json` names (bridge's network when it
    names none: versions saved before models said how they load)."""
    description = json.loads((Path(directory) / DESCRIPTION).read_text())
    loader = resolve(description.get("loader", NETWORK_LOADER), f"the loader of the model in {directory}")
    return loader.load_dir(directory)
