"""Delayed ground truth: withheld, released append-only, joined to interaction records written
by the service's own logger; the feedback and A/B report assets through Dagster, whose
verdict is what lets Staging become Production."""

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest

from bridge_assets.core.contract import FEATURES, ROW_ID, TARGET
from bridge_assets.core.simulator import Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.lake.feedback import (
    LABELS_PREFIX,
    join_feedback,
    read_feedback_labels,
    release_feedback,
    withhold_feedback,
)
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.landing import landed_batches, read_batch
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import PRODUCTION_ALIAS, PromotionRefused, Registry
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.monitoring.retrain import land_feedback_batch
from bridge_assets_tests.webhook import alert_sink
from serving.interactions import InteractionLogger, record


def log_interactions(store: ObjectStore, records: list[dict], spool) -> None:
    """Through the service's interaction logger: spooled, then published to the lake."""
    logger = InteractionLogger(lambda: store, "test-replica", spool_dir=spool, flush_seconds=60)
    logger.log(records)
    stats = logger.close()
    assert stats["dropped"] == 0


def served(request_id: str, prediction: float, variant: str = "production", version: str = "1", client: str | None = None, status: int = 200) -> dict:
    return record(
        request_id=request_id, endpoint="/predict", status=status, model_name="housing-price", model_version=version,
        variant=variant, latency_ms=2.0, prediction=prediction if status == 200 else None, client_id=client,
    )  # fmt: skip


def test_labels_released_twice_count_once_and_unlogged_requests_are_counted(store: ObjectStore, tmp_path):
    ids = [f"t1-{i}" for i in range(10)]
    withhold_feedback(store, "t1", ids, [100.0 + i for i in range(10)])
    with pytest.raises(FileExistsError):  # withheld prices are never replaced
        withhold_feedback(store, "t1", ids, [0.0] * 10)
    first, released = release_feedback(store, "t1", fraction=0.5, seed=1)
    second, all_rows = release_feedback(store, "t1")
    assert (released, all_rows) == (5, 10) and first != second
    assert len(store.list(LABELS_PREFIX)) == 2  # append-only: a new object per release

    # Logged: 7 of the 10 requests succeeded, one was rejected, two never reached the log,
    # one succeeded request was written twice (a replayed spool).
    records = [served(i, 110.0 + n) for n, i in enumerate(ids[:7])] + [served(ids[7], 0.0, status=422), served(ids[0], 110.0)]
    log_interactions(store, records, tmp_path / "spool")
    labels = read_feedback_labels(store)
    assert labels.height == 10 and labels["request_id"].n_unique() == 10
    joined = join_feedback(read_interactions(store), read_feedback_labels(store, deduplicate=False))
    assert (joined.labels, joined.matched, joined.unmatched_labels, joined.duplicate_labels) == (10, 7, 3, 5)
    errors = dict(joined.joined.select("request_id", "error").iter_rows())
    assert errors["t1-0"] == pytest.approx(10.0) and errors["t1-6"] == pytest.approx(110.0 + 6 - 106.0)
    with pytest.raises(FileNotFoundError):
        release_feedback(store, "never-sent")


@pytest.fixture
def experiment(monkeypatch, tmp_path):
    """Production v1 and Staging v2 registered in a real MLflow store (local lake)."""
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "home"))
    for name in ("BRIDGE_S3_BUCKET", "MLFLOW_TRACKING_URI", "BRIDGE_MLFLOW_ARTIFACTS"):
        monkeypatch.delenv(name, raising=False)
    settings = MlflowSettings.from_env()
    client = settings.activate()

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [1.0] * len(model_input)

    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="model", python_model=Constant()).model_uri
    from bridge_assets.lake.settings import StorageSettings

    store = StorageSettings.from_env().open()
    registry = Registry(client, settings.model_name, store, actor="tester")
    production, staging = registry.register(uri, {}), registry.register(uri, {})
    registry.set_production(production, reason="fixture")
    registry.stage_version(staging, reason="gates passed", evidence={})
    return registry, production, staging, store


def traffic(store, production: str, staging: str, staging_scale: float, seed: int, spool) -> None:
    """400 clients, 5 requests each, sticky halves; Staging's errors scaled by `staging_scale`."""
    rng = np.random.default_rng(seed)
    records, ids, prices = [], [], []
    for client in range(400):
        variant, version = ("staging", staging) if client % 2 else ("production", production)
        scale = (staging_scale if variant == "staging" else 1.0) * rng.lognormal(0, 0.3)
        for k in range(5):
            request_id, price = f"s{seed}-c{client}-{k}", float(rng.uniform(2e6, 8e6))
            records.append(served(request_id, price + scale * 1e6 * rng.standard_normal(), variant, version, f"client-{client}"))
            ids.append(request_id)
            prices.append(price)
    log_interactions(store, records, spool)
    withhold_feedback(store, f"ab-{seed}", ids, prices)
    release_feedback(store, f"ab-{seed}")


def materialize(*assets: str) -> dict[str, dict]:
    result = build_defs().resolve_implicit_global_asset_job_def().execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), asset_selection=[dg.AssetKey(a) for a in assets]
    )
    return {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
        for e in result.get_asset_materialization_events()
    }


def test_the_ab_report_verdict_is_what_lets_staging_become_production(experiment, tmp_path):
    registry, production, staging, store = experiment
    traffic(store, production, staging, 1.0, seed=1, spool=tmp_path / "spool1")  # no real difference
    first = materialize("feedback", "ab_report")
    assert first["feedback"]["labels"] == 2000 and first["feedback"]["matched"] == 2000
    assert first["ab_report"]["verdict"] in ("keep", "inconclusive")
    with pytest.raises(PromotionRefused, match=f"latest verdict: {first['ab_report']['verdict']}"):
        registry.promote_staging()

    traffic(store, production, staging, 0.8, seed=2, spool=tmp_path / "spool2")  # Staging clearly better
    second = materialize("feedback", "ab_report")["ab_report"]
    assert second["labels_staging"] == 2000 and second["verdict"] == "promote", second["reason"]
    assert "data:image/png;base64," in second["plots"] and "Welch t on per-client MAE" in second["report"]
    # The verdict on seed 2 was judged on both traffics (4,000 labels) and recorded on v2.
    verdict = registry.verdict(staging)
    assert verdict.key == second["audit_record"] and verdict.evidence["verdict"] == "promote"
    assert registry.promote_staging() == production
    assert registry.version_for(PRODUCTION_ALIAS) == staging
    assert registry.history(staging)[-1].reason.startswith("A/B verdict promote")


def test_labelled_traffic_lands_once_when_the_monitoring_window_changes_length(store: ObjectStore):
    """The demo's 2-minute windows, then `make dev`'s hour: the same labelled requests regroup
    into a new window and must not land as a second feedback batch."""
    houses = pl.concat(Simulator.fit().generate(30, seed=3, batch_id="traffic"))
    joined = houses.select(*FEATURES, TARGET).with_columns(request_id=houses[ROW_ID], row_index=pl.lit(0))
    two_minutes, hour, next_hour = "20261128T221800Z-120s", "20261128T220000Z-3600s", "20261128T230000Z-3600s"
    batch, landed = land_feedback_batch(store, two_minutes, joined.head(20))
    assert (batch.batch_id, landed) == (f"feedback-{two_minutes}", 20)
    assert land_feedback_batch(store, hour, joined.head(20)) == (None, 0)  # nothing new in the hour
    batch, landed = land_feedback_batch(store, hour, joined.head(25))
    assert (batch.batch_id, landed) == (f"feedback-{hour}", 5)
    batch, landed = land_feedback_batch(store, hour, joined)
    assert (batch.batch_id, landed) == (f"feedback-{hour}-2", 5)
    batch, landed = land_feedback_batch(store, next_hour, joined.head(3))  # a window that does not overlap
    assert (batch.batch_id, landed) == (f"feedback-{next_hour}", 3)
    feedback_batches = [b for b in landed_batches(store) if b.batch_id.startswith("feedback-")]
    rows = pl.concat([read_batch(store, b) for b in feedback_batches if next_hour not in b.batch_id])
    assert rows.height == rows[ROW_ID].n_unique() == 30


def test_the_automatic_promotion_policy_acts_on_the_verdict_and_tells_people(experiment, tmp_path, monkeypatch):
    """`BRIDGE_PROMOTION_POLICY=automatic`: new labels bring the A/B report (experiment_sensor),
    a `promote` verdict promotes with the verdict as the audit reason, and the verdict is one
    typed `ab_verdict` event at the webhook."""
    registry, production, staging, store = experiment
    monkeypatch.setenv("BRIDGE_PROMOTION_POLICY", "automatic")
    traffic(store, production, staging, 0.8, seed=2, spool=tmp_path / "spool")  # Staging clearly better
    with alert_sink() as sink:
        monkeypatch.setenv("BRIDGE_ALERT_WEBHOOK", sink.url)
        defs = build_defs()
        instance = dg.DagsterInstance.ephemeral()
        with dg.build_sensor_context(instance=instance, resources=defs.resources) as context:
            requested = defs.get_sensor_def("experiment_sensor")(context)
            cursor = context.cursor
        (request,) = requested.run_requests
        run = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey("feedback"), dg.AssetKey("ab_report")})
        result = run.execute_in_process(instance=instance, tags=request.tags)
        with dg.build_sensor_context(instance=instance, resources=defs.resources, cursor=cursor) as context:
            assert isinstance(defs.get_sensor_def("experiment_sensor")(context), dg.SkipReason)  # nothing new, and no experiment now
    report = {k: v.value for k, v in result.asset_materializations_for_node("ab_report")[0].metadata.items()}
    assert (report["verdict"], report["policy_action"]) == ("promote", "promoted")
    assert registry.version_for(PRODUCTION_ALIAS) == staging and registry.version_for("staging") is None
    promoted = registry.history(staging)[-1]
    assert promoted.action == "promote" and promoted.reason.startswith("A/B verdict promote") and promoted.actor.startswith("dagster run ")
    (event,) = sink.received
    assert (event["kind"], event["version"], event["details"]["action"]) == ("ab_verdict", staging, "promoted")


def test_a_keep_verdict_ends_the_experiment_under_the_automatic_policy_and_only_reports_under_manual(experiment, tmp_path, monkeypatch):
    registry, production, staging, store = experiment
    traffic(store, production, staging, 1.3, seed=3, spool=tmp_path / "spool")  # Staging clearly worse
    manual = materialize("feedback", "ab_report")["ab_report"]
    assert (manual["verdict"], manual["policy_action"]) == ("keep", "reported") and registry.version_for("staging") == staging
    monkeypatch.setenv("BRIDGE_PROMOTION_POLICY", "automatic")
    automatic = materialize("feedback", "ab_report")["ab_report"]
    assert (automatic["verdict"], automatic["policy_action"]) == ("keep", "ended")
    assert registry.version_for("staging") is None and registry.version_for(PRODUCTION_ALIAS) == production
    assert registry.history(staging)[-1].action == "unstage"
