"""The MLflow pyfunc form of a trained model: raw housing columns in, prices out.

Logged with a copy of `bridge_assets.core` (MLflow `code_paths`), so a process that loads a
version through MLflow (`mlflow models serve`) runs the code that version was trained with.
Input is validated against the contract first: a bad row raises, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
from mlflow.pyfunc import PythonModel, PythonModelContext

from bridge_assets.core.calibration import Recalibration
from bridge_assets.core.contract import FEATURES, ROW_ID, validate
from bridge_assets.core.model_api import load_model


class InvalidInput(ValueError):
    """Rows that break the contract; the message names each row and field."""


def check_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """Contract-valid, normalised feature rows, or InvalidInput naming what is wrong."""
    missing = [c for c in FEATURES if c not in frame.columns]
    if missing:
        raise InvalidInput(f"missing field(s): {', '.join(missing)}")
    with_ids = frame.select(FEATURES).with_columns(pl.int_range(pl.len()).cast(pl.String).alias(ROW_ID))
    try:
        checked = validate(with_ids, require_target=False)
    except pl.exceptions.PolarsError as error:  # e.g. a list where a number belongs
        raise InvalidInput(f"unreadable field values: {error}") from error
    if checked.quarantined.height:
        problems = "; ".join(
            f"row {row_id}: {reason}" for row_id, reason in checked.quarantined.select(ROW_ID, "reason").iter_rows()
        )
        raise InvalidInput(problems)
    return checked.valid


class HousingPyfunc(PythonModel):
    """Loads the model its `model` artifact (`model.json`) describes, by the loader named there
    (bridge's network: `weights`, a .pth; scikit-learn's boosting: `estimator`), and, if the
    version has one, `calibration` (JSON: the recalibration stage applied after the model)."""

    def load_context(self, context: PythonModelContext) -> None:
        self.model = load_model(Path(context.artifacts["model"]).parent)  # every artifact sits in one folder
        stage = context.artifacts.get("calibration")
        self.calibration = Recalibration.load(stage) if stage else None

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        rows = check_rows(pl.from_pandas(pd.DataFrame(model_input)))
        predictions = self.model.predict_encoded(self.model.preprocessor.transform(rows))
        return self.calibration.apply(predictions) if self.calibration else predictions
