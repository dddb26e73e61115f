"""Raw zone: each landed batch validated against the contract, bad rows quarantined.

raw/valid/<batch_id>/rows.parquet        typed, normalised rows that passed the contract
raw/quarantine/<batch_id>/rows.parquet   rows as sent (text) plus `reason`; absent if none
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from bridge_assets.core.contract import ROW_ID, TARGET, validate
from bridge_assets.core.simulator import SEED_BATCH_ID
from bridge_assets.lake.landing import LandedBatch, read_batch
from bridge_assets.lake.storage import ObjectStore

VALID_PREFIX = "raw/valid/"
QUARANTINE_PREFIX = "raw/quarantine/"


def valid_key(batch_id: str) -> str:
    return f"{VALID_PREFIX}{batch_id}/rows.parquet"


def quarantine_key(batch_id: str) -> str:
    return f"{QUARANTINE_PREFIX}{batch_id}/rows.parquet"


def validated_batch_ids(store: ObjectStore) -> list[str]:
    """Batches that have been through validation: the real data first, then by batch id."""
    ids = [k.split("/")[2] for k in store.list(VALID_PREFIX) if k.endswith("/rows.parquet")]
    return sorted(ids, key=lambda batch_id: (batch_id != SEED_BATCH_ID, batch_id))


@dataclass(frozen=True)
class RawResult:
    """What validating one batch did."""

    batch_id: str
    source_uri: str
    rows_landed: int
    valid: pl.DataFrame
    quarantined_rows: int
    reasons: dict[str, int]
    quarantine_uri: str | None
    labelled: bool


def validate_batch(store: ObjectStore, batch: LandedBatch) -> RawResult:
    """Validate a landed batch and write its valid and quarantined rows.

    Rows without a `row_id` get `<batch_id>-<position>`. A batch landed without prices
    (labels withheld) is valid without them; in a batch with prices, a missing one is a fault.
    The quarantine is written before the valid rows, so a batch is never marked validated
    while its rejected rows are missing.
    """
    frame = read_batch(store, batch)
    if ROW_ID not in frame.columns:
        positions = pl.int_range(pl.len()).cast(pl.String).str.zfill(9)
        frame = frame.with_columns((pl.lit(f"{batch.batch_id}-") + positions).alias(ROW_ID))
    labelled = TARGET in frame.columns
    checked = validate(frame, require_target=labelled)
    quarantine_uri = None
    if checked.quarantined.height:
        store.write_parquet(quarantine_key(batch.batch_id), checked.quarantined)
        quarantine_uri = store.uri(quarantine_key(batch.batch_id))
    store.write_parquet(valid_key(batch.batch_id), checked.valid)
    return RawResult(
        batch_id=batch.batch_id,
        source_uri=store.uri(batch.key),
        rows_landed=frame.height,
        valid=checked.valid,
        quarantined_rows=checked.quarantined.height,
        reasons=checked.reason_counts(),
        quarantine_uri=quarantine_uri,
        labelled=labelled,
    )
