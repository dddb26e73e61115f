"""Promotion against the real Ray Serve of the session: simulated clients through the A/B
router with delayed feedback into the A/B report, a rollback under continuous load that fails
no request, the post-deploy guardrail rolling back a version that fails live traffic, and a
recalibrated version priced alike by Serve, batch scoring and MLflow, and the canary that
compares a new version with its predecessor over the same seconds.
Deployment follows the registry through `registry_sensor`, as the daemon would run it."""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from ray import serve

from bridge_assets.core.contract import FEATURES, ROW_ID, validate
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.presets import BOOSTING_TRAINER, preset
from bridge_assets.core.pyfunc import HousingPyfunc
from bridge_assets.core.simulator import Drift, Simulator, load_seed_data
from bridge_assets.core.training import PriceNet, TrainedModel
from bridge_assets.definitions import build_defs
from bridge_assets.defs.raw import raw_batches
from bridge_assets.defs.resources import lake_storage, mlflow_tracking
from bridge_assets.defs.scoring import batch_predictions, predictions_key
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.feedback import release_feedback
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.raw import valid_key
from bridge_assets.ml.registry import PRODUCTION_ALIAS, Registry
from bridge_assets.ml.round import Incumbent, RoundPolicy, run_round
from bridge_assets.ml.tracking import MODEL_SIGNATURE, load_registered, log_round
from bridge_assets.ml.traffic import send_traffic
from bridge_assets_tests.serving_support import call, continuous_load, cpu_hog
from bridge_assets_tests.webhook import alert_sink
from serving.deploy import APP_NAME, deploy
from serving.processes import free_port

REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip


@pytest.fixture
def bridge(service):
    """The session's registry, and `follow()`: one registry_sensor tick and the deployment
    run it requests, in one Dagster instance (definitions built per tick, so that settings a
    test patches apply, as they would when `dagster dev` reloads)."""
    defs = build_defs()
    instance = dg.DagsterInstance.ephemeral()

    def follow() -> list[str]:
        watched = build_defs()
        with dg.build_sensor_context(instance=instance, resources=watched.resources) as context:
            result = watched.get_sensor_def("registry_sensor")(context)
        for request in result.run_requests if isinstance(result, dg.SensorResult) else []:
            run = watched.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance, asset_selection=[dg.AssetKey("production_deployment")], tags=request.tags
            )
            assert run.success
        return [r.run_key for r in result.run_requests] if isinstance(result, dg.SensorResult) else []

    registry = Registry(service.client, service.settings.model_name, service.store, actor="tester")
    production = registry.version_for(PRODUCTION_ALIAS)
    yield registry, follow, defs, instance, production
    service.patch.setenv("BRIDGE_GUARDRAIL_SECONDS", "0")  # moving back starts no watch with a canary
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
    with continuous_load(service.url, REQUEST) as load, alert_sink() as sink:
        time.sleep(1)
        service.patch.setenv("BRIDGE_ALERT_WEBHOOK", sink.url)
        rollback = build_defs().get_job_def("rollback_model").execute_in_process(
            instance=instance, run_config={"ops": {"restore_previous_production": {"config": {"reason": "test: bad latency", "actor": "on-call"}}}}
        )
        assert rollback.success
        assert len(follow()) == 1
        time.sleep(1)
    (alert,) = sink.received
    assert (alert["kind"], alert["version"], alert["details"]["rolled_back"]) == ("rollback", production, newer)
    assert load.failures == []
    assert load.versions == {newer, production}
    assert call(service.url, "/model")[1]["response"]["model_version"] == production
    last = registry.history()[-1]
    assert (last.action, last.version, last.actor, last.reason) == ("rollback", production, f"on-call via dagster run {rollback.run_id[:8]}", "test: bad latency")
    assert last.evidence["rolled_back"] == newer


def _production_model(service, production: str, scratch: Path) -> TrainedModel:
    source = Path(mlflow.artifacts.download_artifacts(f"models:/{service.settings.model_name}/{production}/artifacts", dst_path=str(scratch / "source")))
    return TrainedModel.load(source / "weights.pth", source / "model.json")


def _register(registry: Registry, model: TrainedModel, name: str, scratch: Path) -> str:
    """`model` logged as a pyfunc and registered, as training would, but made by hand."""
    saved = model.save(scratch / name)
    with mlflow.start_run(run_name=name) as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=HousingPyfunc(), signature=MODEL_SIGNATURE,
            artifacts={"weights": str(saved["weights"]), "model": str(saved["model"])},
        )  # fmt: skip
    return registry.register(info.model_uri, {"bridge.run_id": run.info.run_id})


def _overflowing_version(service, registry: Registry, production: str, scratch: Path) -> str:
    """A version that prices a house as exp(log mean price + 100·z(area)): finite and positive
    on every real house (the deploy probe passes), infinite for houses far larger than any in
    the real data — a fault only live traffic finds."""
    model = _production_model(service, production, scratch)
    config = replace(model.config, hidden=(4,), log_target=True, linear_skip=True)
    net = PriceNet(len(model.preprocessor.feature_names), config.hidden, config.linear_skip)
    with torch.no_grad():
        net.skip.weight.zero_()
        net.skip.bias.zero_()
        net.skip.weight[0, model.preprocessor.feature_names.index("area")] = 100.0
    real = load_seed_data()
    overflowing = TrainedModel(config, model.preprocessor, math.log(real["price"].mean()), 1.0, net.state_dict())
    prices = overflowing.predict(real)
    assert np.isfinite(prices).all() and (prices > 0).all()
    assert not np.isfinite(overflowing.predict(pl.DataFrame([{**REQUEST, "area": 90_000}]))).any()
    return _register(registry, overflowing, "overflowing", scratch)


def _traffic(service, tag: str, requests: int, concurrency: int = 1, body=None) -> dict[str, int]:
    """`requests` requests, each its own client (so the router spreads them over the variants),
    from `concurrency` threads; by default every fourth house is far larger than any in the data
    (valid: the contract allows 100,000 sq ft). Each request's status, by request id, once its
    record is in the lake."""

    def send(i: int) -> tuple[str, int]:
        request_id = f"{tag}-{i}"
        house = body or {**REQUEST, "area": 90_000 if i % 4 == 0 else 1200 + i}
        return request_id, call(service.url, "/predict", house, {"X-Request-ID": request_id, "X-Client-ID": request_id})[0]

    with ThreadPoolExecutor(concurrency) as pool:
        statuses = dict(pool.map(send, range(requests)))
    deadline = time.monotonic() + 60
    while read_interactions(service.store).filter(pl.col("request_id").is_in(list(statuses))).height < len(statuses):
        assert time.monotonic() < deadline, "interaction records did not arrive"
        time.sleep(0.5)
    return statuses


def _watched(service) -> dg.Definitions:
    """Definitions with the guardrail on (the session's service runs without it), judging after
    20 requests a side."""
    service.patch.setenv("BRIDGE_GUARDRAIL_SECONDS", "1800")
    service.patch.setenv("BRIDGE_GUARDRAIL_MIN_REQUESTS", "20")
    return build_defs()


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance) -> dg.SensorResult | dg.SkipReason:
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
        return defs.get_sensor_def("post_deploy_guardrail")(context)


def _rolled_back(defs, instance, registry: Registry, follow, result, bad: str, production: str) -> str:
    """The guardrail's rollback run, and the registry and Serve back on `production`; its reason."""
    assert isinstance(result, dg.SensorResult) and len(result.run_requests) == 1, getattr(result.skip_reason, "skip_message", result)
    (request,) = result.run_requests
    reason = request.run_config["ops"]["restore_previous_production"]["config"]["reason"]
    rollback = defs.get_job_def("rollback_model").execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags)
    assert rollback.success
    assert len(follow()) == 1  # deployment follows the registry back, without a canary
    assert call(defs.resources["serving"].settings().url, "/model")[1]["response"]["experiment"]["versions"] == {"production": production}
    last = registry.history()[-1]
    assert (last.action, last.version, last.actor) == ("rollback", production, f"post_deploy_guardrail via dagster run {rollback.run_id[:8]}")
    assert last.reason == reason and last.evidence["rolled_back"] == bad
    return reason


def test_the_guardrail_rolls_back_a_version_that_fails_live_traffic(service, bridge, tmp_path):
    """While a new version is watched, the previous one keeps a tenth of the clients; the
    overflowing version's server errors, against none from its predecessor over the same
    seconds, roll it back."""
    registry, follow, defs, instance, production = bridge
    watched = _watched(service)
    bad = _overflowing_version(service, registry, production, tmp_path)
    registry.set_production(bad, reason="test: an operator promotes without gates")
    assert len(follow()) == 1  # the probe on the real data passes: it is deployed, with the canary
    experiment = call(service.url, "/model")[1]["response"]["experiment"]
    assert experiment["versions"] == {"production": bad, "previous": production} and experiment["previous_weight"] == 0.1
    after = _traffic(service, "guardrail-after", 400)
    logged = read_interactions(service.store).filter(pl.col("request_id").is_in(list(after)))
    shares = {(variant, version): n for variant, version, n in logged.group_by("variant", "model_version").len().iter_rows()}
    assert set(shares) == {("production", bad), ("previous", production)} and 20 <= shares[("previous", production)] <= 70
    assert logged.filter(pl.col("variant") == "previous")["status"].to_list() == [200] * shares[("previous", production)]
    assert sorted(set(after.values())) == [200, 503]  # the large houses fail on the new version (non-finite price: a 503)

    reason = _rolled_back(watched, instance, registry, follow, _tick(watched, instance), bad, production)
    assert "server-error rate" in reason and "Fisher" in reason and f"v{bad}:" in reason and f"v{production}:" in reason, reason
    assert isinstance(again := _tick(watched, instance), dg.SkipReason) and "a rollback" in again.skip_message  # no flapping


def _heavier_version(service, registry: Registry, production: str, scratch: Path) -> str:
    """Production's preprocessing with two 4,096-wide hidden layers in front of a constant price:
    right on every house, but each pass costs milliseconds where Production's costs a fraction
    of one — a few more at one request at a time, a queue under load."""
    model = _production_model(service, production, scratch)
    config = replace(model.config, hidden=(4096, 4096), log_target=True, linear_skip=True)
    net = PriceNet(len(model.preprocessor.feature_names), config.hidden, config.linear_skip)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1e-3)
    heavier = TrainedModel(config, model.preprocessor, math.log(load_seed_data()["price"].mean()), 1.0, net.state_dict())
    return _register(registry, heavier, "heavier", scratch)


def test_the_canary_passes_an_equal_version_under_a_cpu_hog_and_rolls_back_a_heavier_one(service, bridge, tmp_path):
    """Model time over the same seconds: a version as fast as its predecessor stays while two
    processes burn both cores beside the service (both slow down alike); a version whose network
    is far heavier is rolled back, its p95 model time and its predecessor's in the reason."""
    registry, follow, defs, instance, production = bridge
    watched = _watched(service)
    equal = next(v for v in service.versions if v != production)  # the session's other version: same size
    registry.set_production(equal, reason="test: an equal version")
    assert len(follow()) == 1
    with cpu_hog():
        statuses = _traffic(service, "canary-equal", 600, concurrency=8, body=REQUEST)
    assert set(statuses.values()) == {200}
    verdict = _tick(watched, instance)
    assert isinstance(verdict, dg.SensorResult) and not verdict.run_requests
    assert verdict.skip_reason and verdict.skip_reason.skip_message.startswith("healthy"), verdict.skip_reason

    registry.set_production(production, reason="test: back, before the heavier version")
    heavier = _heavier_version(service, registry, production, tmp_path)
    registry.set_production(heavier, reason="test: an operator promotes without gates")
    assert len(follow()) == 1
    statuses = _traffic(service, "canary-heavier", 600, concurrency=8, body=REQUEST)
    assert set(statuses.values()) == {200}  # it answers every request: only its time gives it away
    reason = _rolled_back(watched, instance, registry, follow, _tick(watched, instance), heavier, production)
    assert "p95 model time" in reason and "Mann-Whitney" in reason and "server-error" not in reason.split("(")[0], reason


def test_deployment_follows_what_the_service_serves_and_reports_a_service_that_does_not_answer(service, bridge):
    """registry_sensor asks the service (its /model), not the last materialization: a version
    deployed by hand, or the application gone, is put back (an alert says the service drifted);
    a service that does not answer fails `serving_matches_registry` and alerts once, and
    nothing is deployed behind it."""
    registry, follow, defs, instance, production = bridge
    cursor: str | None = None

    def tick(watched: dg.Definitions) -> dg.SensorResult | dg.SkipReason:
        nonlocal cursor
        with dg.build_sensor_context(instance=instance, resources=watched.resources, cursor=cursor) as context:
            result = watched.get_sensor_def("registry_sensor")(context)
        if isinstance(result, dg.SensorResult) and result.cursor:
            cursor = result.cursor
        for request in result.run_requests if isinstance(result, dg.SensorResult) else []:
            run = watched.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance, asset_selection=[dg.AssetKey("production_deployment")], tags=request.tags
            )
            assert run.success
        return result

    def served() -> str:
        return call(service.url, "/model")[1]["response"]["model_version"]

    with alert_sink() as sink:
        service.patch.setenv("BRIDGE_ALERT_WEBHOOK", sink.url)
        watched = build_defs()
        assert [e.passed for e in tick(watched).asset_events] == [True] and served() == production  # in line
        quiet = tick(watched)
        assert quiet.asset_events == [] and quiet.run_requests == []  # still in line: nothing to say
        other = next(v for v in service.versions if v != production)
        deploy(service.settings.model_name, other, None)  # by hand, outside Dagster
        assert served() == other
        assert len(tick(watched).run_requests) == 1 and served() == production  # put back
        assert [e.passed for e in tick(watched).asset_events] == [True]  # in line again
        serve.delete(APP_NAME)  # Serve up, bridge's application gone
        assert len(tick(watched).run_requests) == 1 and served() == production

        service.patch.setenv("BRIDGE_SERVE_PORT", str(free_port()))  # where nothing answers
        silent = build_defs()
        down = tick(silent)
        assert isinstance(down, dg.SensorResult) and not down.run_requests
        (check,) = down.asset_events
        assert (check.check_name, check.passed) == ("serving_matches_registry", False) and "nothing answers" in check.description
        assert isinstance(tick(silent), dg.SkipReason)  # reported once, not every tick
    assert sink.kinds() == ["deployment_mismatch", "deployment_mismatch", "service_down"]
    assert sink.received[0]["details"] == {"wanted": {"production": production}, "served": {"production": other}}
    assert sink.received[2]["version"] == production and sink.received[2]["details"]["wanted"] == {"production": production}


def test_a_recalibrated_version_prices_alike_in_serve_batch_scoring_and_mlflow(service, bridge):
    """A "recalibrate only" round on Production (prices rose 50% in a batch it never saw) gives a
    version whose stage travels with it: Ray Serve, batch scoring and `mlflow.pyfunc` all apply it."""
    registry, follow, defs, instance, production = bridge
    name, store = service.settings.model_name, service.store
    features = FeatureStore(store)
    latest = features.latest()
    risen = pl.concat(list(Simulator.fit().generate(600, seed=31, batch_id="risen", drift=Drift(price_factor=1.5))))
    rows = pl.concat([features.scan(latest).collect(), prepare_batch(validate(risen).valid, "risen").rows])
    model, _ = load_registered(name, production)
    policy = RoundPolicy(("recalibrate",), recent_batches=frozenset({"risen"}))
    result = run_round(rows, [], policy=policy, incumbent=Incumbent(production, model))
    recalibrated = log_round(service.settings, result, feature_version=latest.version, store=store).model_version
    tags = service.client.get_model_version(name, recalibrated).tags
    assert (tags["bridge.option"], tags["bridge.incumbent"]) == ("recalibrate", production) and "log_offset" in tags["bridge.calibration"]
    registry.set_production(recalibrated, reason="test: a recalibrated version")
    assert len(follow()) == 1

    house = store.scan_parquet([valid_key("sim-serve")]).collect().head(1)
    body = house.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).row(0, named=True)
    status, reply, _ = call(service.url, "/predict", body)
    assert status == 200 and reply["response"]["model_version"] == recalibrated
    with dg.instance_for_test() as scoring:
        scoring.add_dynamic_partitions(raw_batches.name, ["sim-serve"])
        scored = dg.materialize([batch_predictions], partition_key="sim-serve", instance=scoring, resources={"storage": lake_storage(), "mlflow_tracking": mlflow_tracking()})
    assert scored.success
    offline = store.scan_parquet([predictions_key("sim-serve", recalibrated)]).collect().filter(pl.col(ROW_ID) == house[ROW_ID][0])
    frame = pd.DataFrame([body])
    through_mlflow = mlflow.pyfunc.load_model(f"models:/{name}/{recalibrated}").predict(frame)[0]
    assert reply["response"]["prediction"] == pytest.approx(through_mlflow, rel=1e-6)
    assert offline["prediction"][0] == pytest.approx(through_mlflow, rel=1e-6)
    # ... and it is the stage at work: Production's own price times the fitted factor (about 1.5).
    stage = result.best.calibration
    before = mlflow.pyfunc.load_model(f"models:/{name}/{production}").predict(frame)[0]
    assert through_mlflow == pytest.approx(before * np.exp(stage.offset), rel=1e-6) and 1.35 < np.exp(stage.offset) < 1.65


def test_a_version_of_another_trainer_is_served_by_ray_serve_as_mlflow_predicts(service, bridge):
    """A scikit-learn boosting version goes where the network goes: registered by a round, deployed
    by registry_sensor, loaded in Serve's replicas by the loader its model.json names, and
    `/predict` and `/invocations` reply what `mlflow.pyfunc` predicts."""
    registry, follow, defs, instance, production = bridge
    name, store = service.settings.model_name, service.store
    latest = FeatureStore(store).latest()
    result = run_round(FeatureStore(store).scan(latest).collect(), [preset("boosting", max_epochs=60)])
    boosted = log_round(service.settings, result, feature_version=latest.version, store=store).model_version
    registry.set_production(boosted, reason="test: a boosting version")
    assert len(follow()) == 1

    houses = store.scan_parquet([valid_key("sim-serve")]).collect().head(3)
    bodies = houses.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).to_dicts()
    through_mlflow = mlflow.pyfunc.load_model(f"models:/{name}/{boosted}").predict(pd.DataFrame(bodies))
    status, reply, _ = call(service.url, "/predict", bodies[0])
    assert status == 200 and reply["response"]["model_version"] == boosted
    assert reply["response"]["prediction"] == pytest.approx(through_mlflow[0], rel=1e-9)
    status, invoked, _ = call(service.url, "/invocations", {"inputs": bodies})
    assert status == 200 and invoked["predictions"] == pytest.approx(list(through_mlflow), rel=1e-9)
    assert call(service.url, "/model")[1]["response"]["config"]["trainer"] == BOOSTING_TRAINER
