"""Recency: how much a training row counts, by when it was seen (no Dagster, no MLflow).

After the world moves, old rows teach the old world. A round can weight rows by age with a
half-life, drop rows older than a window, or both. Ages are measured from the newest row of the
training data, not from the wall clock, so a round on a pinned feature version gives the same
weights whenever it runs (and reproduces). A row without a time (a part written before rows
carried `seen_at`) counts as the oldest row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

MICROSECONDS_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class Recency:
    """Per-row weights `0.5 ** (age / half_life_hours)`, zero beyond `window_hours`; None: off."""

    half_life_hours: float | None = None
    window_hours: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("half_life_hours", self.half_life_hours), ("window_hours", self.window_hours)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"recency {name} must be a positive number of hours, got {value}")

    @property
    def active(self) -> bool:
        return self.half_life_hours is not None or self.window_hours is not None

    def ages_hours(self, seen_at: pl.Series) -> np.ndarray:
        """Hours between each row's `seen_at` and the newest one (missing times: the oldest)."""
        micros = seen_at.cast(pl.Datetime("us", "UTC")).dt.epoch("us")
        if micros.null_count() == len(micros):
            return np.zeros(len(micros))
        filled = micros.fill_null(micros.min()).to_numpy().astype(np.float64)  # exact: epoch µs < 2**53
        return (filled.max() - filled) / MICROSECONDS_PER_HOUR

    def weights(self, seen_at: pl.Series) -> np.ndarray:
        """One weight per row, in (0, 1] inside the window and 0 outside it."""
        ages = self.ages_hours(seen_at)
        weights = np.ones(len(ages)) if self.half_life_hours is None else 0.5 ** (ages / self.half_life_hours)
        if self.window_hours is not None:
            weights[ages > self.window_hours] = 0.0
        return weights

    def describe(self) -> str:
        if not self.active:
            return "every row counts the same"
        parts = []
        if self.half_life_hours is not None:
            parts.append(f"half-life {self.half_life_hours:g} h")
        if self.window_hours is not None:
            parts.append(f"window {self.window_hours:g} h")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Recency:
        return cls(**(data or {}))
