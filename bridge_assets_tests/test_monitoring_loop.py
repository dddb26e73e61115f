"""The whole monitoring loop through real Dagster, MLflow and a lake: a registered version's
reference, windows of plain, label-shifted and covariate-shifted traffic, feedback labels,
labelled traffic landing as a feedback batch, and the retrain policy (automatic and manual)."""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.defs.monitoring import (
    drift_report,
    interaction_logs_sensor,
    interaction_profiles,
    labelled_traffic,
    model_reference,
    model_versions,
    monitor_windows,
    monitor_windows_sensor,
    registered_versions_sensor,
    window_profiles,
)
from bridge_assets.defs.retraining import ACTION_TAG, REASON_TAG, retrain_sensor
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import build_features
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.ml.registry import Registry
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.monitoring.profiles import window_id
from bridge_assets.monitoring.whylogs_compat import deserialize
from bridge_assets_tests.monitoring_support import log_traffic, window_frame
from bridge_assets_tests.webhook import alert_sink
from serving.interactions import InteractionLogger

WINDOW = 30
ROWS = 300
T0 = datetime(2026, 11, 28, 10, 0, 1, tzinfo=UTC)
ROUND = {"presets": ["default"], "max_epochs": 10}


class RegisteredModel:
    """The registered version's own pyfunc, as the prediction service would load it."""

    def __init__(self, uri: str) -> None:
        self.model = mlflow.pyfunc.load_model(uri)

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        return np.asarray(self.model.predict(frame.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).to_pandas()))


def train(defs: dg.Definitions, instance: dg.DagsterInstance, config: dict, tags: dict | None = None) -> dict:
    result = dg.materialize(
        [candidate_model], instance=instance, resources=defs.resources,
        run_config={"ops": {"candidate_model": {"config": config}}}, tags=tags or {},
    )  # fmt: skip
    assert result.success
    return {k: v.value for k, v in result.asset_materializations_for_node("candidate_model")[0].metadata.items()}


def tick(sensor, defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as context:
        result = sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def monitor(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[str, dg.ExecuteInProcessResult]:
    """What the sensors would run: profiles of new objects, then each changed window."""
    for request in tick(interaction_logs_sensor, defs, instance).run_requests:
        assert dg.materialize([interaction_profiles], instance=instance, resources=defs.resources, run_config=request.run_config).success
    runs = {}
    for request in tick(monitor_windows_sensor, defs, instance).run_requests:
        runs[request.partition_key] = dg.materialize(
            [window_profiles, labelled_traffic, drift_report], instance=instance, resources=defs.resources, partition_key=request.partition_key
        )
    return runs


def checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def report(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("drift_report")[0].metadata.items()}


@pytest.mark.parametrize("lake_env", ["local"], indirect=True)
def test_drift_and_decay_are_caught_and_what_was_seen_is_retrained_on(lake_env, store, monkeypatch, tmp_path):
    monkeypatch.setenv("BRIDGE_MONITOR_WINDOW_SECONDS", str(WINDOW))
    monkeypatch.setenv("BRIDGE_MONITOR_MIN_LABELS", "100")
    monkeypatch.setenv("BRIDGE_RETRAIN_POLICY", "automatic")
    monkeypatch.setenv("BRIDGE_RETRAIN_COOLDOWN_SECONDS", "3600")
    land_seed(store)
    land_batch(store, "sim-train", Simulator.fit().generate(1500, seed=5, batch_id="sim-train"))
    for batch in landed_batches(store):
        validate_batch(store, batch)
    first_features = build_features(store).version.version
    defs = build_defs()
    settings = MlflowSettings.from_env()

    with dg.instance_for_test() as instance:
        assert train(defs, instance, ROUND)["model_version"] == "1"

        # The registered version gets its reference (lake + MLflow artifact), read by stock whylogs.
        (request,) = tick(registered_versions_sensor, defs, instance).run_requests
        assert dg.materialize([model_reference], instance=instance, resources=defs.resources, partition_key=request.partition_key).success
        assert tick(registered_versions_sensor, defs, instance).run_requests == []
        client = settings.activate()
        Registry(client, settings.model_name, store, actor="tester").set_production("1", reason="test: the version the traffic meets")
        run_id = client.get_model_version(settings.model_name, "1").run_id
        assert {a.path for a in client.list_artifacts(run_id, "monitoring")} == {"monitoring/profile.bin", "monitoring/reference.json"}
        downloaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="monitoring/profile.bin", dst_path=str(tmp_path / "artifacts"))
        profile = deserialize(open(downloaded, "rb").read())
        assert profile.get_column("area").get_metric("counts").n.value > 500 and profile.get_column("prediction") is not None

        # Traffic: a plain window, a label-shift window (prices up 60%, same houses) and a
        # covariate-shift window (houses 40% larger); labels released for the first two.
        model = RegisteredModel("models:/housing-price/1")
        logger = InteractionLogger(lambda: store, "replica-a", spool_dir=tmp_path / "spool", flush_rows=10**6, flush_seconds=3600)
        plain = log_traffic(logger, window_frame(ROWS, seed=51), model, T0, prefix="plain", seconds=20)
        rising = log_traffic(logger, window_frame(ROWS, seed=52), model, T0 + timedelta(seconds=WINDOW), prefix="rising", seconds=20)
        log_traffic(logger, window_frame(ROWS, seed=53, drift=Drift(area_factor=1.4)), model, T0 + timedelta(seconds=2 * WINDOW), prefix="large", seconds=20)
        logger.close()
        released = pl.concat([plain, rising.with_columns(pl.col("price") * 1.6)]).with_columns(pl.lit(datetime.now(UTC)).alias("released_at"))
        store.write_parquet("feedback/labels/release-1.parquet", released)
        windows = [window_id(T0 + timedelta(seconds=i * WINDOW), WINDOW) for i in range(3)]

        runs = monitor(defs, instance)
        assert sorted(runs) == windows and all(r.success for r in runs.values())
        plain_run, rising_run, large_run = (runs[w] for w in windows)
        assert checks(plain_run) == dict.fromkeys(("no_feature_drift", "no_prediction_drift", "no_realised_decay", "no_estimated_decay"), True)
        # Label shift: caught through feedback, no covariate alarm.
        assert checks(rising_run)["no_realised_decay"] is False
        assert checks(rising_run)["no_feature_drift"] is True and checks(rising_run)["no_prediction_drift"] is True
        # Covariate shift: flagged on the feature that moved, and only on it.
        assert checks(large_run)["no_feature_drift"] is False
        assert [a.split(" (")[0] for a in report(large_run)["alarms"] if "feature drift" in a] == ["v1/production: feature drift in area"]
        saved = json.loads(store.get_text(f"monitoring/reports/{windows[1]}/report.json"))
        assert saved["slices"][0]["realised"]["labels"] == ROWS and saved["slices"][0]["realised"]["verdict"]["decayed"]
        assert store.exists(f"monitoring/reports/{windows[2]}/report.html") and store.exists(f"monitoring/reports/{windows[2]}/plots/1--production--area.png")
        assert "data:image/png;base64," in report(large_run)["plots"] and "| 1 | production | area |" in report(large_run)["summary"]

        # Labelled traffic landed as feedback batches (raw batches like any other) ...
        landed = {b.batch_id for b in landed_batches(store) if b.batch_id.startswith("feedback-")}
        assert landed == {f"feedback-{windows[0]}", f"feedback-{windows[1]}"}
        # ... so the retrain waits until a feature version holds them,
        waiting = tick(retrain_sensor, defs, instance)
        assert waiting.run_requests == [] and "waiting for labelled traffic" in waiting.skip_reason.skip_message
        for batch in landed_batches(store):
            if batch.batch_id in landed:
                assert validate_batch(store, batch).quarantined_rows == 0
        seen_features = build_features(store).version
        assert landed <= set(seen_features.batch_ids) and seen_features.version != first_features

        # ... then requests exactly one round pinned to it, the cheapest fix first (recalibrate
        # Production on the labelled rows), with the reason; no storm after.
        requested = tick(retrain_sensor, defs, instance)
        (retrain,) = requested.run_requests
        requested_round = retrain.run_config["ops"]["candidate_model"]["config"]
        assert requested_round["feature_version"] == seen_features.version
        assert requested_round["options"] == ["recalibrate"] and retrain.tags[ACTION_TAG] == "recalibrate"
        assert requested_round["recency_half_life_hours"] == 24.0  # BRIDGE_RETRAIN_HALF_LIFE_HOURS's default
        assert "realised decay" in retrain.tags[REASON_TAG]
        assert tick(retrain_sensor, defs, instance, requested.cursor).run_requests == []  # cool-down, though a window still alarms
        pinned = {**ROUND, **requested_round}
        recalibrated = train(defs, instance, pinned, retrain.tags)
        assert (recalibrated["model_version"], recalibrated["best_option"], recalibrated["incumbent"]) == ("2", "recalibrate", "1")
        assert recalibrated["validation"] == "recent" and "log_offset" in recalibrated["calibration"]
        tags = client.get_model_version(settings.model_name, "2").tags
        assert tags["bridge.feature_version"] == seen_features.version and tags["bridge.option"] == "recalibrate"

        # The same data, configuration and option again: nothing new is registered, and it says so.
        again = train(defs, instance, pinned, retrain.tags)
        assert again["model_version"] == "2"
        assert sorted(str(v.version) for v in client.search_model_versions(f"name='{settings.model_name}'")) == ["1", "2"]
        assert client.get_run(again["mlflow_parent_run_id"]).data.tags["bridge.registered"] == "nothing new: equals version 2"

    # Manual policy: the failed check, one typed `decay` event at the webhook, and no training.
    with alert_sink() as hook:
        monkeypatch.setenv("BRIDGE_RETRAIN_POLICY", "manual")
        monkeypatch.setenv("BRIDGE_ALERT_WEBHOOK", hook.url)
        manual = build_defs()
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(monitor_windows.name, [windows[1], windows[2]])
            result = dg.materialize([drift_report], instance=instance, resources=manual.resources, partition_key=windows[1])
            assert checks(result)["no_realised_decay"] is False
            (decay,) = hook.received
            assert (decay["kind"], decay["model_name"], decay["details"]["retrain_policy"]) == ("decay", "housing-price", "manual")
            assert decay["details"]["window"] == windows[1] and any("realised decay" in a for a in decay["details"]["alarms"])
            decision = tick(retrain_sensor, manual, instance)
            assert decision.run_requests == [] and "manual policy: alert" in decision.skip_reason.skip_message
            assert instance.fetch_materializations(dg.AssetKey("candidate_model"), limit=1).records == []
            dg.materialize([drift_report], instance=instance, resources=manual.resources, partition_key=windows[2])
            (drift,) = [e for e in hook.received[1:] if e["kind"] == "drift"]  # the covariate-shift window
            assert drift["details"]["window"] == windows[2] and "feature drift in area" in drift["summary"]
    assert model_versions.name == "model_versions"
