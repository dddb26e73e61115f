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
from bridge_assets.defs.raw import raw_batches
from bridge_assets.defs.resources import lake_storage, mlflow_tracking
from bridge_assets.defs.scoring import batch_predictions, predictions_key
from bridge_assets.lake.raw import valid_key
from bridge_assets.ml.registry import PRODUCTION_ALIAS, promote_to_production
from bridge_assets_tests.conftest import LAKE_VARIABLES
from bridge_assets_tests.serving_support import two_registered_versions

BATCH = "sim-score"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A lake with a validated batch and a registry with two versions, the first Production."""
    home: Path = tmp_path_factory.mktemp("scoring") / "home"
    with pytest.MonkeyPatch.context() as patch:
        for name in LAKE_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("BRIDGE_HOME", str(home))
        lake = two_registered_versions(BATCH, rows=600, seed=5, max_epochs=3)
        promote_to_production(lake.settings.activate(), lake.settings.model_name, lake.versions[0], store=lake.store)
        yield SimpleNamespace(store=lake.store, settings=lake.settings, versions=lake.versions)


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
