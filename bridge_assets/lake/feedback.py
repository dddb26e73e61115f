"""Delayed ground truth for served requests (step 6 / 11): withheld, released, joined.

Layout (keys relative to the store root, identical on disk and on S3):

    simulator/withheld-feedback/<traffic_id>.parquet   true prices of houses `bridge traffic` sent
                                                       (request_id = the row_id sent, price)
    feedback/labels/<release_id>.parquet               released labels: request_id, price,
                                                       released_at; append-only, one object a release

This is not the raw batches' label path (`landing/labels/`), which feeds the feature table.
A label released twice counts once (the first release wins); a label whose request was never
logged is counted, not dropped silently. Readers (A/B report, monitoring) go through
`read_feedback_labels` and `join_feedback` only.
"""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from bridge_assets.core.contract import TARGET
from bridge_assets.lake.storage import ObjectStore

WITHHELD_FEEDBACK_PREFIX = "simulator/withheld-feedback/"
LABELS_PREFIX = "feedback/labels/"
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    TARGET: pl.Float64(),
    "released_at": pl.Datetime("us", "UTC"),
}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"invalid id {value!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return value


def withheld_key(traffic_id: str) -> str:
    return f"{WITHHELD_FEEDBACK_PREFIX}{_check_id(traffic_id)}.parquet"


def withhold_feedback(store: ObjectStore, traffic_id: str, request_ids: list[str], prices: list[float]) -> str:
    """Keep the true prices of requests about to be sent (written before sending, never lost)."""
    key = withheld_key(traffic_id)
    frame = pl.DataFrame(
        {"request_id": request_ids, TARGET: prices}, schema={"request_id": pl.String(), TARGET: pl.Float64()}
    )
    store.put_bytes(key, _parquet(frame), exclusive=True)
    return key


def keep_answered_feedback(store: ObjectStore, traffic_id: str, answered: set[str]) -> int:
    """After a traffic run: withheld prices of requests the service refused are dropped (no
    label may exist for a prediction that never happened); the object goes when none was
    answered. Atomic replace. Returns how many labels remain."""
    key = withheld_key(traffic_id)
    held = store.scan_parquet([key]).collect()
    kept = held.filter(pl.col("request_id").is_in(list(answered)))
    if kept.height == held.height:
        return kept.height
    if kept.is_empty():
        store.delete(key)
    else:
        store.put_bytes(key, _parquet(kept))
    return kept.height


def release_feedback(store: ObjectStore, traffic_id: str, fraction: float = 1.0, seed: int = 0) -> tuple[str, int]:
    """Release withheld prices (all, or a random `fraction`) as a new labels object; returns
    its key and row count. Releasing again appends another object; readers count each label once."""
    held = withheld_key(traffic_id)
    if not store.exists(held):
        raise FileNotFoundError(f"no withheld feedback for traffic {traffic_id!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be within (0, 1], got {fraction}")
    labels = store.scan_parquet([held]).collect()
    if fraction < 1:
        labels = labels.sample(fraction=fraction, seed=seed)
    released_at = datetime.now(UTC)
    key = f"{LABELS_PREFIX}{traffic_id}-{released_at:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:6]}.parquet"
    store.put_bytes(
        key,
        _parquet(labels.with_columns(pl.lit(released_at, dtype=LABEL_SCHEMA["released_at"]).alias("released_at"))),
        exclusive=True,
    )
    return key, labels.height


def _parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def read_feedback_labels(store: ObjectStore, *, deduplicate: bool = True) -> pl.DataFrame:
    """Every released label, oldest release first; deduplicated by `request_id` (first release
    wins) unless `deduplicate=False` (to count repeats, as `join_feedback` does)."""
    keys = [k for k in store.list(LABELS_PREFIX) if k.endswith(".parquet")]
    if not keys:
        return pl.DataFrame(schema=LABEL_SCHEMA)
    labels = (
        store.scan_parquet(keys).select(*(pl.col(name).cast(dtype) for name, dtype in LABEL_SCHEMA.items())).collect()
    )
    labels = labels.sort("released_at", maintain_order=True)
    return labels.unique("request_id", keep="first", maintain_order=True) if deduplicate else labels


@dataclass(frozen=True)
class FeedbackJoin:
    """Successful interactions with their released price and error, and what did not match."""

    joined: pl.DataFrame
    labels: int  # distinct labelled requests
    matched: int  # labels whose request was logged with a prediction
    unmatched_labels: int  # labels without a logged successful request
    duplicate_labels: int  # label rows beyond the first per request


def join_feedback(interactions: pl.DataFrame, labels: pl.DataFrame) -> FeedbackJoin:
    """Join labels to successful interactions by request id (`error = prediction − price`).

    Labels repeated across releases count once (the earliest); requests logged more than
    once (e.g. a retried write) count once. Batch rows share a request id and are joined only
    for single-row requests (row_index 0 of /predict), since a label names one house.
    """
    ordered = labels.sort("released_at", maintain_order=True) if "released_at" in labels.columns else labels
    distinct = ordered.unique("request_id", keep="first", maintain_order=True)
    served = (
        interactions.filter((pl.col("status") == 200) & pl.col("prediction").is_not_null())
        .filter(pl.col("row_index") == 0)
        .unique("request_id", keep="first", maintain_order=True)
    )
    joined = served.join(distinct.select("request_id", TARGET), on="request_id", how="inner").with_columns(
        (pl.col("prediction") - pl.col(TARGET)).alias("error")
    )
    return FeedbackJoin(
        joined=joined,
        labels=distinct.height,
        matched=joined.height,
        unmatched_labels=distinct.height - joined.height,
        duplicate_labels=labels.height - distinct.height,
    )
