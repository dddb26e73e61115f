"""Training (steps 1–3, 13, 18–19): a round out of process, tracked and registered in MLflow."""

from typing import Literal

import dagster as dg
from pydantic import Field

from bridge_assets.core.training import PRESETS, preset
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

    def configs(self) -> list[dict]:
        overrides = {k: v for k, v in (("max_epochs", self.max_epochs), ("seed", self.seed)) if v is not None}
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
    """The best model of a training round, registered in MLflow as a candidate (stage "None").

    Training runs in its own process through Dagster Pipes, reads a pinned feature version,
    and reports MLflow links, metrics against the linear baselines and the loss curve back.
    """
    extras = {"configs": config.configs(), "split": config.split, "feature_version": config.feature_version}
    # the registration in the training process is recorded as this run (and what launched it)
    env = {**storage.settings().to_env(), **mlflow_tracking.settings().to_env(), "BRIDGE_ACTOR": run_actor(context)}
    return training.run(context, extras=extras, env=env).get_materialize_result()
