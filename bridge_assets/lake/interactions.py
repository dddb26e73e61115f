"""The interaction log's side in the lake (step 10): its layout and schema, reading each record
once, compaction of closed hours and expiry. The serving layer writes the files
(`serving.interactions`); monitoring, the guardrail, promotion and the demo read them here.

    interactions/date=YYYY-MM-DD/hour=HH/<spool file>-<first byte>-<end byte>.parquet

Records carry `schema_version` (3; files written before the column existed read as 1). Version 3
added `model_ms`: the answering version's own model time for the request's rows (the guardrail
compares versions on it); older files read it as null.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from bridge_assets.core.contract import CATEGORICAL_FEATURES, COUNT_FEATURES, MEASURES
from bridge_assets.lake.storage import ObjectStore

PREFIX = "interactions/"
SCHEMA_VERSION = 3
SCHEMA: dict[str, pl.DataType] = {
    "schema_version": pl.Int16(),
    "request_id": pl.String(),
    "row_index": pl.Int32(),
    "timestamp": pl.Datetime("us", "UTC"),
    "endpoint": pl.String(),
    "status": pl.Int16(),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "variant": pl.String(),
    "latency_ms": pl.Float64(),
    "model_ms": pl.Float64(),
    "prediction": pl.Float64(),
    "error": pl.String(),
    "client_id": pl.String(),
    "replica": pl.String(),
    **{name: pl.Float64() for name in MEASURES},
    **{name: pl.Int64() for name in COUNT_FEATURES},
    **{name: pl.String() for name in CATEGORICAL_FEATURES},
}
FEATURE_COLUMNS = (*MEASURES, *COUNT_FEATURES, *CATEGORICAL_FEATURES)


COMPACTED = "compacted-"  # a closed hour's merged file (`.parquet`) and its manifest (`.json`)


def readable(store: ObjectStore, keys: list[str]) -> list[str]:
    """The Parquet keys that hold each record once: a merged file counts only once its manifest
    exists, and then replaces every source the manifest lists (sources may linger until deleted)."""
    present = set(keys)
    covered: set[str] = set()
    merged: set[str] = set()
    for manifest in (k for k in keys if is_compacted(k) and k.endswith(".json")):
        listed = json.loads(store.get_text(manifest))
        if listed["merged"] in present:
            merged.add(listed["merged"])
            covered.update(listed["sources"])
    return [k for k in keys if k.endswith(".parquet") and k not in covered and (not is_compacted(k) or k in merged)]


def is_compacted(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(COMPACTED)


def _scan(store: ObjectStore, keys: list[str]) -> pl.LazyFrame:
    """Files of any schema version as today's schema (missing columns null; `schema_version` 1)."""
    frame = pl.scan_parquet(
        [store.uri(k) for k in keys],
        schema=SCHEMA,
        missing_columns="insert",
        storage_options=store.polars_storage_options,
    )
    return frame.with_columns(pl.col("schema_version").fill_null(1))


def read_interactions(store: ObjectStore, since: datetime | None = None) -> pl.DataFrame:
    """Every logged interaction (from `since` on, if given), once; files written before a
    column existed read it as null (`schema_version` as 1)."""
    return read_interaction_files(store, interaction_files(store, since), since)


def interaction_files(store: ObjectStore, since: datetime | None = None) -> list[str]:
    """The files that hold every record (from `since` on) once. Records sit in the folder of
    their own hour, so `since` lists only the hours from its own on. A reader that keeps the
    names it has read can later read only new ones; once an hour is compacted, its files give
    way to the merged one (a name read before is then missing from the list)."""
    keys = readable(store, store.list(PREFIX))
    if since is not None:
        first = since.astimezone(UTC).strftime("date=%Y-%m-%d/hour=%H")
        keys = [k for k in keys if k.removeprefix(PREFIX)[: len(first)] >= first]
    return keys


def read_interaction_files(store: ObjectStore, keys: list[str], since: datetime | None = None) -> pl.DataFrame:
    """The records in `keys` (from `since` on), as today's schema."""
    if not keys:
        return pl.DataFrame(schema=SCHEMA)
    frame = _scan(store, keys)
    return (frame.filter(pl.col("timestamp") >= since) if since is not None else frame).collect()


@dataclass(frozen=True)
class Compaction:
    """One partition merged: how many files became one, the records in it, files deleted."""

    partition: str
    files: int
    records: int
    deleted: int


def compact_partition(store: ObjectStore, partition: str) -> Compaction | None:
    """Merge a closed hour (`date=…/hour=…`) into one file, losing and duplicating nothing.

    The merged file is written, its record count checked against its sources, then a manifest
    naming it and its sources makes it visible and hides them at once (`read_interactions`);
    only then are the sources deleted. Interrupted anywhere, readers see every record once; run
    again, it merges what arrived since (a late spool sweep) with the earlier merged file.
    """
    keys = store.list(f"{PREFIX}{partition}/")
    sources = sorted(readable(store, keys))
    if len(sources) < 2:
        return None
    frame = _scan(store, sources).collect().sort("timestamp", "request_id", "row_index")
    merged_id = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
    merged = f"{PREFIX}{partition}/{COMPACTED}{merged_id}.parquet"
    store.write_parquet(merged, frame)
    written = _scan(store, [merged]).select(pl.len()).collect().item()
    if written != frame.height:
        store.delete(merged)
        raise RuntimeError(f"compacting {partition}: wrote {written} of {frame.height} records; sources kept")
    old_manifests = [k for k in keys if is_compacted(k) and k.endswith(".json")]
    hidden = set(sources) | {src for m in old_manifests for src in json.loads(store.get_text(m))["sources"]}
    manifest = {"schema_version": 1, "merged": merged, "records": frame.height, "sources": sorted(hidden)}
    store.put_text(f"{PREFIX}{partition}/{COMPACTED}{merged_id}.json", json.dumps(manifest))
    stale = [k for k in keys if k in hidden] + old_manifests
    for key in stale:  # sources first, then old merged files, then their manifests
        store.delete(key)
    return Compaction(partition, len(sources), frame.height, len(stale))


def partitions(store: ObjectStore) -> list[tuple[str, datetime]]:
    """Every `date=…/hour=…` partition holding interaction files, with the hour's start (UTC)."""
    found = set()
    for key in store.list(PREFIX):
        parts = key.removeprefix(PREFIX).split("/")
        if len(parts) == 3 and parts[0].startswith("date=") and parts[1].startswith("hour="):
            found.add(f"{parts[0]}/{parts[1]}")
    return sorted((p, datetime.strptime(p, "date=%Y-%m-%d/hour=%H").replace(tzinfo=UTC)) for p in found)


def compact_closed_hours(store: ObjectStore, now: datetime, grace: timedelta = timedelta(hours=1)) -> list[Compaction]:
    """Compact every hour that ended at least `grace` ago (late spool sweeps still merge later)."""
    done = [compact_partition(store, p) for p, start in partitions(store) if start + timedelta(hours=1) + grace <= now]
    return [c for c in done if c is not None]


def expire_interactions(store: ObjectStore, now: datetime, retention: timedelta) -> int:
    """Delete interaction files of hours that ended more than `retention` ago; how many."""
    deleted = 0
    for partition, start in partitions(store):
        if start + timedelta(hours=1) + retention <= now:
            for key in store.list(f"{PREFIX}{partition}/"):
                store.delete(key)
                deleted += 1
    return deleted
