"""Retraining by policy (steps 20-21): `retrain_sensor` reads each new drift report's alarms
and, under `BRIDGE_RETRAIN_POLICY=automatic`, requests one training round on the feature
version that holds the window's labelled traffic — recalibration first where labels show
decay, a full round when that did not fix it; `manual` alerts and leaves `retrain_model` to a
person. The policy itself (storms, cool-down, the plan) is `bridge_assets.monitoring.retrain`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

import dagster as dg

from bridge_assets.defs.audit import open_registry
from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.features import IN_PROGRESS
from bridge_assets.defs.monitoring import ALARM_RECORDS, Monitoring, drift_report
from bridge_assets.defs.resources import LakeStorage, MlflowTracking
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import landed_batches
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS, Registry
from bridge_assets.monitoring.alarms import Alarm
from bridge_assets.monitoring.retrain import (
    FEEDBACK_BATCH_PREFIX,
    RetrainAttempt,
    RetrainDecision,
    decide_retrain,
    plan_retrain,
)

RETRAIN_TAG = "bridge/retrain"
REASON_TAG = "bridge/retrain_reason"
ACTION_TAG = "bridge/retrain_action"  # recalibrate or full (plan_retrain)
WINDOW_TAG = "bridge/window"

retrain_model = dg.define_asset_job(
    "retrain_model",
    selection=[candidate_model],
    tags={RETRAIN_TAG: "manual"},
    description="Ready retraining run (manual policy): a training round on the newest feature version.",
)


def _alarms_of(metadata: Mapping[str, dg.MetadataValue]) -> list[Alarm]:
    """The alarms a drift report's materialization recorded (none if it recorded none)."""
    value = metadata[ALARM_RECORDS].value if ALARM_RECORDS in metadata else []
    return [Alarm.from_dict(a) for a in value if isinstance(a, dict)] if isinstance(value, list) else []


def _feedback_pending(store: ObjectStore, window: str, included: set[str]) -> list[str]:
    """Feedback batches of `window` landed but not yet in the feature version."""
    return [
        b.batch_id
        for b in landed_batches(store)
        if b.batch_id.startswith(f"{FEEDBACK_BATCH_PREFIX}{window}") and b.batch_id not in included
    ]


def _attempt(registry: Registry, served: set[str], alarms: list[Alarm]) -> RetrainAttempt | None:
    """The newest version a round made to replace the current Production (tag `bridge.incumbent`),
    with what became of it: the evidence `plan_retrain` escalates on."""
    production = registry.version_for(PRODUCTION_ALIAS)
    made = [
        v
        for v in registry.client.search_model_versions(f"name='{registry.model_name}'")
        if production and v.tags.get("bridge.incumbent") == production
    ]
    if not made:
        return None
    newest = max(made, key=lambda v: int(v.version))
    version, gates = str(newest.version), registry.gate_record(str(newest.version))
    return RetrainAttempt(
        version=version,
        option=newest.tags.get("bridge.option", "scratch"),
        gates_passed=None if gates is None else gates.action == "gates_passed",
        served=version in served,
        decayed=any(a.model_version == version and a.kind == "realised decay" for a in alarms),
    )


@cadenced_sensor(
    30,
    target=[candidate_model],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def retrain_sensor(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking, monitoring: Monitoring
) -> dg.SensorResult:
    """The retrain policy on each new drift report with alarms. `automatic`: one training
    round, pinned to the newest feature version once it holds the window's labelled traffic,
    the cheapest effective one (`plan_retrain`: recalibrate Production first, a full round if
    that did not fix it), with the retrain recency (`BRIDGE_RETRAIN_HALF_LIFE_HOURS`,
    `BRIDGE_RETRAIN_WINDOW_HOURS`), reason and action as run tags; never while another retrain
    is open or within the cool-down.
    `manual`: nothing is launched (the report's checks failed and the webhook was called).
    Only alarms about a version still served count, and a window already retrained on is not
    again: windows are re-reported when labels or references arrive, and an old window's
    decay of a replaced version is history, not a reason to train."""
    settings = monitoring.settings()
    registry = open_registry(storage, mlflow_tracking)
    served = {v for v in (registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)) if v}
    state = json.loads(context.cursor) if context.cursor else {"after": None, "last_request": None}
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=drift_report.key, after_storage_id=state["after"]), limit=100, ascending=True
    ).records
    if not records:
        return dg.SensorResult(skip_reason="no new drift reports", cursor=json.dumps(state))
    store = storage.open()
    latest = FeatureStore(store).latest()
    for record in records:
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        window = record.partition_key or ""
        alarms = [a for a in _alarms_of(metadata) if a.model_version in served]
        if alarms and context.instance.get_run_records(
            dg.RunsFilter(tags={RETRAIN_TAG: "automatic", WINDOW_TAG: window}), limit=1
        ):
            alarms = []  # this window's traffic is already in a retrained round
        open_runs = sum(
            len(context.instance.get_run_records(dg.RunsFilter(tags={RETRAIN_TAG: kind}, statuses=IN_PROGRESS)))
            for kind in ("automatic", "manual")
        )
        since = time.time() - state["last_request"] if state["last_request"] else None
        decision = decide_retrain(
            settings.retrain_policy,
            alarms,
            open_retrains=open_runs,
            seconds_since_last_request=since,
            cooldown_seconds=settings.retrain_cooldown_seconds,
        )
        if decision.action == "request":
            pending = _feedback_pending(store, window, set(latest.batch_ids) if latest else set())
            if pending or latest is None:
                return dg.SensorResult(
                    skip_reason=f"waiting for labelled traffic {pending} to reach a feature version",
                    cursor=json.dumps(state),
                )
            plan = plan_retrain(alarms, _attempt(registry, served, alarms))
            if plan.action == "skip" and "awaits its gates" in plan.reason:
                return dg.SensorResult(skip_reason=f"window {window}: {plan.reason}", cursor=json.dumps(state))
            if plan.action != "skip":
                state = {"after": record.storage_id, "last_request": time.time()}
                round_config = {
                    "feature_version": latest.version,
                    "options": list(plan.options),
                    "recency_half_life_hours": settings.retrain_half_life_hours,
                    "recency_window_hours": settings.retrain_window_hours,
                }
                tags = {
                    RETRAIN_TAG: "automatic",
                    ACTION_TAG: plan.action,
                    REASON_TAG: f"{plan.reason} — {decision.reason}"[:1000],
                    WINDOW_TAG: window,
                    "bridge/feature_version": latest.version,
                }
                return dg.SensorResult(
                    run_requests=[
                        dg.RunRequest(
                            run_key=f"retrain:{record.storage_id}",
                            run_config={"ops": {"candidate_model": {"config": round_config}}},
                            tags=tags,
                        )
                    ],
                    cursor=json.dumps(state),
                )
            decision = RetrainDecision("skip", plan.reason)
        state = {**state, "after": record.storage_id}
        context.log.info(f"window {window}: {decision.action} ({decision.reason})")
    return dg.SensorResult(
        skip_reason=f"{settings.retrain_policy} policy: {decision.action} ({decision.reason})"[:1000],
        cursor=json.dumps(state),
    )


RETRAINING_SENSORS = [retrain_sensor]
