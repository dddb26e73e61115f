"""The Dagster code location: every asset, check, sensor and resource of bridge.

Kept apart from `bridge_assets/__init__.py` so the ML core imports without Dagster. Nothing
here or in `defs/` reads the environment at import: `build_defs(env)` wires resources,
cadences and freshness windows to the environment it is given, and Dagster calls `defs`
when it loads the code location.
"""

import os
from collections.abc import Mapping

import dagster as dg

from bridge_assets.defs.cadence import sensor_interval, with_cadence, with_freshness
from bridge_assets.defs.features import feature_backlog_sensor, housing_features
from bridge_assets.defs.guardrail import post_deploy_guardrail
from bridge_assets.defs.landing import simulated_batch
from bridge_assets.defs.monitoring import MONITORING_ASSETS, MONITORING_SENSORS, monitoring
from bridge_assets.defs.promotion import (
    ab_report,
    approve_model,
    candidates_sensor,
    experiment_sensor,
    feedback,
    staged_model,
)
from bridge_assets.defs.raw import landed_batches_sensor, raw_housing
from bridge_assets.defs.resources import (
    alerting,
    lake_storage,
    mlflow_tracking,
    promotion_policy,
    ray_serving,
    training_launcher,
)
from bridge_assets.defs.retraining import RETRAINING_SENSORS, retrain_model
from bridge_assets.defs.schedules import training_round_schedule
from bridge_assets.defs.scoring import batch_predictions
from bridge_assets.defs.serving import production_deployment, promote_model, registry_sensor, rollback_model
from bridge_assets.defs.serving_logs import interaction_logs
from bridge_assets.defs.training import candidate_model

SENSORS = [
    landed_batches_sensor,
    feature_backlog_sensor,
    candidates_sensor,
    experiment_sensor,
    registry_sensor,
    post_deploy_guardrail,
    *MONITORING_SENSORS,
    *RETRAINING_SENSORS,
]


def automation_sensor(env: Mapping[str, str]) -> dg.AutomationConditionSensorDefinition:
    """Dagster's default automation sensor starts stopped; ours runs, so new raw partitions flow
    into the feature table without anyone flipping a switch."""
    return dg.AutomationConditionSensorDefinition(
        "bridge_automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=sensor_interval("bridge_automation", 30, env),
    )


def build_defs(env: Mapping[str, str] = os.environ) -> dg.Definitions:
    """The whole code location, its resources, cadences and freshness windows wired to the
    environment `env`."""
    assets = [
        simulated_batch,
        raw_housing,
        housing_features,
        candidate_model,
        staged_model,
        feedback,
        ab_report,
        production_deployment,
        interaction_logs,
        batch_predictions,
        *MONITORING_ASSETS,
    ]
    return dg.Definitions(
        assets=with_freshness(assets, env),
        jobs=[promote_model, rollback_model, approve_model, retrain_model],
        sensors=[automation_sensor(env), *(with_cadence(sensor, env) for sensor in SENSORS)],
        schedules=[training_round_schedule(env)],
        # Each run is one or two assets on a small machine: steps in the run's own process spare
        # every step a second import of torch, MLflow and Ray (tens of seconds under load).
        executor=dg.in_process_executor,
        resources={
            "storage": lake_storage(env),
            "mlflow_tracking": mlflow_tracking(env),
            "training": training_launcher(env),
            "serving": ray_serving(env),
            "monitoring": monitoring(env),
            "promotion": promotion_policy(env),
            "alerting": alerting(env),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location as Dagster loads it: wired to the process's environment."""
    return build_defs()
