"""Loading a registered model version for serving, without the pandas pyfunc path, and the
Serve deployment that hosts one version (a variant) behind the ingress.

The service calls the version's own preprocessing state and network directly (the same
`TrainedModel` and recalibration stage the pyfunc wraps), so predictions equal
`mlflow.pyfunc.load_model(...).predict` while skipping pandas per request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient
from ray import serve

from bridge_assets.core.calibration import Recalibration
from bridge_assets.core.pyfunc import check_rows
from bridge_assets.core.training import PriceNet, TrainedModel
from bridge_assets.ml.tracking import MlflowSettings, load_registered


@dataclass
class ServedModel:
    """A registered version, loaded and ready to predict raw housing rows."""

    name: str
    version: str
    alias: str | None
    run_id: str
    feature_version: str
    model: TrainedModel
    net: PriceNet
    calibration: Recalibration | None = None  # the version's recalibration stage, as the pyfunc applies it

    @classmethod
    def load(cls, client: MlflowClient, name: str, version: str, alias: str | None = None) -> ServedModel:
        details = client.get_model_version(name, version)
        model, calibration = load_registered(name, version)
        return cls(
            name=name,
            version=str(version),
            alias=alias,
            run_id=details.tags.get("bridge.run_id", details.run_id or ""),
            feature_version=details.tags.get("bridge.feature_version", "unknown"),
            model=model,
            net=model.network(),
            calibration=calibration,
        )

    def predict(self, rows: pl.DataFrame, *, checked: bool = False) -> np.ndarray:
        """Prices for raw rows; raises `InvalidInput` naming row and field for a contract breach.

        `checked=True` skips the contract check for rows the API schema has already held to the
        same rules (bounds and levels come from the contract); encoding still normalises them.
        """
        valid = rows if checked else check_rows(rows)
        predictions = self.model.predict_encoded(self.model.preprocessor.transform(valid), self.net)
        return self.calibration.apply(predictions) if self.calibration else predictions

    def info(self) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "feature_version": self.feature_version,
            "config": self.model.config.to_dict(),
            "calibration": self.calibration.describe() if self.calibration else None,
        }


def version_for_alias(client: MlflowClient, name: str, alias: str) -> str:
    """The version an alias points at (raises MlflowException if unset)."""
    return str(client.get_model_version_by_alias(name, alias).version)


# How every bridge deployment rolls over: new replicas start beside the old ones, which serve
# until the new ones are healthy (zero failed requests); a constructor that keeps failing gives
# up after two retries and leaves the old replicas serving.
ROLLING: dict[str, int] = {
    "health_check_period_s": 5,
    "graceful_shutdown_timeout_s": 30,
    "max_surge_percent": 100,
    "max_constructor_retry_count": 2,
}


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64, **ROLLING)
class ModelVariant:
    """One registered version in its own replicas; the ingress calls it through a handle.

    `environment` holds only non-secret settings (MLflow and lake locations): credentials come
    from the node's environment or a credentials file, never from Ray-stored init arguments.
    """

    def __init__(self, model_name: str, version: str, alias: str | None, environment: dict[str, str]) -> None:
        os.environ.update(environment)
        self.model = ServedModel.load(MlflowSettings.from_env().activate(), model_name, version, alias)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def predict_one(self, rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
        """Concurrent single-row requests encoded and predicted together (one Polars pass);
        each answer names the version that gave it (during a rollout it may not be the
        ingress's target yet)."""
        version, predictions = self.predict_valid(rows)
        return [(version, prediction) for prediction in predictions]

    def predict_valid(self, rows: list[dict[str, Any]]) -> tuple[str, list[float]]:
        """Rows the API schema validated (bounds and levels are the contract's)."""
        frame = pl.DataFrame(rows, schema_overrides={"area": pl.Float64})
        return self.model.version, self.model.predict(frame, checked=True).tolist()

    def info(self) -> dict[str, Any]:
        return self.model.info()
