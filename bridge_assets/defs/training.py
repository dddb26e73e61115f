"""Training (steps 1–3, 13, 18–19): a round out of process, tracked and registered in MLflow."""

from typing import Literal

import dagster as dg
from pydantic import Field, field_validator

from bridge_assets.core.model_api import ENTRY_POINT
from bridge_assets.core.presets import OPTIONS, PRESETS, preset
from bridge_assets.core.recency import Recency
from bridge_assets.defs.audit import run_actor
from bridge_assets.defs.features import housing_features
from bridge_assets.defs.resources import LakeStorage, MlflowTracking, TrainingLauncher


class TrainingRoundConfig(dg.Config):
    """Which configurations to train and on which data."""

    presets: list[str] = Field(default=["default", "reference"], description=f"from {sorted(PRESETS)}")
    split: Literal["hash", "reference"] = Field(
        default="hash", description="hash split of all rows, or the BridgeAI reference split of the real data"
    )
    feature_version: str | None = Field(default=None, description="pin a feature version (default: latest)")
    max_epochs: int | None = Field(default=None, ge=1, description="cap epochs for every preset")
    seed: int | None = Field(default=None, description="override every preset's seed")
    trainer: str | None = Field(
        default=None,
        pattern=ENTRY_POINT.pattern,
        description="a Python entry point `package.module:function` that trains every preset instead of its own "
        "(default: BRIDGE_TRAINER, else each preset's)",
    )
    options: list[str] = Field(
        default=list(OPTIONS),
        min_length=1,
        description="what the round compares: recalibrate Production, fine-tune Production's weights on the rows it never saw, "
        f"train the presets from scratch (the first two need a Production version); some of {list(OPTIONS)}",
    )
    recency_half_life_hours: float | None = Field(
        default=None, gt=0, description="weight training rows by age with this half-life"
    )
    recency_window_hours: float | None = Field(
        default=None, gt=0, description="train from scratch only on rows this recent"
    )
    min_gain: float = Field(
        default=0.01,
        ge=0,
        description="how much lower (and beyond chance) a costlier option's recent validation RMSE must be",
    )
    calibration: Literal["log_offset", "log_linear"] = Field(
        default="log_offset", description="the recalibration stage's form"
    )

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: list[str]) -> list[str]:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown round option(s) {unknown}; choose from {list(OPTIONS)}")
        return options

    def configs(self, default_trainer: str | None = None) -> list[dict]:
        """The presets with this round's overrides; `default_trainer` (BRIDGE_TRAINER) trains
        them unless the round names its own."""
        trainer = self.trainer or default_trainer
        overrides = {
            k: v
            for k, v in (("max_epochs", self.max_epochs), ("seed", self.seed), ("trainer", trainer))
            if v is not None
        }
        return [preset(name, **overrides).to_dict() for name in self.presets]


# The drift report is lineage, not an input: the monitor's evidence (retrain_sensor) starts rounds,
# and the graph shows a candidate as stale once newer drift evidence exists. Named by key, since
# the monitoring definitions import this asset as the retrain sensor's target.
@dg.asset(
    deps=[housing_features, dg.AssetKey("drift_report")],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    owners=["team:ml-engineering"],
)
def candidate_model(
    context: dg.AssetExecutionContext,
    config: TrainingRoundConfig,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    training: TrainingLauncher,
) -> dg.MaterializeResult:
    """The best option of a training round, registered in MLflow as a candidate (stage "None").

    Training runs in its own process through Dagster Pipes, reads a pinned feature version,
    compares recalibrating and fine-tuning Production with training from scratch on the rows
    Production never saw, and reports MLflow links, the options table (why one won), metrics
    against the linear baselines and the loss curve back.
    """
    extras = {
        "configs": config.configs(training.settings().trainer),
        "split": config.split,
        "feature_version": config.feature_version,
        "options": config.options,
        "recency": Recency(config.recency_half_life_hours, config.recency_window_hours).to_dict(),
        "min_gain": config.min_gain,
        "calibration": config.calibration,
    }
    # the registration in the training process is recorded as this run (and what launched it)
    env = {**storage.settings().to_env(), **mlflow_tracking.settings().to_env(), "BRIDGE_ACTOR": run_actor(context)}
    return training.run(context, extras=extras, env=env).get_materialize_result()
