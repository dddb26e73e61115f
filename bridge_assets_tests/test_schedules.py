"""The training schedule and every cadence read from configuration."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from bridge_assets.defs.cadence import freshness_hours, sensor_interval
from bridge_assets.defs.resources import lake_storage
from bridge_assets.defs.schedules import TRAINING_SCHEDULE, TRIGGER_TAG, training_round_schedule
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import build_features
from bridge_assets.lake.landing import land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch


def _tick(schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance, env: dict[str, str]):
    # Entered and left here: an unclosed context keeps its own instance open, and its late
    # closing would put a disposed instance back into Dagster's context for later tests.
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=UTC),
        resources={"storage": lake_storage(env)},
    ) as context:
        return schedule.evaluate_tick(context)


def test_cadences_come_from_the_environment():
    assert training_round_schedule({}).cron_schedule == "0 3 * * 1"
    configured = training_round_schedule({"BRIDGE_TRAINING_CRON": "*/10 * * * *", "BRIDGE_SCHEDULE_TIMEZONE": "Europe/London"})
    assert (configured.cron_schedule, configured.execution_timezone) == ("*/10 * * * *", "Europe/London")
    assert configured.default_status == dg.DefaultScheduleStatus.RUNNING
    assert configured.target.assets_defs == [candidate_model]
    assert sensor_interval("landed_batches_sensor", 15, {}) == 15
    assert sensor_interval("landed_batches_sensor", 15, {"BRIDGE_SENSOR_INTERVAL": "5"}) == 5
    one = {"BRIDGE_SENSOR_INTERVAL": "5", "BRIDGE_SENSOR_INTERVAL_LANDED_BATCHES_SENSOR": "2"}
    assert sensor_interval("landed_batches_sensor", 15, one) == 2
    with pytest.raises(ValueError, match="BRIDGE_SENSOR_INTERVAL: Input should be greater than 0"):
        sensor_interval("x", 15, {"BRIDGE_SENSOR_INTERVAL": "0"})
    with pytest.raises(ValueError, match="BRIDGE_SENSOR_INTERVAL_X=.*at least 1 second"):
        sensor_interval("x", 15, {"BRIDGE_SENSOR_INTERVAL_X": "0"})
    with pytest.raises(ValueError, match="BRIDGE_SCHEDULE_TIMEZONE: not an IANA timezone name: 'Mars/Olympus'"):
        training_round_schedule({"BRIDGE_SCHEDULE_TIMEZONE": "Mars/Olympus"})
    assert freshness_hours("housing_features", 48, {}) == timedelta(hours=48)
    assert freshness_hours("housing_features", 48, {"BRIDGE_FRESHNESS_HOURS_HOUSING_FEATURES": "1.5"}) == timedelta(minutes=90)


def test_the_code_location_takes_its_cadences_windows_and_retries_from_the_environment_it_is_given(tmp_path):
    """`build_defs(env)`, not the environment at import: two code locations built from two
    environments in one process each get their own intervals, freshness windows and storage
    retries; what an environment leaves unset keeps the declared default."""
    from bridge_assets.definitions import build_defs

    home = {"BRIDGE_HOME": str(tmp_path / "home")}
    tuned = build_defs(
        home | {
            "BRIDGE_SENSOR_INTERVAL": "5", "BRIDGE_SENSOR_INTERVAL_REGISTRY_SENSOR": "7",
            "BRIDGE_FRESHNESS_HOURS_DRIFT_REPORT": "2", "BRIDGE_STORAGE_RETRIES": "1",
            "BRIDGE_STORAGE_RETRY_DELAY_SECONDS": "0.5", "BRIDGE_INTERACTIONS_RETENTION_DAYS": "30",
        }
    )  # fmt: skip
    default = build_defs(home)

    def intervals(defs: dg.Definitions) -> dict[str, int | None]:
        return {sensor.name: sensor.minimum_interval_seconds for sensor in defs.sensors}

    def windows(defs: dg.Definitions) -> dict[str, tuple[timedelta, timedelta]]:
        graph = defs.resolve_asset_graph()
        policies = {name: graph.get(dg.AssetKey(name)).freshness_policy for name in ("drift_report", "housing_features")}
        return {name: (policy.fail_window.to_timedelta(), policy.warn_window.to_timedelta()) for name, policy in policies.items()}

    assert intervals(tuned)["registry_sensor"] == 7 and intervals(tuned)["bridge_automation"] == 5
    assert set(intervals(tuned).values()) == {5, 7}
    assert intervals(default)["registry_sensor"] == 30 and intervals(default)["landed_batches_sensor"] == 15
    assert windows(tuned) == {"drift_report": (timedelta(hours=2), timedelta(hours=1)), "housing_features": (timedelta(hours=48), timedelta(hours=24))}
    assert windows(default)["drift_report"] == (timedelta(hours=6), timedelta(hours=3))
    storage = tuned.resources["storage"]
    assert (storage.retries, storage.retry_delay_seconds, storage.interactions_retention_days) == (1, 0.5, 30.0)
    assert default.resources["storage"].retries == 3


def test_training_schedule_skips_until_features_exist_then_pins_the_latest_version(tmp_path):
    env = {"BRIDGE_HOME": str(tmp_path / "home")}
    schedule = training_round_schedule(env)
    store = lake_storage(env).open()
    with dg.instance_for_test() as instance:
        (skip,) = [_tick(schedule, instance, env).skip_message]
        assert skip == "no published feature version yet: nothing to train on"

        land_seed(store)
        for batch in landed_batches(store):
            validate_batch(store, batch)
        version = build_features(store).version.version
        (request,) = _tick(schedule, instance, env).run_requests
        assert request.run_config == {"ops": {"candidate_model": {"config": {"feature_version": version}}}}
        assert request.tags[TRIGGER_TAG] == "schedule"

        running = create_run_for_test(
            instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED, asset_selection={candidate_model.key}
        )
        result = _tick(schedule, instance, env)
        assert not result.run_requests and result.skip_message == f"training run {running.run_id} is still in progress"


def test_schedule_is_part_of_the_code_location():
    from bridge_assets.definitions import build_defs

    defs = build_defs()
    schedule = defs.resolve_schedule_def(TRAINING_SCHEDULE)
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("housing_features")).freshness_policy is not None
    assert graph.get(dg.AssetKey("drift_report")).freshness_policy is not None
