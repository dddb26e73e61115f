"""Loading a registered model version for serving, without the pandas pyfunc path.

The service calls the version's own preprocessing state and network directly (the same
`TrainedModel` the pyfunc wraps), so predictions equal `mlflow.pyfunc.load_model(...).predict`
while skipping pandas per request.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient

from bridge_assets.core.pyfunc import check_rows
from bridge_assets.core.training import PriceNet, TrainedModel



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

    @classmethod
    def load(cls, client: MlflowClient, name: str, version: str, alias: str | None = None) -> ServedModel:
        details = client.get_model_version(name, version)
        with tempfile.TemporaryDirectory(prefix="bridge-model-") as scratch:  # read fully, then gone
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts", dst_path=scratch))
            model = TrainedModel.load(local / "weights.pth", local / "model.json")
        return cls(
            name=name,
            version=str(version),
            alias=alias,
            run_id=details.tags.get("bridge.run_id", details.run_id or ""),
            feature_version=details.tags.get("bridge.feature_version", "unknown"),
            model=model,
            net=model.network(),
        )

    def predict(self, rows: pl.DataFrame, *, checked: bool = False) -> np.ndarray:
        """Prices for raw rows; raises `InvalidInput` naming row and field for a contract breach.

        `checked=True` skips the contract check for rows the API schema has already held to the
        same rules (bounds and levels come from the contract); encoding still normalises them.
        """
        valid = rows if checked else check_rows(rows)
        return self.model.predict_encoded(self.model.preprocessor.transform(valid), self.net)

    def info(self) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "model_version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "feature_version": self.feature_version,
            "config": self.model.config.to_dict(),
        }


def version_for_alias(client: MlflowClient, name: str, alias: str) -> str:
    """The version an alias points at (raises MlflowException if unset)."""
    return str(client.get_model_version_by_alias(name, alias).version)
