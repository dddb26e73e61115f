"""Monitoring through real Dagster: interaction logs written by the real writer into a lake
(local and moto S3), sensors evaluated, assets materialized."""

import json
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from bridge_assets.cli import main
from bridge_assets.definitions import build_defs
from bridge_assets.defs.monitoring import (
    interaction_logs_sensor,
    interaction_profiles,
    monitor_windows,
    monitor_windows_sensor,
    monitoring,
    window_profiles,
)
from bridge_assets.defs.resources import lake_storage
from bridge_assets.lake.interactions import compact_partition
from bridge_assets.monitoring.profiles import OBJECTS_PREFIX, list_log_objects, window_id, window_rows, window_slices
from bridge_assets_tests.monitoring_support import log_traffic, trained, window_frame
from bridge_assets_tests.webhook import alert_sink
from serving.interactions import InteractionLogger, record

WINDOW = 30
T0 = datetime(2026, 11, 28, 21, 59, 31, tzinfo=UTC)  # window 21:59:30; the next starts 22:00:00 (another hour folder)


def resources(env: dict) -> dict:
    return {"storage": lake_storage(env), "monitoring": monitoring({**env, "BRIDGE_MONITOR_WINDOW_SECONDS": str(WINDOW)})}


def tick_and_profile(instance, env: dict, cursor: str | None) -> tuple[dg.SensorResult, str | None]:
    """One sensor tick; each run it requests is materialized for real."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources(env)) as context:
        result = interaction_logs_sensor(context)
    for request in result.run_requests:
        done = dg.materialize([interaction_profiles], instance=instance, resources=resources(env), run_config=request.run_config)
        assert done.success
    return result, result.cursor


def tick_windows(instance, env: dict, cursor: str | None) -> tuple[list[str], str | None]:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources(env)) as context:
        result = monitor_windows_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(monitor_windows.name, list(request.partition_keys))
    windows = [r.partition_key for r in result.run_requests]
    for window in windows:
        assert dg.materialize([window_profiles], instance=instance, resources=resources(env), partition_key=window).success
    return windows, result.cursor


def test_log_objects_are_profiled_once_across_a_restart_and_a_late_object_reopens_its_window(store, lake_env, tmp_path, monkeypatch):
    env = dict(lake_env)
    model = trained()[0]
    logger = InteractionLogger(lambda: store, "replica-a", spool_dir=tmp_path / "spool", flush_rows=10**6, flush_seconds=3600)
    log_traffic(logger, window_frame(120, seed=41), model, T0, prefix="a", seconds=20)  # window 21:59:30
    logger.flush()
    log_traffic(logger, window_frame(80, seed=42), model, T0 + timedelta(seconds=40), prefix="b", seconds=10)  # 22:00:00
    rejected = record(request_id="bad-1", endpoint="/predict", status=422, model_name="housing-price", model_version="1",
                      variant="production", latency_ms=1.0, features={"area": -5}, error="invalid input: area", timestamp=T0 + timedelta(seconds=2))
    logger.log([rejected])
    logger.flush()
    first_window, second_window = window_id(T0, WINDOW), window_id(T0 + timedelta(seconds=40), WINDOW)
    assert len(list_log_objects(store)) == 3  # one flush of window 1; window 2 and the rejection in two hour folders

    with dg.instance_for_test() as instance:
        result, cursor = tick_and_profile(instance, env, None)
        assert len(result.run_requests) == 1
        assert len([k for k in store.list(OBJECTS_PREFIX) if k.endswith(".json")]) == 3
        # A restart that lost the cursor, and a retried run: nothing is profiled twice.
        again, _ = tick_and_profile(instance, env, None)
        assert again.run_requests == []
        retry = dg.materialize([interaction_profiles], instance=instance, resources=resources(env), run_config=result.run_requests[0].run_config)
        metadata = retry.asset_materializations_for_node("interaction_profiles")[0].metadata
        assert metadata["objects_profiled"].value == 0 and metadata["objects_already_done"].value == 3

        windows, window_cursor = tick_windows(instance, env, None)
        assert sorted(windows) == sorted([first_window, second_window])
        counts = {w: sum(s.rows for s in window_slices(store, w)) for w in windows}
        assert counts == {first_window: 120, second_window: 80}
        rejected_counts = window_slices(store, first_window)[0].rejected
        assert rejected_counts == {"422 area": 1}
        assert tick_windows(instance, env, window_cursor)[0] == []  # nothing changed

        # A late flush: records of the first window written after it was profiled, into the
        # older hour folder. Only that window is requested again, and it now counts them.
        log_traffic(logger, window_frame(30, seed=43), model, T0 + timedelta(seconds=25), prefix="late", seconds=3)
        logger.close()
        late = [k for k in list_log_objects(store) if "hour=21" in k]
        assert len(late) == 3  # window 1, the rejection, and the late flush
        _, cursor = tick_and_profile(instance, env, cursor)
        windows, window_cursor = tick_windows(instance, env, window_cursor)
        assert windows == [first_window]
        assert sum(s.rows for s in window_slices(store, first_window)) == 150
        indexes = [json.loads(store.get_text(k)) for k in store.list(OBJECTS_PREFIX) if k.endswith(".json")]
        assert sorted(i["key"] for i in indexes) == sorted(list_log_objects(store))  # each object exactly once

        # The serving layer compacts the closed hour into one file: nothing is counted twice,
        # and records compacted before they were profiled are counted once.
        assert compact_partition(store, "date=2026-11-28/hour=21").files == 3
        tick_and_profile(instance, env, cursor)
        assert tick_windows(instance, env, window_cursor)[0] == []
        unseen = InteractionLogger(lambda: store, "replica-b", spool_dir=tmp_path / "spool-b", flush_rows=10**6, flush_seconds=3600)
        log_traffic(unseen, window_frame(10, seed=44), model, T0 + timedelta(seconds=5), prefix="unseen", seconds=1)
        unseen.close()
        assert compact_partition(store, "date=2026-11-28/hour=21").files == 2  # the merged file and the new one
        tick_and_profile(instance, env, None)
        windows, _ = tick_windows(instance, env, window_cursor)
        assert windows == [first_window]
        assert sum(s.rows for s in window_slices(store, first_window)) == 160
        assert sum(s.rows for s in window_slices(store, second_window)) == 80
        assert window_rows(store, first_window).height == 160

    # The same from a shell: `bridge monitor` reports a window (no reference yet: no alarms).
    monkeypatch.setenv("BRIDGE_MONITOR_WINDOW_SECONDS", str(WINDOW))
    assert main(["monitor", "--window", first_window]) == 0
    saved = json.loads(store.get_text(f"monitoring/reports/{first_window}/report.json"))
    assert saved["slices"][0]["rows"] == 160 and saved["slices"][0]["reference"] is None


def _running_run(instance: dg.DagsterInstance, sensor: str, **tags: str) -> dg.DagsterRun:
    """A run the named sensor launched that has not ended (as under a busy daemon)."""
    return instance.add_run(dg.DagsterRun(job_name="running", status=dg.DagsterRunStatus.STARTED, tags={"dagster/sensor_name": sensor, **tags}))


@pytest.mark.parametrize("lake_env", ["local"], indirect=True)
def test_traffic_arriving_while_a_run_waits_joins_the_next_run_instead_of_queueing_more(store, lake_env, tmp_path):
    """While a profile run or a window's report run is queued or running, the sensors hold what
    changed since (objects, the window's new digest) and request it once that run has ended."""
    env = dict(lake_env)
    model = trained()[0]
    logger = InteractionLogger(lambda: store, "replica-a", spool_dir=tmp_path / "spool", flush_rows=10**6, flush_seconds=3600)
    log_traffic(logger, window_frame(50, seed=51), model, T0, prefix="a", seconds=5)
    logger.flush()
    window = window_id(T0, WINDOW)
    with dg.instance_for_test() as instance:
        waiting = _running_run(instance, "interaction_logs_sensor")
        held, cursor = tick_and_profile(instance, env, None)
        assert held.run_requests == [] and cursor is None and f"wait for profile run {waiting.run_id}" in held.skip_reason.skip_message
        instance.report_run_failed(waiting)  # ended: what it held goes in the next run
        _, cursor = tick_and_profile(instance, env, None)
        windows, window_cursor = tick_windows(instance, env, None)
        assert windows == [window]

        log_traffic(logger, window_frame(20, seed=52), model, T0 + timedelta(seconds=10), prefix="b", seconds=3)
        logger.flush()
        tick_and_profile(instance, env, cursor)
        report = _running_run(instance, "monitor_windows_sensor", **{"dagster/partition": window})
        windows, held_cursor = tick_windows(instance, env, window_cursor)
        assert windows == [] and json.loads(held_cursor)[window] == json.loads(window_cursor)[window]
        instance.report_run_failed(report)
        windows, _ = tick_windows(instance, env, held_cursor)
        assert windows == [window] and sum(s.rows for s in window_slices(store, window)) == 70
    logger.close()


def test_an_asset_overdue_by_its_freshness_policy_alerts_once(monkeypatch):
    """The daemon marks drift_report FAIL (its freshness policy); freshness_sensor sends one
    `freshness_failed` event, not one per tick, and again only for a new failure."""
    from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange  # what the daemon records

    def fail(instance: dg.DagsterInstance) -> None:
        instance.report_runless_asset_event(FreshnessStateChange(
            key=dg.AssetKey("drift_report"), new_state=FreshnessState.FAIL, previous_state=FreshnessState.PASS,
            state_change_timestamp=time.time(),
        ))  # fmt: skip

    with alert_sink() as sink, dg.instance_for_test() as instance:
        monkeypatch.setenv("BRIDGE_ALERT_WEBHOOK", sink.url)
        defs = build_defs()
        sensor = defs.get_sensor_def("freshness_sensor")
        cursor = None
        for round_ in range(3):
            if round_ != 1:
                fail(instance)
            with dg.build_sensor_context(instance=instance, resources=defs.resources, cursor=cursor) as context:
                sensor(context)
                cursor = context.cursor
    assert sink.kinds() == ["freshness_failed", "freshness_failed"]
    assert sink.received[0]["details"]["asset"] == "drift_report" and "overdue" in sink.received[0]["summary"]
