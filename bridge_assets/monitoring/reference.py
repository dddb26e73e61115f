"""The reference a model version is monitored against, made once per registered version.

Its training features (what the model learned from) and its predictions on the held-out test
rows of the feature version it was trained on (what its outputs look like on data it never
saw), plus those rows' error metrics and the loss estimator fitted on them. Kept in the lake
and as artifacts of the version's MLflow run:

    monitoring/reference/<model>/<version>/profile.bin      whylogs profile (stock-readable)
    monitoring/reference/<model>/<version>/estimator.pkl    direct loss estimator
    monitoring/reference/<model>/<version>/reference.json   metrics, rows, feature version
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bridge_assets.core.contract import FEATURES, TARGET
from bridge_assets.core.metrics import regression_metrics
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.round import MIN_RECENT_ROWS, split_rows
from bridge_assets.ml.tracking import MlflowSettings, unseen_batches
from bridge_assets.monitoring.estimation import LossEstimator
from bridge_assets.monitoring.profiles import PREDICTION
from bridge_assets.monitoring.whylogs_compat import DatasetProfileView, deserialize, merge_views, profile_frame

REFERENCE_PREFIX = "monitoring/reference/"
Predict = Callable[[pl.DataFrame], np.ndarray]


def reference_prefix(model_name: str, version: str) -> str:
    return f"{REFERENCE_PREFIX}{model_name}/{version}/"


@dataclass
class Reference:
    """What one model version is compared with."""

    model_name: str
    version: str
    feature_version: str
    split: str
    profile: DatasetProfileView
    estimator: LossEstimator
    metrics: dict[str, float]  # on the held-out test rows: mae, rmse, r2
    train_rows: int
    heldout_rows: int
    made_for: dict[str, str] = field(default_factory=dict)  # a retrain's replacement: {"option", "incumbent"}

    def summary(self) -> dict:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "feature_version": self.feature_version,
            "split": self.split,
            "metrics": self.metrics,
            "train_rows": self.train_rows,
            "heldout_rows": self.heldout_rows,
            "made_for": self.made_for,
        }


def build_reference(
    rows: pl.DataFrame, predict: Predict, *, model_name: str, version: str, feature_version: str, split: str = "hash"
) -> Reference:
    """Profile the training rows' features and the held-out rows' predictions; fit the nanny."""
    parts = split_rows(rows, split)
    train, heldout = parts["train"], parts["test"]
    predictions = np.asarray(predict(heldout.select(FEATURES)), dtype=np.float64)
    profile = merge_views(
        [profile_frame(train.select(FEATURES)), profile_frame(pl.DataFrame({PREDICTION: predictions}))]
    )
    actual = heldout[TARGET].to_numpy()
    return Reference(
        model_name=model_name,
        version=str(version),
        feature_version=feature_version,
        split=split,
        profile=profile,
        estimator=LossEstimator.fit(heldout, predictions, actual),
        metrics=regression_metrics(actual, predictions),
        train_rows=train.height,
        heldout_rows=heldout.height,
    )


def save_reference(store: ObjectStore, reference: Reference) -> dict[str, str]:
    """Write the reference to the lake (summary last: its presence means complete)."""
    prefix = reference_prefix(reference.model_name, reference.version)
    keys = {
        "profile": f"{prefix}profile.bin",
        "estimator": f"{prefix}estimator.pkl",
        "summary": f"{prefix}reference.json",
    }
    store.put_bytes(keys["profile"], reference.profile.serialize())
    store.put_bytes(keys["estimator"], reference.estimator.to_bytes())
    store.put_text(
        keys["summary"], json.dumps({**reference.summary(), "created_at": datetime.now(UTC).isoformat()}, indent=2)
    )
    return keys


def load_reference(store: ObjectStore, model_name: str, version: str) -> Reference | None:
    prefix = reference_prefix(model_name, version)
    if not store.exists(f"{prefix}reference.json"):
        return None
    summary = json.loads(store.get_text(f"{prefix}reference.json"))
    return Reference(
        model_name=model_name,
        version=str(version),
        feature_version=summary["feature_version"],
        split=summary["split"],
        profile=deserialize(store.get_bytes(f"{prefix}profile.bin")),
        estimator=LossEstimator.from_bytes(store.get_bytes(f"{prefix}estimator.pkl")),
        metrics=summary["metrics"],
        train_rows=summary["train_rows"],
        heldout_rows=summary["heldout_rows"],
        made_for=summary.get("made_for", {}),
    )


def registered_versions(settings: MlflowSettings) -> list[str]:
    """Every registered version of the model (the reference sensor's input)."""
    client = settings.activate()
    return sorted((str(v.version) for v in client.search_model_versions(f"name='{settings.model_name}'")), key=int)


def _rows_it_was_made_for(
    client: Any, model_name: str, tags: dict[str, str], features: FeatureStore, feature_version: str
) -> pl.DataFrame:
    """The version's feature rows; for a version whose round validated on recent rows, only the
    rows of batches its incumbent never saw: the world it was made for is what its live error is
    judged against (its error on the old regime's rows says nothing about it)."""
    rows = features.scan(feature_version).collect()
    incumbent = tags.get("bridge.incumbent")
    if tags.get("bridge.validation") != "recent" or not incumbent:
        return rows
    unseen = unseen_batches(client, model_name, incumbent, features, features.load(feature_version).batch_ids)
    recent = rows.filter(pl.col("batch_id").is_in(unseen or []))
    counts = recent.group_by("split").len()
    return recent if counts.height == 3 and int(counts["len"].to_numpy().min()) >= MIN_RECENT_ROWS else rows


def make_reference_profile(store: ObjectStore, settings: MlflowSettings, version: str) -> Reference:
    """The reference of a registered version: its pinned feature version (tag
    `bridge.feature_version`), its own pyfunc's predictions; saved in the lake and logged as
    artifacts `monitoring/` of the version's run."""
    import mlflow

    client = settings.activate()
    registered = client.get_model_version(settings.model_name, str(version))
    feature_version = registered.tags.get("bridge.feature_version")
    if not feature_version:
        raise ValueError(f"{settings.model_name} v{version} has no bridge.feature_version tag: cannot find its data")
    features = FeatureStore(store)
    rows = _rows_it_was_made_for(client, settings.model_name, registered.tags, features, feature_version)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{version}")

    def predict(frame: pl.DataFrame) -> np.ndarray:
        return np.asarray(
            model.predict(frame.with_columns(pl.col(pl.Enum).cast(pl.String)).to_pandas()), dtype=np.float64
        )

    reference = build_reference(
        rows,
        predict,
        model_name=settings.model_name,
        version=str(version),
        feature_version=feature_version,
        split=registered.tags.get("bridge.split", "hash"),
    )
    if registered.tags.get("bridge.incumbent"):
        reference.made_for = {
            "option": registered.tags.get("bridge.option", "scratch"),
            "incumbent": registered.tags["bridge.incumbent"],
        }
    keys = save_reference(store, reference)
    with tempfile.TemporaryDirectory(prefix="bridge-reference-") as scratch:
        for name in ("profile", "summary"):
            path = Path(scratch) / keys[name].rsplit("/", 1)[-1]
            path.write_bytes(store.get_bytes(keys[name]))
            client.log_artifact(registered.run_id, str(path), "monitoring")
    return reference
