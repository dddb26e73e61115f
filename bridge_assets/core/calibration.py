"""Recalibration: a cheap stage after any model that corrects its level and scale.

After the world moves (prices rise 50%), a model's ranking of houses often still holds while
its level does not: multiplying its prices by the typical actual/predicted ratio of recent
labelled rows recovers a pure level shift completely, in seconds and from a few hundred labels.
The stage works in log space on the predictions alone, so it applies to any model:

- `log_offset`: log price = log prediction + offset (the median log ratio: robust to outliers);
- `log_linear`: log price = offset + slope · log prediction (least squares), which also corrects
  a model that spreads prices too much or too little.

It is stored with the registered model (`calibration.json` next to the weights) and applied by
every reader: the pyfunc, Ray Serve and batch scoring.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

CalibrationKind = Literal["log_offset", "log_linear"]
CALIBRATION_KINDS: tuple[CalibrationKind, ...] = ("log_offset", "log_linear")
FILE_NAME = "calibration.json"


@dataclass(frozen=True)
class Recalibration:
    """`price = exp(offset + slope · log(prediction))`, fitted on `rows` labelled rows."""

    kind: CalibrationKind
    offset: float
    slope: float
    rows: int
    fitted_on: str = ""  # which rows, in words (shown in the model card and MLflow)

    @classmethod
    def fit(
        cls, actual: np.ndarray, predicted: np.ndarray, kind: CalibrationKind = "log_offset", fitted_on: str = ""
    ) -> Recalibration:
        """Fit the correction that maps `predicted` onto `actual` (both positive prices)."""
        if kind not in CALIBRATION_KINDS:
            raise ValueError(f"unknown recalibration {kind!r}; choose from {CALIBRATION_KINDS}")
        log_actual, log_predicted = np.log(np.asarray(actual, np.float64)), np.log(np.asarray(predicted, np.float64))
        usable = np.isfinite(log_actual) & np.isfinite(log_predicted)
        if usable.sum() < 2:
            raise ValueError("recalibration needs at least two rows with positive, finite actual and predicted prices")
        log_actual, log_predicted = log_actual[usable], log_predicted[usable]
        if kind == "log_offset" or np.ptp(log_predicted) == 0:
            return cls("log_offset", float(np.median(log_actual - log_predicted)), 1.0, int(usable.sum()), fitted_on)
        slope, offset = np.polyfit(log_predicted, log_actual, 1)
        return cls("log_linear", float(offset), float(slope), int(usable.sum()), fitted_on)

    def apply(self, predictions: np.ndarray) -> np.ndarray:
        """Corrected prices (the input's shape)."""
        predictions = np.asarray(predictions, dtype=np.float64)
        with np.errstate(divide="ignore", over="ignore"):
            return np.exp(self.offset + self.slope * np.log(predictions))

    def describe(self) -> str:
        """One line for people: what the stage does to prices."""
        factor = f"× {np.exp(self.offset):.4f}"
        how = factor if self.kind == "log_offset" else f"exp({self.offset:.4f}) · prediction^{self.slope:.4f}"
        return (
            f"{self.kind}: price = {how} (fitted on {self.rows} rows{': ' + self.fitted_on if self.fitted_on else ''})"
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Recalibration:
        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def load_optional(cls, directory: str | Path) -> Recalibration | None:
        """The stage stored beside a model's files, or None for a model without one."""
        path = Path(directory) / FILE_NAME
        return cls.load(path) if path.is_file() else None
