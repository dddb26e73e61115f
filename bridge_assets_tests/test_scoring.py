"""Batch scoring: a landed batch priced offline by the Production version, equal to MLflow's own
pyfunc of that version (`models:/…@production`), in the lake with version and row ids."""

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import mlflow
import polars as pl
import pytest

from bridge_assets.core.contract import FEATURES, ROW_ID
from bridge_assets.core.simulator import HousingSimulator
from bridge_assets.core.training import preset
from bridge_assets.defs.raw import raw_batches
from bridge_assets.defs.resources import lake_storage, mlflow_tracking
from bridge_assets.defs.scoring import batch_predictions, predictions_key
from bridge_assets.lake.feature_store import FeatureStore, build_features
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import valid_key, validate_batch
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS, promote_to_production
from bridge_assets.ml.round import run_round
from bridge_assets.ml.tracking import MlflowSettings, log_round
from bridge_assets_tests.conftest import LAKE_VARIABLES

BATCH = "sim-score"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A lake with a validated batch and a registry with two versions, the first Production."""
    home: Path = tmp_path_factory.mktemp("scoring") / "home"
    with pytest.MonkeyPatch.context() as patch:
        for name in LAKE_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("BRIDGE_HOME", str(home))
        store = StorageSettings.from_env().open()
        land_seed(store)
        land_batch(store, BATCH, HousingSimulator.fit().generate(600, seed=5, batch_id=BATCH))
        for batch in landed_batches(store):
            validate_batch(store, batch)
        version = build_features(store).version
        rows = FeatureStore(store).scan(version).collect()
        settings = MlflowSettings.from_env()
        client = settings.activate()
        versions = [
            log_round(settings, run_round(rows, [preset("reference", max_epochs=3, seed=seed)]), feature_version=version.version).model_version
            for seed in (1, 2)
        ]
        promote_to_production(client, settings.model_name, versions[0], store=store)
        yield SimpleNamespace(store=store, settings=settings, versions=versions)


def _score(instance: dg.DagsterInstance, partition: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [batch_predictions],
        partition_key=partition,
        instance=instance,
        resources={"storage": lake_storage(), "mlflow_tracking": mlflow_tracking()},
        raise_on_error=False,
    )


def test_a_batch_scored_offline_equals_the_production_pyfunc(registry: SimpleNamespace):
    production, newer = registry.versions
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(raw_batches.name, [BATCH])
        result = _score(instance, BATCH)
    assert result.success, result.all_events
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    name = registry.settings.model_name
    assert metadata["model_version"] == production != newer  # the alias decides, not "latest"
    assert metadata["model_uri"] == f"models:/{name}/{production}"

    rows = registry.store.scan_parquet([valid_key(BATCH)]).collect()
    scored = registry.store.scan_parquet([predictions_key(BATCH, production)]).collect()
    assert scored.columns == [ROW_ID, "prediction", "model_name", "model_version", "scored_at"]
    assert scored[ROW_ID].to_list() == rows[ROW_ID].to_list() and metadata["rows"] == rows.height
    assert set(scored["model_version"]) == {production} and scored["prediction"].is_finite().all()

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{PRODUCTION_ALIAS}")
    as_strings = [pl.col(c).cast(pl.String) for c, dtype in rows.schema.items() if isinstance(dtype, (pl.Categorical, pl.Enum))]
    expected = pyfunc.predict(rows.select(FEATURES).with_columns(as_strings).to_pandas())  # as a client sends them
    assert scored["prediction"].to_list() == pytest.approx(list(expected), rel=1e-6)


def test_an_unvalidated_batch_fails_naming_what_to_do(registry: SimpleNamespace):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(raw_batches.name, ["never-landed"])
        result = _score(instance, "never-landed")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "materialize raw_housing[never-landed] first" in failure.step_failure_data.error.message
    assert not registry.store.list("predictions/never-landed/")
