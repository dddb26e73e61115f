"""Monitoring configuration from the environment (the README's monitoring table)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from bridge_assets.monitoring.drift import DriftSettings, Thresholds

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


@dataclass(frozen=True)
class MonitorSettings:
    """Window length, drift and decay bars, and the retrain policy."""

    window_seconds: int = 3600
    drift: DriftSettings = field(default_factory=DriftSettings)
    min_labels: int = 200  # realised error is judged only with at least this many labels
    decay_tolerance: float = 0.10  # RMSE may exceed the version's test RMSE by this share
    retrain_policy: RetrainPolicy = "manual"
    retrain_cooldown_seconds: int = 3600
    retrain_half_life_hours: float | None = 24.0  # recency of a retrain's from-scratch option
    retrain_window_hours: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MonitorSettings:
        policy = env.get("BRIDGE_RETRAIN_POLICY", "manual")
        if policy not in ("manual", "automatic"):
            raise ValueError(f"BRIDGE_RETRAIN_POLICY must be manual or automatic, not {policy!r}")
        window = int(env.get("BRIDGE_MONITOR_WINDOW_SECONDS", "3600"))
        if window < 1:
            raise ValueError("BRIDGE_MONITOR_WINDOW_SECONDS must be >= 1")
        return cls(
            window_seconds=window,
            drift=drift_settings_from_json(env.get("BRIDGE_DRIFT_THRESHOLDS")),
            min_labels=int(env.get("BRIDGE_MONITOR_MIN_LABELS", "200")),
            decay_tolerance=float(env.get("BRIDGE_DECAY_TOLERANCE", "0.10")),
            retrain_policy=policy,  # type: ignore[arg-type]
            retrain_cooldown_seconds=int(env.get("BRIDGE_RETRAIN_COOLDOWN_SECONDS", "3600")),
            retrain_half_life_hours=_hours(env, "BRIDGE_RETRAIN_HALF_LIFE_HOURS", cls.retrain_half_life_hours),
            retrain_window_hours=_hours(env, "BRIDGE_RETRAIN_WINDOW_HOURS", cls.retrain_window_hours),
        )


def _hours(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    """A positive number of hours, `none`/`off` for no limit, unset for the default."""
    text = (env.get(name) or "").strip().lower()
    if not text:
        return default
    if text in ("none", "off"):
        return None
    value = float(text)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of hours or 'none', not {text!r}")
    return value
