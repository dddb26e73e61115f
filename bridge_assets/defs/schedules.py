"""Schedules (step 12: "the scheduler initiates training"): a training round on a cadence.

Retraining on evidence (drift, decay, feedback) is the monitoring sensors' job; this is the
steady cadence underneath it, so a model never gets older than one period even when nothing
alarms. Runs by default under `dagster dev`; `BRIDGE_TRAINING_CRON` sets the cadence.
"""

import os
from collections.abc import Mapping

import dagster as dg

from bridge_assets.cadence_settings import CadenceSettings
from bridge_assets.defs.features import IN_PROGRESS
from bridge_assets.defs.resources import LakeStorage
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import FeatureStore

TRAINING_SCHEDULE = "training_round_schedule"
TRIGGER_TAG = "bridge/trigger"


def training_round_schedule(env: Mapping[str, str] = os.environ) -> dg.ScheduleDefinition:
    """The scheduled training round, its cadence and timezone read from `env`."""
    cadences = CadenceSettings.from_env(env)

    @dg.schedule(
        name=TRAINING_SCHEDULE,
        cron_schedule=cadences.training_cron,
        execution_timezone=cadences.schedule_timezone,
        target=[candidate_model],
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="A training round on the latest published feature version (BRIDGE_TRAINING_CRON).",
    )
    def schedule(context: dg.ScheduleEvaluationContext, storage: LakeStorage) -> dg.RunRequest | dg.SkipReason:
        """Pins the feature version the round trains on (the run config records it); skips while
        there is nothing to train on or a training run is already under way."""
        latest = FeatureStore(storage.open()).latest()
        if latest is None:
            return dg.SkipReason("no published feature version yet: nothing to train on")
        training = [
            run.run_id
            for run in context.instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
            if run.asset_selection and candidate_model.key in run.asset_selection
        ]
        if training:
            return dg.SkipReason(f"training run {training[0]} is still in progress")
        return dg.RunRequest(
            run_config={
                "ops": {candidate_model.key.to_python_identifier(): {"config": {"feature_version": latest.version}}}
            },
            tags={TRIGGER_TAG: "schedule", "bridge/feature_version": latest.version},
        )

    return schedule
