"""Every cadence and interval of the loop, read from the environment in one place.

Sensors and freshness policies are declared with their production defaults; `build_defs(env)`
applies the environment's (e.g. `BRIDGE_SENSOR_INTERVAL=5` in tests and the demo) through
`with_cadence` and `with_freshness`, so nothing is read when a module is imported and a
`dagster dev` or daemon started with the variables set uses them. The README's "Schedules and
sensors" table lists each variable with its default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

import dagster as dg

from bridge_assets.cadence_settings import CadenceSettings


def sensor_interval(sensor_name: str, default: int, env: Mapping[str, str]) -> int:
    """Seconds between a sensor's ticks: `BRIDGE_SENSOR_INTERVAL_<NAME>` for that sensor (name
    upper-cased), else `BRIDGE_SENSOR_INTERVAL` for every sensor, else `default`."""
    name = f"BRIDGE_SENSOR_INTERVAL_{sensor_name.upper()}"
    if env.get(name):
        try:
            seconds = int(env[name])
        except ValueError:
            raise ValueError(f"{name}={env[name]!r}: a sensor interval is a whole number of seconds") from None
        if seconds < 1:
            raise ValueError(f"{name}={env[name]!r}: a sensor interval is at least 1 second")
        return seconds
    return CadenceSettings.from_env(env).sensor_interval or default


def freshness_hours(asset_name: str, default: float, env: Mapping[str, str]) -> timedelta:
    """How old an asset may get before Dagster marks it stale: `BRIDGE_FRESHNESS_HOURS_<ASSET>`."""
    name = f"BRIDGE_FRESHNESS_HOURS_{asset_name.upper()}"
    hours = float(env[name]) if env.get(name) else default
    if hours <= 0:
        raise ValueError(f"{name}={env[name]!r}: a freshness window is positive")
    return timedelta(hours=hours)


# What each sensor was declared with, so `with_cadence` can declare it again at another
# interval (Dagster's SensorDefinition cannot change its interval after the fact).
_DECLARED: dict[str, tuple[Callable[..., Any], int, dict[str, Any]]] = {}


def cadenced_sensor(default_interval: int, **options: Any) -> Callable[[Callable[..., Any]], dg.SensorDefinition]:
    """`@dg.sensor` with `default_interval` seconds between ticks, which `with_cadence` replaces
    by the environment's `BRIDGE_SENSOR_INTERVAL[_<NAME>]`."""

    def declare(function: Callable[..., Any]) -> dg.SensorDefinition:
        _DECLARED[function.__name__] = (function, default_interval, options)
        return dg.sensor(name=function.__name__, minimum_interval_seconds=default_interval, **options)(function)

    return declare


def with_cadence(sensor: dg.SensorDefinition, env: Mapping[str, str]) -> dg.SensorDefinition:
    """The sensor at the interval `env` asks for (itself when that is the declared one)."""
    function, default_interval, options = _DECLARED[sensor.name]
    interval = sensor_interval(sensor.name, default_interval, env)
    if interval == sensor.minimum_interval_seconds:
        return sensor
    return dg.sensor(name=sensor.name, minimum_interval_seconds=interval, **options)(function)


def with_freshness(assets: Iterable[dg.AssetsDefinition], env: Mapping[str, str]) -> list[dg.AssetsDefinition]:
    """The assets, each freshness window replaced by `BRIDGE_FRESHNESS_HOURS_<ASSET>` where
    `env` sets it (warned at half the window, as declared)."""

    def windowed(spec: dg.AssetSpec) -> dg.AssetSpec:
        name = spec.key.to_python_identifier()
        if spec.freshness_policy is None or not env.get(f"BRIDGE_FRESHNESS_HOURS_{name.upper()}"):
            return spec
        window = freshness_hours(name, 0, env)
        return spec.replace_attributes(
            freshness_policy=dg.FreshnessPolicy.time_window(fail_window=window, warn_window=window / 2)
        )

    return list(dg.map_asset_specs(windowed, list(assets)))
