"""Batch scoring: a landed batch priced offline by the Production version, into the lake.

For users who need predictions for a whole batch rather than per request. Same model code as
the online service (`serving.model.ServedModel`), so an offline price equals the price the
service would answer for that row and version. One object per batch and version:

    predictions/<batch_id>/v<model_version>.parquet   row_id, prediction, model_name, model_version, scored_at

Written atomically; scoring the same batch with the same version again replaces the object
with the same prices.
"""

from datetime import UTC, datetime

import dagster as dg
import polars as pl
from mlflow.exceptions import MlflowException

from bridge_assets.core.contract import ROW_ID
from bridge_assets.defs.metadata import markdown_preview
from bridge_assets.defs.raw import raw_batches, raw_housing
from bridge_assets.defs.resources import LakeStorage, MlflowTracking
from bridge_assets.lake.raw import valid_key
from bridge_assets.ml.registry import PRODUCTION_ALIAS
from serving.model import ServedModel, version_for_alias

PREDICTIONS_PREFIX = "predictions/"


def predictions_key(batch_id: str, model_version: str) -> str:
    return f"{PREDICTIONS_PREFIX}{batch_id}/v{model_version}.parquet"


@dg.asset(
    partitions_def=raw_batches,
    deps=[raw_housing],
    group_name="serving",
    kinds={"pytorch", "parquet"},
    owners=["team:ml-engineering"],
)
def batch_predictions(
    context: dg.AssetExecutionContext, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> dg.MaterializeResult:
    """A raw batch's validated rows priced by the version behind the `production` alias."""
    store = storage.open()
    batch_id = context.partition_key
    if not store.exists(valid_key(batch_id)):
        raise dg.Failure(f"batch {batch_id!r} has no validated rows yet: materialize raw_housing[{batch_id}] first")
    settings = mlflow_tracking.settings()
    client = settings.activate()
    try:
        version = version_for_alias(client, settings.model_name, PRODUCTION_ALIAS)
    except MlflowException as error:
        raise dg.Failure(
            f"no Production version of {settings.model_name!r} to score with (alias {PRODUCTION_ALIAS!r} unset)"
        ) from error
    model = ServedModel.load(client, settings.model_name, version, PRODUCTION_ALIAS)
    rows = store.scan_parquet([valid_key(batch_id)]).collect()
    scored = rows.select(ROW_ID).with_columns(
        prediction=pl.Series(model.predict(rows), dtype=pl.Float64),
        model_name=pl.lit(settings.model_name),
        model_version=pl.lit(version),
        scored_at=pl.lit(datetime.now(UTC), dtype=pl.Datetime("us", "UTC")),
    )
    key = predictions_key(batch_id, version)
    store.write_parquet(key, scored)
    context.log.info(f"scored {scored.height} rows of {batch_id} with {settings.model_name} v{version}")
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "model_uri": f"models:/{settings.model_name}/{version}",
            "feature_version": model.feature_version,
            "rows": scored.height,
            "mean_prediction": float(scored["prediction"].to_numpy().mean()) if scored.height else 0.0,
            "uri": dg.MetadataValue.path(store.uri(key)),
            "preview": markdown_preview(scored.head(5)),
        },
        data_version=dg.DataVersion(f"{batch_id}/v{version}"),
    )
