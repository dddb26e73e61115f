"""Versioned, immutable feature tables: a version is a manifest of content-addressed parts.

Layout under `features/<table>/`:

    parts/<sha256>.parquet      one per batch, named by the hash of its bytes, never rewritten
    versions/<version>.json     manifest: the ordered parts (with each batch's landing time),
                                row counts per split, contract
    LATEST                      the newest version id (a pointer, replaced atomically)
    ledger/<batch_id>.json      why a validated batch has no part: every row a duplicate,
                                or every row still awaiting its label

A validated batch is *held* by the table when the latest version has its part or the ledger
says it adds nothing; every other validated batch is *backlog* (`feature_backlog`), which
the feature sensor turns into a run however runs interleave.

A version id is a hash of its parts, so unchanged inputs give the same version, and a version's
parts never change, so reading a pinned version later returns identical bytes. A commit writes
the parts first and the manifest last: a writer that dies in between leaves only unreferenced
parts, never a half-written version.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import duckdb
import polars as pl

from bridge_assets.core.contract import CONTRACT_VERSION, SEEN_AT, SEEN_AT_DTYPE
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.simulator import SEED_BATCH_ID, SEED_ROWS
from bridge_assets.lake.landing import labels_key, landed_at, read_labels
from bridge_assets.lake.raw import valid_key, validated_batch_ids
from bridge_assets.lake.storage import LocalStore, ObjectStore

DEFAULT_TABLE = "housing"


@dataclass(frozen=True)
class Part:
    """One batch's feature rows, stored once under the hash of their Parquet bytes."""

    batch_id: str
    key: str
    sha256: str
    rows: int
    rows_per_split: dict[str, int]
    landed_at: str | None = None  # ISO time the batch landed: `seen_at` of rows without their own


@dataclass(frozen=True)
class FeatureVersion:
    """An immutable feature-table version: which parts, in which order."""

    table: str
    version: str
    parts: tuple[Part, ...]
    contract_version: str = CONTRACT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def rows_per_split(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for part in self.parts:
            for split, count in part.rows_per_split.items():
                totals[split] = totals.get(split, 0) + count
        return totals

    @property
    def batch_ids(self) -> list[str]:
        return [p.batch_id for p in self.parts]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureVersion:
        data = json.loads(text)
        data["parts"] = tuple(Part(**p) for p in data["parts"])
        return cls(**data)


def version_id(parts: tuple[Part, ...], contract_version: str = CONTRACT_VERSION) -> str:
    """Content-derived id: same parts in the same order under the same contract, same id."""
    digest = hashlib.sha256(contract_version.encode())
    for part in parts:
        digest.update(f"\n{part.batch_id}:{part.sha256}".encode())
    return digest.hexdigest()[:16]


class FeatureStore:
    """Reads and commits versions of one feature table in an object store."""

    def __init__(self, store: ObjectStore, table: str = DEFAULT_TABLE) -> None:
        self.store = store
        self.table = table
        self.prefix = f"features/{table}/"

    def _manifest_key(self, version: str) -> str:
        return f"{self.prefix}versions/{version}.json"

    def latest(self) -> FeatureVersion | None:
        pointer = f"{self.prefix}LATEST"
        if not self.store.exists(pointer):
            return None
        return self.load(self.store.get_text(pointer).strip())

    def load(self, version: str) -> FeatureVersion:
        key = self._manifest_key(version)
        if not self.store.exists(key):
            raise KeyError(f"feature table {self.table!r} has no version {version!r}")
        return FeatureVersion.from_json(self.store.get_text(key))

    def versions(self) -> list[str]:
        keys = self.store.list(f"{self.prefix}versions/")
        return [k.rsplit("/", 1)[-1].removesuffix(".json") for k in keys if k.endswith(".json")]

    def write_part(self, batch_id: str, rows: pl.DataFrame, landed_at: datetime | None = None) -> Part:
        """Store a batch's rows under the hash of their bytes (a no-op if already stored); its
        landing time goes into the manifest, not the bytes, so the same rows landed in another
        lake or at another time are the same part and version."""
        buffer = io.BytesIO()
        rows.write_parquet(buffer, compression="zstd", statistics=True)
        data = buffer.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        key = f"{self.prefix}parts/{sha}.parquet"
        if not self.store.exists(key):
            self.store.put_bytes(key, data)
        counts = rows.group_by("split").len().sort("split")
        per_split = dict(zip(counts["split"], counts["len"], strict=True))
        return Part(batch_id, key, sha, rows.height, per_split, landed_at.isoformat() if landed_at else None)

    def commit(
        self, new_parts: list[Part], base: FeatureVersion | None = None, *, publish: bool = True
    ) -> FeatureVersion:
        """A version of `base`'s parts plus `new_parts`, manifest written after the parts; with
        `publish`, `LATEST` then points at it (else call `publish` once it has passed checks)."""
        parts = (base.parts if base else ()) + tuple(new_parts)
        version = version_id(parts)
        key = self._manifest_key(version)
        if self.store.exists(key):
            result = self.load(version)
        else:
            result = FeatureVersion(self.table, version, parts)
            self.store.put_text(key, result.to_json())
        if publish:
            self.publish(result)
        return result

    def publish(self, version: FeatureVersion) -> None:
        """Make `version` the latest (what training picks up unless it pins one)."""
        self.store.put_text(f"{self.prefix}LATEST", version.version)

    def scan(self, version: str | FeatureVersion) -> pl.LazyFrame:
        """All rows of a version (lazily, straight from storage), each with `seen_at`: its own
        time if its batch carried one, else its batch's landing time from the manifest (null for
        parts recorded before landing times were)."""
        pinned = self.load(version) if isinstance(version, str) else version
        if not pinned.parts:
            raise ValueError(f"version {pinned.version} has no parts")
        schema = pl.Schema({**self.store.scan_parquet([pinned.parts[-1].key]).collect_schema(), SEEN_AT: SEEN_AT_DTYPE})
        landed = {p.batch_id: datetime.fromisoformat(p.landed_at) for p in pinned.parts if p.landed_at}
        by_batch = (
            pl.col("batch_id").replace_strict(landed, default=None, return_dtype=SEEN_AT_DTYPE)
            if landed
            else pl.lit(None, SEEN_AT_DTYPE)
        )
        rows = self.store.scan_parquet([p.key for p in pinned.parts], schema=schema)
        return rows.with_columns(pl.coalesce(pl.col(SEEN_AT), by_batch).alias(SEEN_AT))

    def connect(self, version: str | FeatureVersion) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the version as view `features`, for SQL by version id.

        Local parts are read by DuckDB directly; S3 parts through Polars (no DuckDB
        extension can be downloaded at run time).
        """
        pinned = self.load(version) if isinstance(version, str) else version
        connection = duckdb.connect()
        if isinstance(self.store, LocalStore):
            paths = [self.store.uri(p.key) for p in pinned.parts]
            connection.read_parquet(paths).create_view("features")
        else:
            connection.register("features", self.scan(pinned).collect().to_arrow())
        return connection


@dataclass(frozen=True)
class BatchOutcome:
    """What one build did with one validated batch."""

    batch_id: str
    rows_added: int
    duplicates_dropped: int
    awaiting_label: int

    @property
    def status(self) -> str:
        if self.rows_added:
            return "added"
        return "awaiting_labels" if self.awaiting_label else "no_new_rows"


@dataclass(frozen=True)
class FeatureBuild:
    """The outcome of bringing the feature table up to date with the raw zone."""

    version: FeatureVersion
    previous: str | None
    outcomes: list[BatchOutcome] = field(default_factory=list)

    @property
    def added_batches(self) -> list[str]:
        return [o.batch_id for o in self.outcomes if o.status == "added"]

    @property
    def batches_adding_nothing(self) -> list[str]:
        """Batches whose every labelled row was already in the table (e.g. a repeated seed)."""
        return [o.batch_id for o in self.outcomes if o.status == "no_new_rows"]

    @property
    def duplicates_dropped(self) -> int:
        return sum(o.duplicates_dropped for o in self.outcomes)

    @property
    def awaiting_label(self) -> int:
        return sum(o.awaiting_label for o in self.outcomes)


LEDGER_SCHEMA_VERSION = 1


def _ledger_key(table: str, batch_id: str) -> str:
    return f"features/{table}/ledger/{batch_id}.json"


def _ledger(store: ObjectStore, table: str) -> dict[str, dict]:
    prefix = f"features/{table}/ledger/"
    return {
        key.removeprefix(prefix).removesuffix(".json"): json.loads(store.get_text(key))
        for key in store.list(prefix)
        if key.endswith(".json")
    }


def _needs_build(batch_id: str, entry: dict | None, store: ObjectStore) -> bool:
    """A batch without a part needs a build unless its last one added nothing for good (all
    duplicates) or it still awaits labels that have not landed since."""
    if entry is None:
        return True
    if entry["status"] == "no_new_rows":
        return False
    return store.exists(labels_key(batch_id)) and not entry.get("labels_landed", False)


def feature_backlog(store: ObjectStore, table: str = DEFAULT_TABLE) -> list[str]:
    """Validated batches the latest version does not hold yet (see the module docstring)."""
    latest = FeatureStore(store, table).latest()
    held = set(latest.batch_ids) if latest else set()
    ledger = _ledger(store, table)
    return [b for b in validated_batch_ids(store) if b not in held and _needs_build(b, ledger.get(b), store)]


def _landed_at(store: ObjectStore, batch_id: str) -> datetime:
    """A batch's landing time; for validated rows whose landing object is gone, their validation time."""
    try:
        return landed_at(store, batch_id)
    except FileNotFoundError:
        return store.modified(valid_key(batch_id))


def build_features(store: ObjectStore, table: str = DEFAULT_TABLE, *, publish: bool = True) -> FeatureBuild:
    """Add a part for every validated batch not yet in the latest version, then commit
    (and, with `publish`, make it the latest).

    Old batches are never reprocessed; duplicates of rows in earlier parts are dropped from
    the new part. A batch whose rows all still await labels gets no part yet and is picked
    up by a later build once its labels have landed.
    """
    features = FeatureStore(store, table)
    base = features.latest()
    earlier = features.scan(base) if base and base.parts else None
    parts: list[Part] = []
    outcomes: list[BatchOutcome] = []
    for batch_id in feature_backlog(store, table):
        labels = read_labels(store, batch_id)
        prepared = prepare_batch(
            store.scan_parquet([valid_key(batch_id)]).collect(),
            batch_id,
            earlier=earlier,
            labels=labels,
            reference_rows=SEED_ROWS if batch_id == SEED_BATCH_ID else None,
        )
        outcome = BatchOutcome(batch_id, prepared.rows.height, prepared.duplicates_dropped, prepared.awaiting_label)
        outcomes.append(outcome)
        if prepared.rows.is_empty():
            entry = {**asdict(outcome), "status": outcome.status, "labels_landed": labels is not None}
            store.put_text(_ledger_key(table, batch_id), json.dumps({"schema_version": LEDGER_SCHEMA_VERSION, **entry}))
            continue
        parts.append(features.write_part(batch_id, prepared.rows, _landed_at(store, batch_id)))
        new_rows = prepared.rows.lazy()
        earlier = new_rows if earlier is None else pl.concat([earlier, new_rows])
    if base is None and not parts:
        raise ValueError(
            f"no labelled, validated rows yet in {store.uri('raw/valid/')}: land and validate a batch first"
        )
    version = features.commit(parts, base, publish=publish) if parts or base is None else base
    return FeatureBuild(version, base.version if base else None, outcomes)
