"""Shared, cached material for the monitoring tests: one small trained model per session."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import cache

import numpy as np
import polars as pl

from bridge_assets.core.contract import FEATURES, TARGET, validate
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.presets import preset
from bridge_assets.core.simulator import SEED_BATCH_ID, SEED_ROWS, Drift, Simulator, load_seed_data
from bridge_assets.core.training import TrainedModel
from bridge_assets.ml.round import run_round
from bridge_assets.monitoring.reference import Reference, build_reference
from serving.interactions import InteractionLogger, record

SIMULATED_ROWS = 3000
QUICK = preset("default", max_epochs=15)


@cache
def simulator() -> Simulator:
    return Simulator.fit()


@cache
def feature_rows() -> pl.DataFrame:
    """Feature rows as the lake would hold them: the real data plus a simulated batch."""
    seed = prepare_batch(validate(load_seed_data()).valid, SEED_BATCH_ID, reference_rows=SEED_ROWS).rows
    batch = pl.concat(list(simulator().generate(SIMULATED_ROWS, seed=5, batch_id="sim-train")))
    return pl.concat([seed, prepare_batch(validate(batch).valid, "sim-train").rows])


@cache
def trained() -> tuple[TrainedModel, Reference]:
    model = run_round(feature_rows(), [QUICK]).best.model
    reference = build_reference(feature_rows(), model.predict, model_name="housing-price", version="1", feature_version="fv-test")
    return model, reference


def window_frame(rows: int, seed: int, drift: Drift | None = None) -> pl.DataFrame:
    """Simulated requests (valid rows, with their true prices)."""
    return validate(pl.concat(list(simulator().generate(rows, seed=seed, batch_id=f"w{seed}", drift=drift)))).valid


def log_traffic(
    logger: InteractionLogger,
    frame: pl.DataFrame,
    model: TrainedModel,
    start: datetime,
    *,
    version: str = "1",
    variant: str = "production",
    prefix: str = "req",
    seconds: float = 1.0,
) -> pl.DataFrame:
    """Record each row as a served /predict through the real interaction writer; returns the
    labels (`request_id`, `price`) the traffic generator would withhold."""
    predictions = model.predict(frame)
    step = seconds / max(frame.height, 1)
    records = []
    ids = []
    for index, (row, prediction) in enumerate(zip(frame.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).iter_rows(named=True), predictions, strict=True)):
        request_id = f"{prefix}-{index}"
        ids.append(request_id)
        records.append(
            record(
                request_id=request_id,
                endpoint="/predict",
                status=200,
                model_name="housing-price",
                model_version=version,
                variant=variant,
                latency_ms=2.0,
                features=row,
                prediction=float(prediction),
                timestamp=start + timedelta(seconds=index * step),
            )
        )
    logger.log(records)
    return pl.DataFrame({"request_id": ids, "price": frame[TARGET].cast(pl.Float64)})


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predicted) - np.asarray(actual)) ** 2)))
