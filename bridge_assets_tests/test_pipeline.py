"""Landing → sensor → raw partitions → features, as real Dagster materializations.

Runs against the local default and against moto's S3 server over HTTP.
"""

import io

import dagster as dg
import polars as pl
import pytest

from bridge_assets.core.simulator import Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.defs.features import feature_backlog_sensor
from bridge_assets.defs.raw import landed_batches_sensor, raw_batches
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import land_batch, land_seed, release_labels
from bridge_assets.lake.raw import quarantine_key, valid_key
from bridge_assets.lake.storage import ObjectStore


def tick(instance: dg.DagsterInstance, cursor: str | None):
    """One evaluation of the landing sensor, applying its partition requests as the daemon would."""
    defs = build_defs()
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources) as context:
        result = landed_batches_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def materialize(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> dg.ExecuteInProcessResult:
    job = build_defs().resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(key)], partition_key=partition)


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = result.get_asset_materialization_events()
    return {k: v.value for k, v in event.materialization.metadata.items()}


def land_simulated(store: ObjectStore, batch_id: str, rows: int, **knobs) -> pl.DataFrame:
    frame = pl.concat(Simulator.fit().generate(rows, seed=21, batch_id=batch_id, **knobs))
    land_batch(store, batch_id, [frame])
    return frame


def test_batches_flow_from_landing_to_a_versioned_feature_table(store: ObjectStore):
    land_seed(store)
    dirty = land_simulated(store, "sim-dirty", 4000, corrupt_fraction=0.08, case_noise=0.1)
    clean = pl.concat(Simulator.fit().generate(4000, seed=21, batch_id="sim-dirty", case_noise=0.1))
    corrupted = dirty.join(clean, on=dirty.columns, how="anti", nulls_equal=True).height

    with dg.instance_for_test() as instance:
        first = tick(instance, None)
        assert sorted(r.partition_key for r in first.run_requests) == ["housing-seed", "sim-dirty"]
        assert sorted(instance.get_dynamic_partitions(raw_batches.name)) == ["housing-seed", "sim-dirty"]
        assert {r.run_key for r in first.run_requests} == {"housing-seed", "sim-dirty"}
        assert not tick(instance, first.cursor).run_requests  # no repeats

        seed_run = materialize(instance, "raw_housing", "housing-seed")
        dirty_run = materialize(instance, "raw_housing", "sim-dirty")
        seed_meta, dirty_meta = metadata(seed_run), metadata(dirty_run)
        assert (seed_meta["rows_valid"], seed_meta["rows_quarantined"]) == (545, 0)
        assert dirty_meta["rows_quarantined"] == corrupted > 0
        assert dirty_meta["rows_valid"] + corrupted == 4000
        quarantined = store.scan_parquet([quarantine_key("sim-dirty")]).collect()
        assert quarantined.height == corrupted and quarantined["reason"].null_count() == 0
        (check,) = dirty_run.get_asset_check_evaluations()
        assert check.check_name == "quarantine_rate" and check.passed is False  # 8% corrupt > 5% threshold

        features_run = materialize(instance, "housing_features")
        feature_meta = metadata(features_run)
        assert feature_meta["rows"] == 545 + 4000 - corrupted - feature_meta["duplicates_dropped"]
        assert all(e.passed for e in features_run.get_asset_check_evaluations())
        assert len(features_run.get_asset_check_evaluations()) == 5
        version = FeatureStore(store).load(feature_meta["version"])
        assert version.batch_ids == ["housing-seed", "sim-dirty"]
        rows = FeatureStore(store).scan(version).collect()
        assert set(rows["mainroad"]) == {"yes", "no"}  # odd case normalised
        first_parts = {p.key: store.get_bytes(p.key) for p in version.parts}

        # A new batch: only it is requested and processed; old parts stay byte-identical.
        land_simulated(store, "sim-later", 1000)
        later = tick(instance, first.cursor)
        assert [r.partition_key for r in later.run_requests] == ["sim-later"]
        materialize(instance, "raw_housing", "sim-later")
        newer = metadata(materialize(instance, "housing_features"))
        assert newer["previous_version"] == version.version and newer["added_batches"] == ["sim-later"]
        assert {k: store.get_bytes(k) for k in first_parts} == first_parts
        assert FeatureStore(store).scan(version.version).collect().equals(rows)

        # A restarted daemon without its cursor neither repeats nor misses: materialized batches are skipped.
        assert not tick(instance, None).run_requests


def _parquet_without_area() -> bytes:
    buffer = io.BytesIO()
    pl.concat(Simulator.fit().generate(50, seed=3, batch_id="no-area")).drop("area").write_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "body, reason",
    [(b"this is not parquet", "cannot read batch object"), (b"", "cannot read batch object"), (None, "missing required column")],
    ids=["unreadable", "empty file", "without a required column"],
)
def test_a_batch_that_cannot_be_validated_fails_naming_the_object_and_writes_nothing(store: ObjectStore, body, reason):
    store.put_bytes("landing/batches/broken/data.parquet", _parquet_without_area() if body is None else body)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(raw_batches.name, ["broken"])
        with pytest.raises(dg.Failure, match=rf"broken/data\.parquet.*{reason}"):
            materialize(instance, "raw_housing", "broken")
    assert store.list("raw/") == []  # neither valid rows nor a quarantine, not even in part


def test_simulated_batch_asset_lands_a_batch_with_run_config(store: ObjectStore):
    job = build_defs().resolve_implicit_global_asset_job_def()
    config = {"ops": {"simulated_batch": {"config": {"rows": 1500, "seed": 3, "batch_id": "ui-batch", "withhold_labels": True}}}}
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("simulated_batch")], run_config=config)
        assert metadata(result)["rows"] == 1500
    landed = store.scan_parquet(["landing/batches/ui-batch/data.parquet"]).collect()
    assert landed.height == 1500 and "price" not in landed.columns


def backlog_tick(instance: dg.DagsterInstance) -> dg.SensorResult:
    """One evaluation of the feature backlog sensor."""
    defs = build_defs()
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
        return feature_backlog_sensor(context)


def test_withheld_labels_join_the_features_when_they_land(store: ObjectStore):
    land_seed(store)
    land_batch(store, "sim-late", Simulator.fit().generate(1000, seed=4, batch_id="sim-late"), withhold_labels=True)
    with dg.instance_for_test() as instance:
        first = tick(instance, None)
        for request in first.run_requests:
            materialize(instance, "raw_housing", request.partition_key)
        assert len(backlog_tick(instance).run_requests) == 1  # both batches validated, no version yet
        before = metadata(materialize(instance, "housing_features"))
        assert before["rows_awaiting_label"] == 1000 and before["batches"] == ["housing-seed"]

        assert not backlog_tick(instance).run_requests  # sim-late waits for labels: nothing to do
        release_labels(store, "sim-late")
        assert len(backlog_tick(instance).run_requests) == 1

        after = metadata(materialize(instance, "housing_features"))
        assert after["added_batches"] == ["sim-late"] and after["rows"] == before["rows"] + 1000 - after["duplicates_dropped"]
        prices = FeatureStore(store).scan(after["version"]).filter(pl.col("batch_id") == "sim-late").collect()["price"]
        assert prices.null_count() == 0 and prices.len() == after["rows"] - before["rows"]
        assert not backlog_tick(instance).run_requests  # held now


def test_a_batch_validated_during_a_feature_run_is_requested_afterwards(store: ObjectStore):
    """The interleaving a user hit: a feature run that started before raw batch B finished
    completes without B, and its materialization is recorded after B's. Eager automation then
    saw nothing new; the backlog rule still sees B missing from the table."""
    land_seed(store)
    land_simulated(store, "sim-b", 800)
    with dg.instance_for_test() as instance:
        tick(instance, None)
        materialize(instance, "raw_housing", "housing-seed")
        materialize(instance, "raw_housing", "sim-b")  # B validated and materialized first ...
        hidden = store.get_bytes(valid_key("sim-b"))
        store.delete(valid_key("sim-b"))  # ... but the feature run had listed the batches before
        interleaved = metadata(materialize(instance, "housing_features"))
        store.put_bytes(valid_key("sim-b"), hidden)
        assert interleaved["batches"] == ["housing-seed"]
        features_event = instance.get_latest_materialization_event(dg.AssetKey("housing_features"))
        raw_event = instance.get_latest_materialization_event(dg.AssetKey("raw_housing"))
        assert features_event.timestamp > raw_event.timestamp  # the order that fooled eager()

        (request,) = backlog_tick(instance).run_requests
        assert "sim-b" in request.tags["bridge/backlog"]
        assert backlog_tick(instance).run_requests[0].run_key == request.run_key  # same state, same key
        healed = metadata(materialize(instance, "housing_features"))
        assert healed["added_batches"] == ["sim-b"]
        assert not backlog_tick(instance).run_requests


def test_no_request_while_a_feature_run_is_in_progress(store: ObjectStore):
    land_seed(store)
    with dg.instance_for_test() as instance:
        tick(instance, None)
        materialize(instance, "raw_housing", "housing-seed")
        job = build_defs().resolve_implicit_global_asset_job_def()
        run = instance.create_run_for_job(
            job, asset_selection=frozenset({dg.AssetKey("housing_features")}), status=dg.DagsterRunStatus.STARTED
        )
        skipped = backlog_tick(instance)
        assert not skipped.run_requests and run.run_id in skipped.skip_reason.skip_message


def test_a_batch_of_duplicates_is_said_loudly_and_not_requested_forever(store: ObjectStore):
    land_seed(store)
    land_simulated(store, "sim-1-first", 600)
    land_simulated(store, "sim-2-again", 600)  # the same seed and knobs: the same rows
    with dg.instance_for_test() as instance:
        for request in tick(instance, None).run_requests:
            materialize(instance, "raw_housing", request.partition_key)
        result = materialize(instance, "housing_features")
        meta = metadata(result)
        assert meta["batches_adding_no_rows"] == ["sim-2-again"] and meta["rows_added_per_batch"]["sim-2-again"] == 0
        check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "batches_add_rows")
        assert check.passed is False and check.severity == dg.AssetCheckSeverity.WARN
        assert result.success and meta["published"]  # a warning, not a blocked version
        assert not backlog_tick(instance).run_requests  # held by the ledger: no endless re-requests


def test_latest_does_not_move_when_a_blocking_check_fails(store: ObjectStore):
    """A validated part written by something that broke the contract (row ids lost): the
    `no_nulls` check blocks, the version is kept but unpublished, training keeps the last good one."""
    land_seed(store)
    land_simulated(store, "sim-good", 500)
    with dg.instance_for_test() as instance:
        for request in tick(instance, None).run_requests:
            materialize(instance, "raw_housing", request.partition_key)
        good = metadata(materialize(instance, "housing_features"))["version"]
        broken = store.scan_parquet([valid_key("sim-good")]).collect().head(50)
        broken = broken.with_columns(pl.lit(None, dtype=pl.String).alias("row_id"), pl.col("area") + 1)
        store.write_parquet(valid_key("sim-broken"), broken)
        job = build_defs().resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("housing_features")], raise_on_error=False
        )
        meta = metadata(result)
        failed = {c.check_name for c in result.get_asset_check_evaluations() if not c.passed}
        assert not result.success  # a blocking check failed: the run says so
        assert failed == {"no_nulls"} and meta["published"] is False and meta["version"] != good
        assert FeatureStore(store).latest().version == good
        assert meta["version"] in FeatureStore(store).versions()  # kept for inspection, not served
