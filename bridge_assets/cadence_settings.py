"""When the loop acts: the training round's schedule and how often every sensor ticks.

Per-sensor intervals (`BRIDGE_SENSOR_INTERVAL_<SENSOR NAME>`) and per-asset freshness windows
(`BRIDGE_FRESHNESS_HOURS_<ASSET>`) are families of variables named after Dagster definitions;
`bridge_assets/defs/cadence.py` reads those beside the definitions they name.
"""

from __future__ import annotations

from functools import cache
from zoneinfo import available_timezones

from pydantic import Field, PositiveInt, field_validator

from bridge_assets.settings import EnvSettings

DEFAULT_TRAINING_CRON = "0 3 * * 1"  # a training round every Monday, 03:00 UTC
DEFAULT_TIMEZONE = "UTC"
# The tz database is listed once a process: `sensor_interval` reads these settings for every sensor.
_known_timezones = cache(available_timezones)


class CadenceSettings(EnvSettings):
    """The loop's fixed-name cadence variables (README: schedules and sensors)."""

    training_cron: str = Field(
        DEFAULT_TRAINING_CRON, validation_alias="BRIDGE_TRAINING_CRON", description="the training round's schedule"
    )
    schedule_timezone: str = Field(
        DEFAULT_TIMEZONE,
        validation_alias="BRIDGE_SCHEDULE_TIMEZONE",
        description="the timezone cron strings are read in (IANA name)",
    )
    sensor_interval: PositiveInt | None = Field(
        None,
        validation_alias="BRIDGE_SENSOR_INTERVAL",
        description="seconds between ticks of every sensor (unset: each sensor's own)",
    )

    @field_validator("schedule_timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        if name not in _known_timezones():
            raise ValueError(f"not an IANA timezone name: {name!r}")
        return name
