"""Monitoring (steps 11, 20, 21): profiles of live traffic, drift and decay per window, the
reference per model version, labelled traffic back into the lake (the retrain policy that
acts on the reports: `defs/retraining.py`).

Thin: everything is computed by `bridge_assets.monitoring`; these definitions decide when.
- `interaction_logs_sensor` finds log objects without a profile and requests
  `interaction_profiles` for them (profiling is idempotent per object, in the lake).
- `monitor_windows_sensor` sees which windows gained members (a late object included) or
  labels, registers the window partition and requests its profiles, labelled traffic and
  report again.
- `registered_versions_sensor` requests `model_reference` for each new registered version.
"""

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.features import IN_PROGRESS, housing_features
from bridge_assets.defs.promotion import feedback
from bridge_assets.defs.resources import Alerting, LakeStorage, MlflowTracking
from bridge_assets.defs.serving_logs import interaction_logs
from bridge_assets.monitoring.alarms import Alarm, AlarmKind, alarm_texts
from bridge_assets.monitoring.alerts import EventKind, LoopEvent
from bridge_assets.monitoring.drift import DriftSettings
from bridge_assets.monitoring.monitor import feedback_joiner, profile_objects, report_window, unprofiled_objects
from bridge_assets.monitoring.profiles import window_rows, window_slices, window_versions, windows_with_members
from bridge_assets.monitoring.reference import REFERENCE_PREFIX, make_reference_profile, registered_versions
from bridge_assets.monitoring.report import summary_markdown
from bridge_assets.monitoring.retrain import (
    land_feedback_batch,
)
from bridge_assets.monitoring.settings import MonitorSettings

MONITOR_WINDOWS, MODEL_VERSIONS = "monitor_windows", "model_versions"
ALARM_RECORDS = "alarm_records"  # drift_report metadata: its alarms as data, what retrain_sensor reads
monitor_windows = dg.DynamicPartitionsDefinition(name=MONITOR_WINDOWS)
model_versions = dg.DynamicPartitionsDefinition(name=MODEL_VERSIONS)
MONITORING_OWNER = "team:ml-engineering"
LABELS_PREFIX = "feedback/labels/"
RETRY_SECONDS = 600  # a requested object still unprofiled after this long is requested again
HOLD_AT_MOST_SECONDS = 600  # a sensor's unfinished run holds new work back at most this long
MAX_OBJECTS_PER_RUN = 500  # a backlog is worked off over several ticks, in runs of bounded size


class Monitoring(dg.ConfigurableResource):
    """Window length, drift/decay bars and the retrain policy (see the README's table)."""

    window_seconds: int = 3600
    drift_thresholds: str | None = None  # JSON, see bridge_assets.monitoring.settings
    min_labels: int = 200
    decay_tolerance: float = 0.10
    retrain_policy: str = "manual"
    retrain_cooldown_seconds: int = 3600
    retrain_half_life_hours: float | None = 24.0
    retrain_window_hours: float | None = None

    def settings(self) -> MonitorSettings:
        fields = self.model_dump(exclude={"drift_thresholds"})
        return MonitorSettings.model_validate({**fields, "drift": self.drift_thresholds or DriftSettings()})


def monitoring(env: Mapping[str, str] = os.environ) -> Monitoring:
    settings = MonitorSettings.from_env(env)  # validates the values early
    drift_thresholds = env.get("BRIDGE_DRIFT_THRESHOLDS") or None  # kept as JSON: Dagster config has no DriftSettings
    return Monitoring(**settings.model_dump(exclude={"drift"}), drift_thresholds=drift_thresholds)


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


class ProfileObjectsConfig(dg.Config):
    objects: list[str] = Field(default_factory=list, description="log object keys; empty: every unprofiled object")


@dg.asset(deps=[interaction_logs], group_name="monitoring", kinds={"whylogs", "parquet"}, owners=[MONITORING_OWNER])
def interaction_profiles(
    context: dg.AssetExecutionContext, config: ProfileObjectsConfig, storage: LakeStorage, monitoring: Monitoring
) -> dg.MaterializeResult:
    """whylogs profiles of interaction-log objects, one per (window, model version, variant)
    of each object, stored under a key derived from the object's key: done once per object."""
    store = storage.open()
    keys = config.objects or unprofiled_objects(store)
    results = profile_objects(store, keys, monitoring.settings().window_seconds)
    new = [r for r in results if not r.already_done]
    context.log.info(f"profiled {len(new)} new log objects ({len(results) - len(new)} already done)")
    return dg.MaterializeResult(
        metadata={
            "objects_profiled": len(new),
            "objects_already_done": len(results) - len(new),
            "predictions": sum(r.rows for r in new),
            "rejected": sum(r.rejected for r in new),
            "windows": dg.MetadataValue.json(sorted({w for r in new for w in r.windows})),
        }
    )


@cadenced_sensor(
    15,
    target=[interaction_profiles],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def interaction_logs_sensor(context: dg.SensorEvaluationContext, storage: LakeStorage) -> dg.SensorResult:
    """Requests profiles for log objects that have none. The lake says what is done (an
    object's profile index), the cursor what is already requested, so a restart or retry
    never profiles an object twice and a failed run's objects are requested again later."""
    requested: dict[str, float] = json.loads(context.cursor) if context.cursor else {}
    running = _unfinished_runs(context.instance, interaction_logs_sensor.name)
    if running:  # new objects wait and go in one larger run: a busy queue gets no pile of small runs
        return dg.SensorResult(skip_reason=f"new interaction logs wait for profile run {running[0].run_id}")
    now = time.time()
    pending = unprofiled_objects(storage.open())
    new = [key for key in pending if now - requested.get(key, 0.0) > RETRY_SECONDS][:MAX_OBJECTS_PER_RUN]
    cursor = {key: requested[key] for key in pending if key in requested} | {key: now for key in new}
    run_config = {"ops": {"interaction_profiles": {"config": {"objects": new}}}}
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"objects:{_digest(new)}:{int(now)}", run_config=run_config)]
        if new
        else [],
        cursor=json.dumps(cursor),
        skip_reason=None if new else f"no new interaction logs ({len(pending)} awaiting a running profile)",
    )


@dg.asset(
    partitions_def=monitor_windows,
    deps=[interaction_profiles],
    group_name="monitoring",
    kinds={"whylogs"},
    owners=[MONITORING_OWNER],
)
def window_profiles(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    """A window's traffic: object profiles merged per model version and variant; rejected
    requests counted per reason."""
    store = storage.open()
    window = context.partition_key
    slices = window_slices(store, window)
    for part in slices:
        if part.profile is not None:
            store.put_bytes(
                f"monitoring/profiles/merged/{window}/{part.model_version}--{part.variant}.bin",
                part.profile.serialize(),
            )
    table = ["| version | variant | predictions | rejected | objects |", "|---|---|---|---|---|"]
    table += [
        f"| {s.model_version} | {s.variant} | {s.rows} | {json.dumps(s.rejected)} | {len(s.objects)} |" for s in slices
    ]
    return dg.MaterializeResult(
        metadata={
            "predictions": sum(s.rows for s in slices),
            "rejected": sum(sum(s.rejected.values()) for s in slices),
            "objects": len({o for s in slices for o in s.objects}),
            "slices": dg.MetadataValue.md("\n".join(table)),
        },
        data_version=dg.DataVersion(
            _digest([f"{s.model_version}/{s.variant}/{s.rows}/{sorted(s.objects)}" for s in slices])
        ),
    )


@dg.asset(
    partitions_def=monitor_windows,
    deps=[window_profiles, feedback],
    group_name="monitoring",
    kinds={"parquet"},
    owners=[MONITORING_OWNER],
)
def labelled_traffic(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    """A window's predictions whose labels have been released, landed as a raw batch
    (`feedback-<window>`): through the same contract and quarantine, into the next feature
    version, so a retrain learns from what was seen."""
    store = storage.open()
    window = context.partition_key
    rows = window_rows(store, window)
    joined = feedback_joiner(store)(rows) if rows.height else rows
    batch, landed = land_feedback_batch(store, window, joined) if joined.height else (None, 0)
    if batch:
        context.log.info(f"landed {landed} labelled predictions as batch {batch.batch_id}")
    return dg.MaterializeResult(
        metadata={
            "predictions": rows.height,
            "labelled": joined.height,
            "landed_rows": landed,
            "batch_id": batch.batch_id if batch else "none",
            "uri": dg.MetadataValue.path(store.uri(batch.key)) if batch else "none",
        }
    )


def _alarm_check(name: str, alarms: list[Alarm], metadata: dict) -> dg.AssetCheckResult:
    texts = alarm_texts(alarms)
    return dg.AssetCheckResult(
        check_name=name,
        passed=not alarms,
        metadata={"alarms": dg.MetadataValue.json(texts), **metadata},
        description="; ".join(texts)[:1000] or None,
    )


REPORT_CHECKS = {
    "no_feature_drift": "no feature crosses its drift threshold against the version's reference",
    "no_prediction_drift": "the prediction distribution stays within its drift threshold",
    "no_realised_decay": "live RMSE from feedback labels stays within the test RMSE plus tolerance",
    "no_estimated_decay": "the label-free RMSE estimate stays within the test RMSE plus tolerance",
}


@dg.asset(
    partitions_def=monitor_windows,
    deps=[window_profiles, labelled_traffic],
    group_name="monitoring",
    kinds={"whylogs", "html"},
    owners=[MONITORING_OWNER],
    # No report for hours means no traffic reached the lake or the monitor stopped: both need
    # a look before a decayed model serves unnoticed.
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=6), warn_window=timedelta(hours=3)),
    check_specs=[
        dg.AssetCheckSpec(name, asset="drift_report", description=text) for name, text in REPORT_CHECKS.items()
    ],
)
def drift_report(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    monitoring: Monitoring,
    alerting: Alerting,
) -> dg.MaterializeResult:
    """Drift and decay of a window against each model version's reference: JSON and HTML in
    the lake, summary and plots here, checks that fail when a threshold is crossed."""
    store = storage.open()
    settings = monitoring.settings()
    report, keys = report_window(store, context.partition_key, settings, mlflow_tracking.model_name)

    def of_kind(kind: AlarmKind) -> list[Alarm]:
        return [a for a in report.alarms if a.kind == kind]

    families: tuple[EventKind, ...] = ("drift", "decay")
    for family in families:
        alarms = alarm_texts([a for a in report.alarms if a.family == family])
        if alarms:
            details = {
                "window": report.window,
                "alarms": alarms,
                "report": store.uri(keys["html"]),
                "retrain_policy": settings.retrain_policy,
            }
            alerting.send(
                LoopEvent(
                    family,
                    f"{family} in window {report.window}: {'; '.join(alarms)}"[:500],
                    mlflow_tracking.model_name,
                    details=details,
                )
            )
    plots = [
        f"**v{part.model_version} / {part.variant} — {column}**\n\n![{column}](data:image/png;base64,{base64.b64encode(png).decode()})"
        for part in report.slices
        for column, png in part.plots.items()
    ]
    missing = [s.model_version for s in report.slices if s.reference is None]
    return dg.MaterializeResult(
        metadata={
            "alarms": dg.MetadataValue.json(alarm_texts(report.alarms)),  # for people
            ALARM_RECORDS: dg.MetadataValue.json([a.to_dict() for a in report.alarms]),  # for retrain_sensor
            "retrain_outcomes": dg.MetadataValue.json(report.retrain_outcomes),
            "summary": dg.MetadataValue.md(summary_markdown(report)),
            "plots": dg.MetadataValue.md("\n\n".join(plots) or "no reference yet"),
            "report_json": dg.MetadataValue.path(store.uri(keys["json"])),
            "report_html": dg.MetadataValue.path(store.uri(keys["html"])),
            "versions_without_reference": dg.MetadataValue.json(missing),
            "retrain_policy": settings.retrain_policy,
            "retrain_how": dg.MetadataValue.md(
                "Launch the `retrain_model` job (it pins the newest feature version, which holds this window's labelled traffic "
                "once it has been validated)."
                if report.alarms
                else "nothing to do"
            ),
        },
        check_results=[
            _alarm_check(
                "no_feature_drift", of_kind("feature drift"), {"report": dg.MetadataValue.path(store.uri(keys["html"]))}
            ),
            _alarm_check("no_prediction_drift", of_kind("prediction drift"), {}),
            _alarm_check("no_realised_decay", of_kind("realised decay"), {}),
            _alarm_check("no_estimated_decay", of_kind("estimated decay"), {}),
        ],
    )


FRESHNESS_WATCHED = [housing_features.key, drift_report.key]  # the assets with a freshness policy


@cadenced_sensor(
    60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def freshness_sensor(
    context: dg.SensorEvaluationContext, mlflow_tracking: MlflowTracking, alerting: Alerting
) -> dg.SkipReason:
    """An alert when an asset with a freshness policy (`housing_features`, `drift_report`) turns
    FAIL in the daemon's freshness evaluation: no new data or no monitor for too long — once per
    failure, not once per tick."""
    records = context.instance.get_freshness_state_records(FRESHNESS_WATCHED)
    reported: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    failing = {
        key.to_user_string(): record for key, record in records.items() if str(record.freshness_state.value) == "FAIL"
    }
    for name, record in failing.items():
        if reported.get(name) != record.updated_at.isoformat():
            summary = f"{name} is overdue by its freshness policy (FAIL since {record.updated_at:%Y-%m-%d %H:%M} UTC)"
            alerting.send(
                LoopEvent(
                    "freshness_failed",
                    summary,
                    mlflow_tracking.model_name,
                    details={"asset": name, "since": record.updated_at.isoformat()},
                )
            )
    context.update_cursor(json.dumps({name: record.updated_at.isoformat() for name, record in failing.items()}))
    return dg.SkipReason(f"failing freshness: {sorted(failing) or 'none'}")


@cadenced_sensor(
    30,
    target=[window_profiles, labelled_traffic, drift_report],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def monitor_windows_sensor(context: dg.SensorEvaluationContext, storage: LakeStorage) -> dg.SensorResult:
    """(Re)requests a window when its members change (a late object too), new labels land, or
    the reference of a version it served arrives. A window whose run is still queued or running
    is held (its cursor entry stays the digest that run was requested for) and requested once
    that run ends, so traffic arriving every few seconds makes one report run at a time, not a
    queue of them."""
    store = storage.open()
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    labels = _digest([k for k in store.list(LABELS_PREFIX)])
    references = {k.split("/")[3] for k in store.list(REFERENCE_PREFIX) if k.endswith("/reference.json")}
    current = {
        window: _digest([*members, labels, *(f"reference:{v}" for v in sorted(window_versions(members) & references))])
        for window, members in windows_with_members(store).items()
    }
    busy = {
        run.tags.get("dagster/partition") for run in _unfinished_runs(context.instance, monitor_windows_sensor.name)
    }
    changed = sorted(w for w, digest in current.items() if seen.get(w) != digest)
    held = [w for w in changed if w in busy]
    requested = [w for w in changed if w not in busy]
    known = set(context.instance.get_dynamic_partitions(MONITOR_WINDOWS))
    new_partitions = [w for w in requested if w not in known]
    cursor = {w: digest for w, digest in current.items() if w not in held} | {w: seen[w] for w in held if w in seen}
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=w, run_key=f"{w}:{current[w]}") for w in requested],
        dynamic_partitions_requests=[monitor_windows.build_add_request(new_partitions)] if new_partitions else [],
        cursor=json.dumps(cursor),
        skip_reason=None
        if requested
        else f"no window to request ({len(current)} windows; waiting for their running report: {held or 'none'})",
    )


def _unfinished_runs(instance: dg.DagsterInstance, sensor_name: str) -> list[dg.DagsterRun]:
    """Runs a sensor launched in the last `HOLD_AT_MOST_SECONDS` that are queued or running (a
    run whose worker died without a trace stays "started": it must not hold its window forever)."""
    since = datetime.now(UTC) - timedelta(seconds=HOLD_AT_MOST_SECONDS)
    return list(
        instance.get_runs(
            dg.RunsFilter(statuses=IN_PROGRESS, tags={"dagster/sensor_name": sensor_name}, created_after=since)
        )
    )


@dg.asset(
    partitions_def=model_versions,
    group_name="monitoring",
    kinds={"whylogs", "mlflow", "scikitlearn"},
    owners=[MONITORING_OWNER],
)
def model_reference(
    context: dg.AssetExecutionContext, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """A registered version's reference: training features and held-out predictions
    (profile), held-out metrics and the loss estimator; in the lake and on its MLflow run."""
    reference = make_reference_profile(storage.open(), mlflow_tracking.settings(), context.partition_key)
    return dg.MaterializeResult(
        metadata={
            "model_version": reference.version,
            "feature_version": reference.feature_version,
            "train_rows": reference.train_rows,
            "heldout_rows": reference.heldout_rows,
            "heldout_rmse": reference.metrics["rmse"],
            "heldout_mae": reference.metrics["mae"],
            "estimator_heldout_rmse": reference.estimator.heldout_rmse,
        }
    )


@cadenced_sensor(
    60,
    target=[model_reference],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def registered_versions_sensor(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> dg.SensorResult:
    """Requests a reference for each registered version that has none in the lake."""
    store = storage.open()
    settings = mlflow_tracking.settings()
    have = {
        k.split("/")[3]
        for k in store.list(f"{REFERENCE_PREFIX}{settings.model_name}/")
        if k.endswith("/reference.json")
    }
    missing = [v for v in registered_versions(settings) if v not in have]
    known = set(context.instance.get_dynamic_partitions(MODEL_VERSIONS))
    add = [v for v in missing if v not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=v, run_key=f"reference:{v}") for v in missing],
        dynamic_partitions_requests=[model_versions.build_add_request(add)] if add else [],
        skip_reason=None if missing else "every registered version has a reference",
    )


MONITORING_ASSETS = [interaction_profiles, window_profiles, labelled_traffic, drift_report, model_reference]
MONITORING_SENSORS = [
    interaction_logs_sensor,
    monitor_windows_sensor,
    registered_versions_sensor,
    freshness_sensor,
]
