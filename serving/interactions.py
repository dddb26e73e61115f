"""Interaction logging (step 10): every request and response, to object storage as Parquet.

Each record is appended to the replica's local spool (`serving.spool`) before the reply is
sent; a background thread publishes the spool to the lake — on size, on time and on shutdown
— as one Parquet file per flush per replica and hour:

    interactions/date=YYYY-MM-DD/hour=HH/<spool file>-<first byte>-<end byte>.parquet

so a record survives a killed replica (the next replica on the host, or `sweep`, publishes the
orphaned spool) and is published exactly once. One record per `/predict` request, per row of
`/predict/batch` and `/invocations` requests (rows of one request share its `request_id`, with
`row_index`), and per refused or failed request (its `status`, no prediction). If storage is
down, records stay in the spool up to a bound; past it the oldest are dropped and counted
(`dropped`), never silently. The layout, the schema and the read side (reading each record
once, compaction, expiry) are the lake's: `bridge_assets.lake.interactions`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from bridge_assets.core.contract import COUNT_FEATURES, MEASURES
from bridge_assets.lake.interactions import FEATURE_COLUMNS, PREFIX, SCHEMA, SCHEMA_VERSION
from bridge_assets.lake.storage import ObjectStore
from serving.spool import Published, Spool, spool_directory, sweep_spools

log = logging.getLogger("bridge.interactions")


def record(
    *,
    request_id: str,
    endpoint: str,
    status: int,
    model_name: str,
    model_version: str,
    variant: str,
    latency_ms: float,
    model_ms: float | None = None,
    features: dict[str, Any] | None = None,
    prediction: float | None = None,
    error: str | None = None,
    row_index: int = 0,
    timestamp: datetime | None = None,
    client_id: str | None = None,
    replica: str | None = None,
) -> dict[str, Any]:
    """One interaction record; features are kept only where they fit their column type."""
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "row_index": row_index,
        "timestamp": timestamp or datetime.now(UTC),
        "endpoint": endpoint,
        "status": status,
        "model_name": model_name,
        "model_version": model_version,
        "variant": variant,
        "latency_ms": latency_ms,
        "model_ms": model_ms,
        "prediction": _finite(prediction),
        "error": error,
        "client_id": client_id,
        "replica": replica,
    }
    for name in FEATURE_COLUMNS:
        row[name] = _fits(name, (features or {}).get(name))
    return row


def _fits(name: str, value: Any) -> Any:
    """`value` if it fits the column's type (rejected requests carry anything), else None."""
    if name in COUNT_FEATURES:
        number = _finite(value)
        return int(number) if number is not None and number.is_integer() and abs(number) < 2**62 else None
    if name in MEASURES:
        return _finite(value)
    return value if isinstance(value, str) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value) if abs(value) < 1e300 else math.inf
    return number if math.isfinite(number) else None


def write_spooled(store: ObjectStore, stem: str, start: int, end: int, lines: bytes) -> int:
    """Spooled lines as Parquet, one object per hour, named by spool and byte range (writing
    the same range again replaces the same objects); the number of objects."""
    wide = pl.Schema(
        {name: pl.Int64() if dtype.is_integer() or name == "timestamp" else dtype for name, dtype in SCHEMA.items()}
    )
    frame = pl.read_ndjson(io.BytesIO(lines), schema=wide).cast(
        pl.Schema(SCHEMA)
    )  # its reader takes 64-bit integers only
    partitions = frame.with_columns(
        pl.col("timestamp").dt.strftime("date=%Y-%m-%d/hour=%H").alias("partition")
    ).partition_by("partition", maintain_order=True, as_dict=True, include_key=False)
    for (partition,), rows in partitions.items():
        store.write_parquet(f"{PREFIX}{partition}/{stem}-{start:012d}-{end:012d}.parquet", rows)
    return len(partitions)


def lake_identity(store: ObjectStore) -> str:
    """Names the lake a spool belongs to (a sweep publishes only its own lake's spools)."""
    return store.uri(PREFIX)


def sweep(store: ObjectStore, env: Mapping[str, str] = os.environ, directory: Path | None = None) -> Published:
    """Publish the orphaned spools of dead replicas on this host that logged to `store`
    (idempotent: for `make stop`, a Dagster sensor, or a starting replica)."""
    return sweep_spools(store, write_spooled, directory or spool_directory(env), lake_identity(store))


class InteractionLogger:
    """Spools records on the request path; a daemon thread publishes them to the store."""

    def __init__(
        self,
        open_store: Callable[[], ObjectStore],
        replica: str,
        *,
        spool_dir: Path,
        flush_rows: int = 5_000,
        flush_seconds: float = 10.0,
        max_buffered: int = 200_000,
        rotate_bytes: int = 64 * 1_048_576,
    ) -> None:
        self._store = open_store()  # no I/O: S3 clients connect on first use
        self.spool = Spool(spool_dir, replica, lake_identity(self._store))
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_buffered = max_buffered
        self.rotate_bytes = rotate_bytes
        self._unflushed = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.stats = {"written": 0, "dropped": 0, "files": 0, "flush_errors": 0, "swept": 0}
        self.orphans_swept = threading.Event()  # set once the start's sweep of dead replicas' spools is done
        self._thread = threading.Thread(target=self._run, name="interaction-logger", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def log(self, records: list[dict[str, Any]]) -> None:
        """Spool records (a local append, never storage I/O) and wake the publisher when due."""
        self.spool.append(records)
        with self._lock:
            self._unflushed += len(records)
            full = self._unflushed >= self.flush_rows
        if full:
            self._wake.set()

    def _run(self) -> None:
        self.sweep_orphans()
        self.orphans_swept.set()
        while not self._closed.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def sweep_orphans(self) -> int:
        """Publish spools of dead replicas on this host (this replica's own is locked)."""
        try:
            done = sweep_spools(self._store, write_spooled, self.spool.directory, self.spool.lake)
        except Exception:  # storage down: the orphans wait for the next sweep
            log.exception("sweeping orphaned interaction spools failed")
            return 0
        self.stats["swept"] += done.records
        return done.records

    def flush(self) -> int:
        """Publish what is spooled; on a storage error the records stay spooled (bounded) and
        the error is counted."""
        with self._flush_lock:
            with self._lock:
                self._unflushed = 0
            done = Published()
            try:
                self.spool.publish(self._store, write_spooled, self.max_buffered, done)
                self.spool.rotate(self.rotate_bytes)
            except Exception:
                log.exception("publishing interaction records failed; they stay spooled")
                self.stats["flush_errors"] += 1
            self.stats["written"] += done.records
            self.stats["files"] += done.files
            self.stats["dropped"] += done.dropped
            return done.records

    def close(self, attempts: int = 3) -> dict[str, int]:
        """Stop the thread and publish what is left (retrying); what still fails stays in the
        spool for the next sweep. Returns the final counts."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.flush_seconds + 5)
        published = False
        for _ in range(attempts):
            errors = self.stats["flush_errors"]
            self.flush()
            if self.stats["flush_errors"] == errors:
                published = True
                break
        if not published:
            log.error("interaction records left in %s for the next sweep", self.spool.path)
        self.spool.close(published=published)
        return dict(self.stats)
