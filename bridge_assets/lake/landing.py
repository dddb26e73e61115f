"""Landing zone: where batches and their delayed labels arrive, and how they are written.

Layout (keys relative to the store root, identical on disk and on S3):

    landing/batches/<batch_id>/data.csv | data.parquet   one batch, published atomically
    landing/batches/<batch_id>/simulation.json          how the simulator made it (seed, knobs)
    landing/labels/<batch_id>/labels.parquet             ground truth landed later: row_id, price
    simulator/withheld-labels/<batch_id>.parquet         the simulator's labels not yet released

A batch's rows carry a `row_id` that is unique and stable; labels join on it. A batch whose
prices are withheld lands without a `price` column; `release_labels` later lands its labels,
as ground truth arriving after the predictions were made.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

import polars as pl
import pyarrow.parquet as pq

from bridge_assets.core.contract import ROW_ID, TARGET
from bridge_assets.core.simulator import SEED_BATCH_ID, Drift, Simulator, load_seed_data
from bridge_assets.lake.storage import ObjectStore

BATCHES_PREFIX = "landing/batches/"
LABELS_PREFIX = "landing/labels/"
WITHHELD_PREFIX = "simulator/withheld-labels/"
BatchFormat = Literal["csv", "parquet"]
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DATA_KEY = re.compile(r"^landing/batches/([^/]+)/data\.(csv|parquet)$")


@dataclass(frozen=True)
class LandedBatch:
    """A batch present in the landing zone."""

    batch_id: str
    key: str

    @property
    def format(self) -> BatchFormat:
        return "csv" if self.key.endswith(".csv") else "parquet"


def check_batch_id(batch_id: str) -> str:
    """Batch ids become object keys and Dagster partition keys: keep them simple."""
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return batch_id


def batch_key(batch_id: str, fmt: BatchFormat) -> str:
    return f"{BATCHES_PREFIX}{check_batch_id(batch_id)}/data.{fmt}"


def labels_key(batch_id: str) -> str:
    return f"{LABELS_PREFIX}{check_batch_id(batch_id)}/labels.parquet"


def landed_batches(store: ObjectStore) -> list[LandedBatch]:
    """Every batch in the landing zone, by batch id."""
    found = (_DATA_KEY.match(key) for key in store.list(BATCHES_PREFIX))
    return [LandedBatch(m.group(1), m.group(0)) for m in found if m]


def landed_at(store: ObjectStore, batch_id: str) -> datetime:
    """When a batch landed: its data object's publication time (any uploader's, not only ours)."""
    for fmt in ("parquet", "csv"):
        if store.exists(key := batch_key(batch_id, fmt)):
            return store.modified(key)
    raise FileNotFoundError(f"batch {batch_id!r} has not landed")


def land_batch(
    store: ObjectStore,
    batch_id: str,
    blocks: Iterable[pl.DataFrame],
    *,
    fmt: BatchFormat = "parquet",
    withhold_labels: bool = False,
    on_block: Callable[[int], None] | None = None,
) -> tuple[LandedBatch, int]:
    """Stream blocks of rows into one batch object; returns it and the row count.

    With `withhold_labels`, the batch lands without `price`; the prices are kept aside under
    `simulator/withheld-labels/` until `release_labels` lands them. Of two landers of one batch
    id exactly one wins (exclusive writes); the other gets FileExistsError.
    """
    key = batch_key(batch_id, fmt)
    if any(b.batch_id == batch_id for b in landed_batches(store)):
        raise FileExistsError(f"batch {batch_id!r} has already landed; batches are immutable")
    rows = 0
    withheld: list[pl.DataFrame] = []
    kept_withheld = False
    try:
        with store.staging_path(key, exclusive=True) as path:
            writer: pq.ParquetWriter | None = None
            with path.open("wb") as handle:
                for index, block in enumerate(blocks):
                    if withhold_labels:
                        withheld.append(block.select(ROW_ID, TARGET))
                        block = block.drop(TARGET)
                    if fmt == "csv":
                        block.write_csv(handle, include_header=index == 0)
                    else:
                        table = block.to_arrow()
                        if writer is None:
                            writer = pq.ParquetWriter(handle, table.schema, compression="zstd")
                        writer.write_table(table)
                    rows += block.height
                    if on_block:
                        on_block(block.height)
                if writer is not None:
                    writer.close()
                if rows == 0:  # raising inside the block publishes nothing
                    raise ValueError(f"batch {batch_id!r} has no rows; nothing landed")
                if withhold_labels:  # kept before the batch is published, so they are never lost
                    _keep_withheld(store, batch_id, pl.concat(withheld))
                    kept_withheld = True
    except StaleWithheldLabels:
        if not store.exists(key):
            raise
        raise FileExistsError(f"batch {batch_id!r} has already landed; batches are immutable") from None
    except FileExistsError:  # another lander published this batch first: ours never existed
        if kept_withheld:
            store.delete(f"{WITHHELD_PREFIX}{batch_id}.parquet")
        raise FileExistsError(f"batch {batch_id!r} has already landed; batches are immutable") from None
    return LandedBatch(batch_id, key), rows


@dataclass(frozen=True)
class Simulation:
    """Everything that determines a simulated batch's rows; same values, same rows."""

    rows: int
    seed: int = field(default_factory=lambda: secrets.randbelow(2**31))  # new rows unless asked
    drift: Drift = field(default_factory=Drift)
    corrupt_fraction: float = 0.0
    case_noise: float = 0.0
    withhold_labels: bool = False

    def default_batch_id(self) -> str:
        return f"sim-{datetime.now(UTC):%Y%m%dT%H%M%S}-s{self.seed}"

    def recipe(self) -> dict:
        """The knobs that decide the rows (labels withheld or not does not change them)."""
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "withhold_labels")}


@dataclass(frozen=True)
class SimulatedLanding:
    batch: LandedBatch
    rows: int
    simulation: Simulation
    repeats: list[str]  # earlier batches made with the same seed and knobs: their rows again

    def warning(self) -> str | None:
        if not self.repeats:
            return None
        return (
            f"batch {self.batch.batch_id} repeats the rows of {', '.join(self.repeats)} (same seed "
            f"{self.simulation.seed} and knobs): they are duplicates and will add nothing to the feature "
            "table; leave the seed out for new rows"
        )


def simulation_key(batch_id: str) -> str:
    return f"{BATCHES_PREFIX}{check_batch_id(batch_id)}/simulation.json"


def land_simulated(
    store: ObjectStore,
    simulation: Simulation,
    batch_id: str | None = None,
    *,
    fmt: BatchFormat = "parquet",
    on_block: Callable[[int], None] | None = None,
) -> SimulatedLanding:
    """Generate and land a simulated batch, recording its seed and knobs beside it, and name
    the earlier batches it repeats (the CLI and the asset say so loudly)."""
    batch_id = batch_id or simulation.default_batch_id()
    blocks = Simulator.fit().generate(
        simulation.rows,
        seed=simulation.seed,
        batch_id=batch_id,
        drift=simulation.drift,
        corrupt_fraction=simulation.corrupt_fraction,
        case_noise=simulation.case_noise,
    )
    recipe = simulation.recipe()
    repeats = [
        key.split("/")[2]
        for key in store.list(BATCHES_PREFIX)
        if key.endswith("/simulation.json") and json.loads(store.get_text(key)).get("recipe") == recipe
    ]
    batch, rows = land_batch(
        store, batch_id, blocks, fmt=fmt, withhold_labels=simulation.withhold_labels, on_block=on_block
    )
    record = {"schema_version": 1, "rows": rows, "withhold_labels": simulation.withhold_labels, "recipe": recipe}
    store.put_text(simulation_key(batch_id), json.dumps(record, sort_keys=True))
    return SimulatedLanding(batch, rows, simulation, sorted(set(repeats) - {batch_id}))


class StaleWithheldLabels(FileExistsError):
    """Withheld labels exist for a batch that has not landed (a concurrent or a dead lander)."""


def _keep_withheld(store: ObjectStore, batch_id: str, labels: pl.DataFrame) -> None:
    """Exclusive, so a losing concurrent lander cannot replace the winner's labels."""
    key = f"{WITHHELD_PREFIX}{batch_id}.parquet"
    buffer = io.BytesIO()
    labels.write_parquet(buffer)
    try:
        store.put_bytes(key, buffer.getvalue(), exclusive=True)
    except FileExistsError:
        raise StaleWithheldLabels(
            f"withheld labels for batch {batch_id!r} already exist at {store.uri(key)}: another lander is landing "
            "it, or an earlier attempt died before publishing (then delete that object and retry)"
        ) from None


def release_labels(store: ObjectStore, batch_id: str) -> str:
    """Land the withheld ground truth of a simulated batch (labels arriving late)."""
    held = f"{WITHHELD_PREFIX}{check_batch_id(batch_id)}.parquet"
    if not store.exists(held):
        raise FileNotFoundError(f"no withheld labels for batch {batch_id!r}")
    return land_labels(store, batch_id, store.scan_parquet([held]).collect())


def land_labels(store: ObjectStore, batch_id: str, labels: pl.DataFrame) -> str:
    """Land ground truth for a batch: one row per `row_id` with its `price` (once: immutable)."""
    key = labels_key(batch_id)
    if store.exists(key):
        raise FileExistsError(
            f"labels for batch {batch_id!r} have already landed at {store.uri(key)}; labels are immutable"
        )
    store.write_parquet(key, labels.select(pl.col(ROW_ID).cast(pl.String), pl.col(TARGET).cast(pl.Float64)))
    return key


def read_labels(store: ObjectStore, batch_id: str) -> pl.DataFrame | None:
    key = labels_key(batch_id)
    if not store.exists(key):
        return None
    return store.scan_parquet([key]).collect()


def land_seed(store: ObjectStore) -> LandedBatch | None:
    """Land the contract's real data (its `seed_data`) as the first batch (CSV); None if present."""
    if any(b.batch_id == SEED_BATCH_ID for b in landed_batches(store)):
        return None
    batch, _ = land_batch(store, SEED_BATCH_ID, [load_seed_data()], fmt="csv")
    return batch


def read_batch(store: ObjectStore, batch: LandedBatch) -> pl.DataFrame:
    """Read a landed batch as sent (CSV as text), raising ValueError naming an unreadable object."""
    try:
        with store.local_copy(batch.key) as path:
            if batch.format == "csv":
                return pl.read_csv(path, infer_schema=False)
            return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as error:
        raise ValueError(f"cannot read batch object {store.uri(batch.key)}: {error}") from error
