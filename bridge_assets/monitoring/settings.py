"""Monitoring configuration: each variable declared once (the README's monitoring table)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from bridge_assets.monitoring.drift import DriftSettings, Thresholds
from bridge_assets.settings import EnvSettings

RetrainPolicy = Literal["manual", "automatic"]


def drift_settings_from_json(text: str | None) -> DriftSettings:
    """`{"default": {"ks": 0.05, "psi": 0.2}, "area": {"ks": 0.04}, "floor_factor": 1.9}`."""
    if not text:
        return DriftSettings()
    data = json.loads(text)
    default = Thresholds(**data.pop("default", {}))
    floor = float(data.pop("floor_factor", DriftSettings().floor_factor))
    per_column = {name: Thresholds(**{**default.__dict__, **limits}) for name, limits in data.items()}
    return DriftSettings(default=default, per_column=per_column, floor_factor=floor)


def _hours(value: Any) -> Any:
    """`none`/`off` switch a limit off; anything else is a number of hours."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "off") else value


def _drift(value: Any) -> Any:
    return drift_settings_from_json(value) if isinstance(value, str) else value


Hours = Annotated[PositiveFloat | None, BeforeValidator(_hours)]


class MonitorSettings(EnvSettings):
    """Window length, drift and decay bars, and the retrain policy."""

    window_seconds: PositiveInt = Field(
        3600, validation_alias="BRIDGE_MONITOR_WINDOW_SECONDS", description="monitoring window length"
    )
    drift: Annotated[DriftSettings, BeforeValidator(_drift)] = Field(
        default_factory=DriftSettings,
        validation_alias="BRIDGE_DRIFT_THRESHOLDS",
        description="per-column drift thresholds and the noise-floor factor, as JSON",
    )
    min_labels: PositiveInt = Field(
        200,
        validation_alias="BRIDGE_MONITOR_MIN_LABELS",
        description="realised error is judged only with at least this many labels",
    )
    decay_tolerance: NonNegativeFloat = Field(
        0.10,
        validation_alias="BRIDGE_DECAY_TOLERANCE",
        description="share by which live RMSE may exceed the version's test RMSE",
    )
    retrain_policy: RetrainPolicy = Field(
        "manual",
        validation_alias="BRIDGE_RETRAIN_POLICY",
        description="what decay leads to: a ready run (manual) or the run (automatic)",
    )
    retrain_cooldown_seconds: NonNegativeInt = Field(
        3600, validation_alias="BRIDGE_RETRAIN_COOLDOWN_SECONDS", description="least time between automatic retrains"
    )
    retrain_half_life_hours: Hours = Field(
        24.0,
        validation_alias="BRIDGE_RETRAIN_HALF_LIFE_HOURS",
        description="recency of a retrain's from-scratch option (`none`: off)",
    )
    retrain_window_hours: Hours = Field(
        None,
        validation_alias="BRIDGE_RETRAIN_WINDOW_HOURS",
        description="rows older than this are left out of a retrain (`none`: off)",
    )
