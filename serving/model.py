"""Loading a registered model version for serving, without the pandas pyfunc path, and the two
places a variant's version can run: inside the ingress replica (`LocalVariant`, the default) or
in its own deployment behind a handle (`ModelVariant` through `RemoteVariant`).

The service calls the version's own preprocessing state and model directly (the same model,
loaded by the loader its description names, and recalibration stage the pyfunc wraps), so predictions equal
`mlflow.pyfunc.load_model(...).predict` while skipping pandas per request; rows the API schema validated skip Polars too.

Where a version runs (`BRIDGE_SERVE_MODEL_PLACEMENT`): `ingress` loads every served version in
every ingress replica, so a request never leaves the process that parsed it (a hop to another
replica per request cost most of the throughput on two cores); `deployment` keeps each version in
its own replicas, for models too large to load once per ingress replica or that need their own
resources (a GPU), at the cost of that hop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, get_args

import numpy as np
import polars as pl
from mlflow.tracking import MlflowClient
from ray import serve
from ray.serve.handle import DeploymentHandle

from bridge_assets.core.calibration import Recalibration
from bridge_assets.core.pyfunc import check_rows
from bridge_assets.ml.tracking import MlflowSettings, load_registered

if TYPE_CHECKING:  # torch or scikit-learn come with a loaded version, not with every process that deploys one
    from bridge_assets.core.model_api import Model


@dataclass
class ServedModel:
    """A registered version, loaded and ready to predict raw housing rows."""

    name: str
    version: str
    alias: str | None
    run_id: str
    feature_version: str
    model: Model
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
            calibration=calibration,
        )

    def predict(self, rows: pl.DataFrame) -> np.ndarray:
        """Prices for raw rows; raises `InvalidInput` naming row and field for a contract breach."""
        return self._calibrated(self.model.predict_encoded(self.model.preprocessor.transform(check_rows(rows))))

    def predict_records(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Prices for rows the API schema validated (the contract's fields, bounds and levels, in
        their one spelling): encoded without a Polars frame, whose fixed cost dominates one row."""
        return self._calibrated(self.model.predict_encoded(self.model.preprocessor.encode_records(records)))

    def _calibrated(self, predictions: np.ndarray) -> np.ndarray:
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


Placement = Literal["ingress", "deployment"]
INGRESS, DEPLOYMENT = get_args(Placement)


# How every bridge deployment rolls over: new replicas start beside the old ones, which serve
# until the new ones are healthy (zero failed requests); a constructor that keeps failing gives
# up after two retries and leaves the old replicas serving.
class RolloutOptions(TypedDict):
    """Serve's deployment options for a rollout, typed so a misspelt option fails the lint gate."""

    health_check_period_s: int
    graceful_shutdown_timeout_s: int
    max_surge_percent: int
    max_constructor_retry_count: int


ROLLING: RolloutOptions = {
    "health_check_period_s": 5,
    "graceful_shutdown_timeout_s": 30,
    "max_surge_percent": 100,
    "max_constructor_retry_count": 2,
}


# What a variant answers: the version that gave the prediction(s), and the milliseconds its own
# model took for them (the batch's pass for that version): the post-deploy guardrail compares
# versions on this, which waiting in queues does not enter and a busy machine slows for both alike.
Answer = tuple[str, float, float]
Answers = tuple[str, list[float], float]


@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=64, **ROLLING)
class ModelVariant:
    """One registered version in its own replicas (placement `deployment`); the ingress calls it
    through a handle.

    `environment` holds only non-secret settings (MLflow and lake locations): credentials come
    from the node's environment or a credentials file, never from Ray-stored init arguments.
    """

    def __init__(self, model_name: str, version: str, alias: str | None, environment: dict[str, str]) -> None:
        os.environ.update(environment)
        self.model = LocalVariant(ServedModel.load(MlflowSettings.from_env().activate(), model_name, version, alias))

    async def predict_one(self, row: dict[str, Any]) -> Answer:
        """Single rows from every ingress replica, batched here as in the ingress; the answer
        names the version that gave it (during a rollout it may not be the ingress's target)."""
        return await self.model.predict_one(row)

    async def predict_alone(self, row: dict[str, Any]) -> Answer:
        return await self.model.predict_alone(row)

    async def predict_valid(self, rows: list[dict[str, Any]]) -> Answers:
        return await self.model.predict_valid(rows)

    async def info(self) -> dict[str, Any]:
        return await self.model.info()


@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
async def _predicted_together(requests: list[tuple[ServedModel, dict[str, Any]]]) -> list[Answer]:
    """Single-row requests that arrive together, for whichever loaded version, predicted in one
    pass per version (one encode and one network call; a request alone waits for no other).
    One queue per process: Serve keeps a decorated callable's queue per function, so both
    variants of an experiment share it, and their batches stay as large as without one; each
    row goes to its own version's model. Kept because it measured better under the serving
    bench's load (wrk, 2 cores): less replica CPU per reply and more throughput at concurrency
    16, for a fraction of a millisecond more p50 at concurrency 1."""
    by_model: dict[int, list[int]] = {}
    for index, (model, _) in enumerate(requests):
        by_model.setdefault(id(model), []).append(index)
    answers: list[Answer] = [("", 0.0, 0.0)] * len(requests)
    for indices in by_model.values():
        model = requests[indices[0]][0]
        started = time.perf_counter()
        prices = model.predict_records([requests[index][1] for index in indices]).tolist()
        model_ms = (time.perf_counter() - started) * 1000
        for index, price in zip(indices, prices, strict=True):
            answers[index] = (model.version, price, model_ms)
    return answers


class LocalVariant:
    """A version loaded in this process (placement `ingress`). Each call answers with the
    version that gave it, as `RemoteVariant` does."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model

    async def predict_one(self, row: dict[str, Any]) -> Answer:
        return await _predicted_together((self.model, row))

    async def predict_alone(self, row: dict[str, Any]) -> Answer:
        """One row in a pass of its own. While a post-deploy watch compares two versions' model
        time, batching would give the version with the larger share of traffic the larger passes
        (longer, and more often preempted on a busy machine): passes of one row compare alike."""
        started = time.perf_counter()
        (price,) = self.model.predict_records([row]).tolist()
        return self.model.version, price, (time.perf_counter() - started) * 1000

    async def predict_valid(self, rows: list[dict[str, Any]]) -> Answers:
        """Rows the API schema validated (bounds and levels are the contract's)."""
        started = time.perf_counter()
        prices = self.model.predict_records(rows).tolist()
        return self.model.version, prices, (time.perf_counter() - started) * 1000

    async def info(self) -> dict[str, Any]:
        return self.model.info()


class RemoteVariant:
    """A version in its own `ModelVariant` deployment, called through its handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict_one(self, row: dict[str, Any]) -> Answer:
        return await self.handle.predict_one.remote(row)

    async def predict_alone(self, row: dict[str, Any]) -> Answer:
        return await self.handle.predict_alone.remote(row)

    async def predict_valid(self, rows: list[dict[str, Any]]) -> Answers:
        return await self.handle.predict_valid.remote(rows)

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


Variant = LocalVariant | RemoteVariant
