"""The hand-written service `bench/serve_load.py` compares bridge with: what a team writes
before adopting bridge — FastAPI in uvicorn, one registered version, the same request
validation (`serving.schemas.HouseFeatures`) and reply, and no interaction log, API keys, router
or metrics.

It loads the version's preprocessing state and network once (as bridge's serving does, not
through MLflow's pandas pyfunc, which costs ~10 ms a row here) and predicts each request through
the ML core's public path: a one-row Polars frame, `Preprocessor.transform`, the network.

    BENCH_MODEL_NAME=housing-price BENCH_MODEL_VERSION=1 \
        uvicorn handwritten_app:app --app-dir bench --workers 2 --no-access-log
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
from fastapi import FastAPI

from bridge_assets.core.training import TrainedModel
from bridge_assets.ml.tracking import MlflowSettings
from serving.schemas import HouseFeatures


def _load(name: str, version: str) -> TrainedModel:
    MlflowSettings.from_env().activate()
    with tempfile.TemporaryDirectory(prefix="handwritten-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/artifacts", dst_path=scratch))
        return TrainedModel.load(local / "weights.pth", local / "model.json")


MODEL = _load(os.environ["BENCH_MODEL_NAME"], os.environ["BENCH_MODEL_VERSION"])
MODEL.network()  # built once, before the first request
app = FastAPI(title="hand-written house-price service")


@app.post("/predict")
async def predict(features: HouseFeatures) -> dict[str, Any]:
    row = pl.DataFrame([features.model_dump()], schema_overrides={"area": pl.Float64})
    price = float(MODEL.predict_encoded(MODEL.preprocessor.transform(row))[0])
    return {"status": 200, "message": "House price prediction successful", "response": {"prediction": price, "unit": "GBP(£)"}}
