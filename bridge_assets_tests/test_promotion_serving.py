"""Promotion against the real Ray Serve of the session: simulated clients through the A/B
router with delayed feedback into the A/B report, and a rollback under continuous load that
fails no request. Deployment follows the registry through `registry_sensor`, as the daemon
would run it."""

import time

import dagster as dg
import polars as pl
import pytest

from bridge_assets.definitions import build_defs
from bridge_assets.lake.feedback import release_feedback
from bridge_assets.ml.registry import PRODUCTION_ALIAS, Registry
from bridge_assets.ml.traffic import send_traffic
from bridge_assets_tests.serving_support import call, continuous_load
from serving.interactions import read_interactions

REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip


@pytest.fixture
def bridge(service):
    """The session's registry, and `follow()`: one registry_sensor tick and the deployment
    run it requests, in one Dagster instance."""
    defs = build_defs()
    instance = dg.DagsterInstance.ephemeral()
    sensor = defs.get_sensor_def("registry_sensor")
    job = defs.resolve_implicit_global_asset_job_def()

    def follow() -> list[str]:
        with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
            result = sensor(context)
        for request in result.run_requests if isinstance(result, dg.SensorResult) else []:
            run = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("production_deployment")], tags=request.tags)
            assert run.success
        return [r.run_key for r in result.run_requests] if isinstance(result, dg.SensorResult) else []

    registry = Registry(service.client, service.settings.model_name, service.store, actor="tester")
    production = registry.version_for(PRODUCTION_ALIAS)
    yield registry, follow, defs, instance, production
    registry.unstage("test done")
    if registry.version_for(PRODUCTION_ALIAS) != production:
        registry.set_production(production, reason="test done: back to the session's Production")
    follow()


def test_traffic_through_the_router_becomes_an_ab_report(service, bridge):
    registry, follow, defs, instance, production = bridge
    challenger = next(v for v in service.versions if v != production)
    registry.stage_version(challenger, reason="test: experiment", evidence={})
    assert len(follow()) == 1  # the sensor deploys Production with Staging beside it (weight 0.5)
    assert follow() == []  # and then sees the service in line

    result = send_traffic(service.store, service.url, rate=40, duration=5, clients=60, seed=3)
    assert result.sent == result.ok == 200 and set(result.variants) == {"production", "staging"}
    deadline = time.monotonic() + 60
    while read_interactions(service.store).filter(pl.col("request_id").str.starts_with(result.traffic_id)).height < 200:
        assert time.monotonic() < deadline, "interaction records did not arrive"
        time.sleep(0.5)
    logged = read_interactions(service.store).filter(pl.col("request_id").str.starts_with(result.traffic_id))
    per_client = logged.group_by("client_id").agg(pl.col("variant").n_unique())
    assert per_client["variant"].max() == 1  # sticky: a client always meets the same variant
    release_feedback(service.store, result.traffic_id)

    run = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("feedback"), dg.AssetKey("ab_report")]
    )
    metadata = {e.asset_key.path[-1]: {k: v.value for k, v in e.materialization.metadata.items()} for e in run.get_asset_materialization_events()}
    assert metadata["feedback"]["matched"] >= 200
    report = metadata["ab_report"]
    assert (report["production_version"], report["staging_version"]) == (production, challenger)
    assert report["labels_production"] > 0 and report["labels_staging"] > 0
    assert report["labels_production"] + report["labels_staging"] == 200
    assert registry.verdict(challenger).evidence["verdict"] == report["verdict"]


def test_rollback_under_load_fails_no_request(service, bridge):
    registry, follow, defs, instance, production = bridge
    newer = next(v for v in service.versions if v != production)
    registry.set_production(newer, reason="test: a Production to roll back from")
    follow()
    with continuous_load(service.url, REQUEST) as load:
        time.sleep(1)
        rollback = defs.get_job_def("rollback_model").execute_in_process(
            instance=instance, run_config={"ops": {"restore_previous_production": {"config": {"reason": "test: bad latency", "actor": "on-call"}}}}
        )
        assert rollback.success
        assert len(follow()) == 1
        time.sleep(1)
    assert load.failures == []
    assert load.versions == {newer, production}
    assert call(service.url, "/model")[1]["response"]["model_version"] == production
    last = registry.history()[-1]
    assert (last.action, last.version, last.actor, last.reason) == ("rollback", production, "on-call", "test: bad latency")
    assert last.evidence["rolled_back"] == newer
