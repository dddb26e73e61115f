"""Every cadence and interval of the loop, read from the environment in one place.

Sensors keep their production defaults; tests and the demo shorten them (e.g.
`BRIDGE_SENSOR_INTERVAL=5`) without touching code. Read when the code location loads, so a
`dagster dev` or daemon started with the variables set uses them. The README's "Schedules and
sensors" table lists each variable with its default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

DEFAULT_TRAINING_CRON = "0 3 * * 1"  # a training round every Monday, 03:00 UTC
DEFAULT_TIMEZONE = "UTC"


def sensor_interval(sensor_name: str, default: int, env: Mapping[str, str] = os.environ) -> int:
    """Seconds between a sensor's ticks: `BRIDGE_SENSOR_INTERVAL_<NAME>` for that sensor (name
    upper-cased), else `BRIDGE_SENSOR_INTERVAL` for every sensor, else `default`."""
    for name in (f"BRIDGE_SENSOR_INTERVAL_{sensor_name.upper()}", "BRIDGE_SENSOR_INTERVAL"):
        if env.get(name):
            try:
                seconds = int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r}: a sensor interval is a whole number of seconds") from None
            if seconds < 1:
                raise ValueError(f"{name}={env[name]!r}: a sensor interval is at least 1 second")
            return seconds
    return default


def training_cron(env: Mapping[str, str] = os.environ) -> str:
    """When the scheduled training round runs (`BRIDGE_TRAINING_CRON`, a cron string)."""
    return env.get("BRIDGE_TRAINING_CRON") or DEFAULT_TRAINING_CRON


def schedule_timezone(env: Mapping[str, str] = os.environ) -> str:
    """The timezone cron strings are read in (`BRIDGE_SCHEDULE_TIMEZONE`, IANA name)."""
    return env.get("BRIDGE_SCHEDULE_TIMEZONE") or DEFAULT_TIMEZONE


def freshness_hours(asset_name: str, default: float, env: Mapping[str, str] = os.environ) -> timedelta:
    """How old an asset may get before Dagster marks it stale: `BRIDGE_FRESHNESS_HOURS_<ASSET>`."""
    name = f"BRIDGE_FRESHNESS_HOURS_{asset_name.upper()}"
    hours = float(env[name]) if env.get(name) else default
    if hours <= 0:
        raise ValueError(f"{name}={env[name]!r}: a freshness window is positive")
    return timedelta(hours=hours)
