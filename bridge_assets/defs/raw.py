"""Raw data (step 14): one dynamic partition per landed batch, registered by a sensor."""

import json

import dagster as dg

from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.metadata import markdown_preview
from bridge_assets.defs.policies import storage_retries
from bridge_assets.defs.resources import LakeStorage
from bridge_assets.lake.landing import landed_batches
from bridge_assets.lake.raw import validate_batch

RAW_BATCHES = "raw_batches"
raw_batches = dg.DynamicPartitionsDefinition(name=RAW_BATCHES)
MAX_QUARANTINE_RATE = 0.05


@dg.asset(
    partitions_def=raw_batches,
    group_name="ingestion",
    kinds={"polars", "parquet"},
    owners=["team:data-engineering"],
    check_specs=[dg.AssetCheckSpec("quarantine_rate", asset="raw_housing")],
)
def raw_housing(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    """A landed batch validated against the housing contract; bad rows quarantined with reasons."""
    with storage_retries(context, storage):
        return _validated_batch(context, storage)


def _validated_batch(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    store = storage.open()
    batch_id = context.partition_key
    batch = next((b for b in landed_batches(store) if b.batch_id == batch_id), None)
    if batch is None:
        raise dg.Failure(  # bad data, not an outage: retrying cannot help
            f"batch {batch_id!r} is registered but nothing has landed at landing/batches/{batch_id}/",
            allow_retries=False,
        )
    try:
        result = validate_batch(store, batch)
    except ValueError as error:  # unreadable object or missing columns: name the object
        raise dg.Failure(
            f"batch {batch_id!r} ({store.uri(batch.key)}) cannot be validated: {error}", allow_retries=False
        ) from error
    rate = result.quarantined_rows / result.rows_landed if result.rows_landed else 0.0
    if result.quarantined_rows:
        context.log.warning(f"{result.quarantined_rows} rows of {batch_id} quarantined: {result.reasons}")
    return dg.MaterializeResult(
        metadata={
            "source": dg.MetadataValue.path(result.source_uri),
            "rows_landed": result.rows_landed,
            "rows_valid": result.valid.height,
            "rows_quarantined": result.quarantined_rows,
            "quarantine": dg.MetadataValue.path(result.quarantine_uri or "none"),
            "quarantine_reasons": dg.MetadataValue.json(result.reasons),
            "labelled": result.labelled,
            "preview": markdown_preview(result.valid),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="quarantine_rate",
                passed=rate <= MAX_QUARANTINE_RATE,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"quarantine_rate": rate, "threshold": MAX_QUARANTINE_RATE},
            )
        ],
    )


@cadenced_sensor(
    15,
    target=[raw_housing],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def landed_batches_sensor(context: dg.SensorEvaluationContext, storage: LakeStorage) -> dg.SensorResult:
    """Registers each newly landed batch as a raw partition and requests it exactly once.

    The cursor holds every batch already handled; a run key per batch makes a repeated
    request (a tick that died before saving its cursor) a no-op, and batches that were
    materialized some other way (e.g. by `make demo`) are not requested again.
    """
    handled: set[str] = set(json.loads(context.cursor)) if context.cursor else set()
    landed = [b.batch_id for b in landed_batches(storage.open())]
    done = context.instance.get_materialized_partitions(dg.AssetKey("raw_housing"))
    new = [batch_id for batch_id in landed if batch_id not in handled and batch_id not in done]
    known = set(context.instance.get_dynamic_partitions(RAW_BATCHES))
    to_register = [batch_id for batch_id in landed if batch_id not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=batch_id, run_key=batch_id) for batch_id in new],
        dynamic_partitions_requests=[raw_batches.build_add_request(to_register)] if to_register else [],
        cursor=json.dumps(sorted(handled | set(landed))),
        skip_reason=None if new or to_register else f"no new batches ({len(landed)} landed)",
    )
