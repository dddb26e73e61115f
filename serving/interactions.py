"""Interaction logging (step 10): every request and response, to object storage as Parquet.

Records are buffered in memory and written by a background thread — on size, on time and on
shutdown — as one Parquet file per flush per replica:

    interactions/date=YYYY-MM-DD/hour=HH/<replica>-<sequence>-<uuid8>.parquet

One record per `/predict` request, per row of `/predict/batch` and `/invocations` requests
(rows of one request share its `request_id`, with `row_index`), and per rejected request
(its `status`, no prediction). If storage is down, records stay buffered up to a bound; past
it the oldest are dropped and counted (`dropped`), never silently.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import polars as pl

from bridge_assets.core.contract import CATEGORICAL_FEATURES, COUNT_FEATURES
from bridge_assets.lake.storage import ObjectStore

PREFIX = "interactions/"
SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "row_index": pl.Int32(),
    "timestamp": pl.Datetime("us", "UTC"),
    "endpoint": pl.String(),
    "status": pl.Int16(),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "variant": pl.String(),
    "latency_ms": pl.Float64(),
    "prediction": pl.Float64(),
    "error": pl.String(),
    "area": pl.Float64(),
    **{name: pl.Int64() for name in COUNT_FEATURES},
    **{name: pl.String() for name in CATEGORICAL_FEATURES},
}
FEATURE_COLUMNS = ("area", *COUNT_FEATURES, *CATEGORICAL_FEATURES)
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
    features: dict[str, Any] | None = None,
    prediction: float | None = None,
    error: str | None = None,
    row_index: int = 0,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """One interaction record; features are kept only where they fit their column type."""
    row: dict[str, Any] = {
        "request_id": request_id,
        "row_index": row_index,
        "timestamp": timestamp or datetime.now(UTC),
        "endpoint": endpoint,
        "status": status,
        "model_name": model_name,
        "model_version": model_version,
        "variant": variant,
        "latency_ms": latency_ms,
        "prediction": prediction,
        "error": error,
    }
    for name in FEATURE_COLUMNS:
        row[name] = _fits(name, (features or {}).get(name))
    return row


def _fits(name: str, value: Any) -> Any:
    """`value` if it fits the column's type (rejected requests carry anything), else None."""
    if name in COUNT_FEATURES:
        number = _finite(value)
        return int(number) if number is not None and number.is_integer() and abs(number) < 2**62 else None
    if name == "area":
        return _finite(value)
    return value if isinstance(value, str) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value) if abs(value) < 1e300 else math.inf
    return number if math.isfinite(number) else None


class InteractionLogger:
    """Buffers records off the request path; a daemon thread writes them to the store."""

    def __init__(
        self,
        open_store: Callable[[], ObjectStore],
        replica: str,
        *,
        flush_rows: int = 5_000,
        flush_seconds: float = 10.0,
        max_buffered: int = 200_000,
    ) -> None:
        self._open_store = open_store
        self._store: ObjectStore | None = None
        self.replica = replica.replace("/", "_")
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_buffered = max_buffered
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._sequence = 0
        self.stats = {"written": 0, "dropped": 0, "files": 0, "flush_errors": 0}
        self._thread = threading.Thread(target=self._run, name="interaction-logger", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def log(self, records: list[dict[str, Any]]) -> None:
        """Queue records (never blocks on storage)."""
        with self._lock:
            self._buffer.extend(records)
            self._trim()
            full = len(self._buffer) >= self.flush_rows
        if full:
            self._wake.set()

    def _trim(self) -> None:
        overflow = len(self._buffer) - self.max_buffered
        if overflow > 0:
            del self._buffer[:overflow]
            self.stats["dropped"] += overflow
            log.error("interaction buffer full: dropped %d oldest records (%d in total)", overflow, self.stats["dropped"])

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write what is buffered, one file per hour partition; what could not be written goes
        back (bounded) and the error is counted."""
        with self._flush_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            partitions: dict[str, list[dict[str, Any]]] = {}
            for row in batch:
                partitions.setdefault(row["timestamp"].strftime("date=%Y-%m-%d/hour=%H"), []).append(row)
            written = 0
            pending = list(partitions.items())
            while pending:
                partition, rows = pending[0]
                try:
                    self._write(partition, rows)
                except Exception:  # storage down: keep the unwritten records, bounded, and say so
                    unwritten = [row for _, group in pending for row in group]
                    log.exception("writing %d interaction records failed; keeping them buffered", len(unwritten))
                    with self._lock:
                        self.stats["flush_errors"] += 1
                        self._buffer = unwritten + self._buffer
                        self._trim()
                    break
                written += len(rows)
                pending.pop(0)
            self.stats["written"] += written
            return written

    def _write(self, partition: str, rows: list[dict[str, Any]]) -> None:
        if self._store is None:
            self._store = self._open_store()
        self._sequence += 1
        key = f"{PREFIX}{partition}/{self.replica}-{self._sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"
        self._store.write_parquet(key, pl.DataFrame(rows, schema=SCHEMA))
        self.stats["files"] += 1

    def close(self, attempts: int = 3) -> dict[str, int]:
        """Stop the thread and flush what is left (retrying); returns the final counts."""
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=self.flush_seconds + 5)
        for _ in range(attempts):
            self.flush()
            if not self._buffer:
                break
        with self._lock:
            if self._buffer:
                self.stats["dropped"] += len(self._buffer)
                log.error("shutting down with %d unwritten interaction records", len(self._buffer))
                self._buffer = []
        return dict(self.stats)


def read_interactions(store: ObjectStore) -> pl.DataFrame:
    """Every logged interaction (for tests, monitoring and the demo)."""
    keys = [k for k in store.list(PREFIX) if k.endswith(".parquet")]
    if not keys:
        return pl.DataFrame(schema=SCHEMA)
    return store.scan_parquet(keys).collect()
