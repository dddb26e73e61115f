"""Profiles of the interaction logs: one per log object, merged per window, version and variant.

An object is profiled once: its profiles and its index are stored under keys derived from
the object's key, the index last (the mark that the object is done), so a retry or a
restart finds the index and counts nothing twice. Rows are placed in windows by their own
timestamps, not by the `hour=` folder, so a late flush lands in the window it belongs to.

    monitoring/profiles/objects/<sha256 of key>.json                   index: key, groups, counts
    monitoring/profiles/windows/<window>/<sha>--<version>--<variant>.bin   whylogs profile
    monitoring/profiles/windows/<window>/<sha>--<version>--<variant>.json  rows, rejected counts

Only successful predictions (status 200) are traffic; rejected requests are counted per
status and reason, never profiled.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl

from bridge_assets.core.contract import FEATURES
from bridge_assets.lake.interactions import PREFIX as INTERACTIONS_PREFIX
from bridge_assets.lake.interactions import is_compacted, readable
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.monitoring.whylogs_compat import DatasetProfileView, deserialize, merge_views, profile_frame

OBJECTS_PREFIX = "monitoring/profiles/objects/"
ROW_KEY = ("request_id", "row_index", "timestamp")  # one record
WINDOWS_PREFIX = "monitoring/profiles/windows/"
PREDICTION = "prediction"
MONITORED_COLUMNS: tuple[str, ...] = (*FEATURES, PREDICTION)
_WINDOW = re.compile(r"^(\d{8}T\d{6}Z)-(\d+)s$")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def object_sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def window_id(moment: datetime, seconds: int) -> str:
    """The window holding `moment`: its UTC start and its length, e.g. 20261128T220000Z-3600s."""
    epoch = int(moment.timestamp()) // seconds * seconds
    return f"{datetime.fromtimestamp(epoch, UTC):%Y%m%dT%H%M%SZ}-{seconds}s"


def window_bounds(window: str) -> tuple[datetime, datetime]:
    match = _WINDOW.match(window)
    if not match:
        raise ValueError(f"not a window id: {window!r}")
    start = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return start, datetime.fromtimestamp(start.timestamp() + int(match.group(2)), UTC)


def _safe(text: str | None) -> str:
    return _SAFE.sub("_", text or "none")[:64]


INVALID_INPUT = "invalid input: "  # the service's 422 message: `invalid input: area, bedrooms` (or `row 3: area (...)`)


def rejection_reason(status: int, error: str | None) -> str:
    """A short, low-cardinality reason: the status and the fields at fault (`422 area`), else
    the message's first clause."""
    text = error or ""
    if text.startswith(INVALID_INPUT):
        body = text.removeprefix(INVALID_INPUT)
        fields = re.findall(r"row \d+: ([^\s;(]+)", body) if body.startswith("row ") else body.split(", ")
        return f"{status} {', '.join(sorted(set(fields)))}"[:64]
    head = re.split(r"[:;(\n]", text, maxsplit=1)[0].strip()[:60]
    return f"{status} {head}".strip()


def list_log_objects(store: ObjectStore, prefix: str = INTERACTIONS_PREFIX) -> list[str]:
    """Log objects that hold each record once (`bridge_assets.lake.interactions.readable`)."""
    return readable(store, store.list(prefix))


def profiled_objects(store: ObjectStore) -> set[str]:
    """Shas of objects whose profiling completed (their index exists)."""
    return {k.rsplit("/", 1)[-1].removesuffix(".json") for k in store.list(OBJECTS_PREFIX) if k.endswith(".json")}


@dataclass(frozen=True)
class ObjectProfile:
    """What profiling one log object produced (or found already done)."""

    key: str
    sha: str
    groups: list[dict]
    already_done: bool

    @property
    def windows(self) -> set[str]:
        return {g["window"] for g in self.groups}

    @property
    def rows(self) -> int:
        return sum(g["rows"] for g in self.groups)

    @property
    def rejected(self) -> int:
        return sum(sum(g["rejected"].values()) for g in self.groups)


def read_log_object(store: ObjectStore, key: str) -> pl.DataFrame:
    """One interaction-log object; a column added by a newer writer may be missing (null)."""
    with store.local_copy(key) as path:
        frame = pl.read_parquet(path)
    wanted = (
        "request_id",
        "row_index",
        "status",
        "timestamp",
        "model_version",
        "variant",
        "error",
        PREDICTION,
        *FEATURES,
    )
    frame = frame.with_columns(pl.lit(None).alias(c) for c in wanted if c not in frame.columns)
    return frame.with_columns(
        pl.col("request_id").cast(pl.String),
        pl.col("row_index").cast(pl.Int32),
        pl.col("timestamp").cast(pl.Datetime("us", "UTC")),
    )


def profile_object(store: ObjectStore, key: str, window_seconds: int) -> ObjectProfile:
    """Profile one log object per (window, model version, variant), once."""
    sha = object_sha(key)
    index_key = f"{OBJECTS_PREFIX}{sha}.json"
    if store.exists(index_key):
        return ObjectProfile(key, sha, json.loads(store.get_text(index_key))["groups"], already_done=True)
    if not store.exists(key):  # compacted away meanwhile: its records arrive in the merged file
        return ObjectProfile(key, sha, [], already_done=True)
    frame = read_log_object(store, key)
    if is_compacted(key):  # only records of sources not profiled before are new
        frame = frame.join(_profiled_records(store, key), on=list(ROW_KEY), how="anti", nulls_equal=True)
    store.write_parquet(f"{OBJECTS_PREFIX}{sha}.records.parquet", frame.select(ROW_KEY))
    frame = frame.with_columns(
        pl.col("timestamp")
        .map_batches(lambda s: _windows(s, window_seconds), return_dtype=pl.String)
        .alias("__window"),
        pl.col("model_version").cast(pl.String).fill_null("unknown"),
        pl.col("variant").cast(pl.String).fill_null("production"),
    )
    groups: list[dict] = []
    for (window, version, variant), rows in frame.group_by("__window", "model_version", "variant", maintain_order=True):
        traffic = rows.filter((pl.col("status") == 200) & pl.col(PREDICTION).is_not_null())
        rejected = rows.filter(pl.col("status") != 200)
        reasons: dict[str, int] = {}
        for status, error in rejected.select("status", "error").iter_rows():
            reason = rejection_reason(int(status), error)
            reasons[reason] = reasons.get(reason, 0) + 1
        member = f"{WINDOWS_PREFIX}{window}/{sha}--{_safe(version)}--{_safe(variant)}"
        if traffic.height:
            store.put_bytes(f"{member}.bin", profile_frame(traffic.select(MONITORED_COLUMNS)).serialize())
        group = {
            "window": window,
            "model_version": version,
            "variant": variant,
            "rows": traffic.height,
            "rejected": reasons,
            "object": key,
        }
        store.put_text(f"{member}.json", json.dumps(group))
        groups.append(group)
    store.put_text(index_key, json.dumps({"key": key, "groups": groups, "profiled_at": datetime.now(UTC).isoformat()}))
    return ObjectProfile(key, sha, groups, already_done=False)


def _profiled_records(store: ObjectStore, merged_key: str) -> pl.DataFrame:
    """Records of a merged file's sources that were profiled as objects of their own."""
    sources = json.loads(store.get_text(merged_key.removesuffix(".parquet") + ".json"))["sources"]
    keys = [f"{OBJECTS_PREFIX}{object_sha(k)}.records.parquet" for k in sources]
    frames = [store.scan_parquet([k]).collect() for k in keys if store.exists(k)]
    schema = pl.Schema({"request_id": pl.String(), "row_index": pl.Int32(), "timestamp": pl.Datetime("us", "UTC")})
    return pl.concat([f.cast(schema) for f in frames]) if frames else pl.DataFrame(schema=schema)


def _windows(timestamps: pl.Series, seconds: int) -> pl.Series:
    epoch = timestamps.dt.epoch("s") // seconds * seconds
    starts = pl.from_epoch(epoch, time_unit="s").dt.strftime("%Y%m%dT%H%M%SZ")
    return (starts + f"-{seconds}s").fill_null("unknown")


def window_members(store: ObjectStore, window: str) -> list[dict]:
    """The per-object groups that make up a window (their JSON), in key order."""
    keys = [k for k in store.list(f"{WINDOWS_PREFIX}{window}/") if k.endswith(".json")]
    return [json.loads(store.get_text(k)) | {"member": k.removesuffix(".json")} for k in keys]


def windows_with_members(store: ObjectStore) -> dict[str, list[str]]:
    """Every window and the member keys it holds (what the window sensor compares)."""
    found: dict[str, list[str]] = {}
    for key in store.list(WINDOWS_PREFIX):
        if key.endswith(".json"):
            window = key[len(WINDOWS_PREFIX) :].split("/", 1)[0]
            found.setdefault(window, []).append(key)
    return found


def window_versions(members: list[str]) -> set[str]:
    """Model versions in a window, from its member keys (`<sha>--<version>--<variant>.json`)."""
    return {key.rsplit("/", 1)[-1].split("--")[1] for key in members}


@dataclass
class WindowSlice:
    """One model version and variant within a window: merged profile and counts."""

    window: str
    model_version: str
    variant: str
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)
    profile: DatasetProfileView | None = None


def window_slices(store: ObjectStore, window: str) -> list[WindowSlice]:
    """Merge a window's object profiles per (model version, variant)."""
    slices: dict[tuple[str, str], WindowSlice] = {}
    views: dict[tuple[str, str], list[DatasetProfileView]] = {}
    for member in window_members(store, window):
        slot = (member["model_version"], member["variant"])
        current = slices.setdefault(slot, WindowSlice(window, *slot))
        current.rows += member["rows"]
        current.objects.append(member["object"])
        for reason, count in member["rejected"].items():
            current.rejected[reason] = current.rejected.get(reason, 0) + count
        if member["rows"]:
            views.setdefault(slot, []).append(deserialize(store.get_bytes(f"{member['member']}.bin")))
    for slot, parts in views.items():
        slices[slot].profile = merge_views(parts)
    return sorted(slices.values(), key=lambda s: (s.model_version, s.variant))


def window_rows(store: ObjectStore, window: str) -> pl.DataFrame:
    """The successful predictions of a window (for feedback joins and loss estimation), read
    from the hour folders it spans, each record once (compacted or not)."""
    start, end = window_bounds(window)
    seconds = int((end - start).total_seconds())
    hours = range(int(start.timestamp()) // 3600, (int(end.timestamp()) - 1) // 3600 + 1)
    keys = [
        k
        for hour in hours
        for k in list_log_objects(
            store, f"{INTERACTIONS_PREFIX}{datetime.fromtimestamp(hour * 3600, UTC):date=%Y-%m-%d/hour=%H}/"
        )
    ]
    frames = []
    for key in keys:
        frame = read_log_object(store, key)
        frame = frame.with_columns(
            pl.col("timestamp").map_batches(lambda s: _windows(s, seconds), return_dtype=pl.String).alias("__window")
        )
        frames.append(
            frame.filter(
                (pl.col("__window") == window) & (pl.col("status") == 200) & pl.col(PREDICTION).is_not_null()
            ).drop("__window")
        )
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed").with_columns(
        pl.col("model_version").cast(pl.String).fill_null("unknown"),
        pl.col("variant").cast(pl.String).fill_null("production"),
    )
