"""The monitoring loop's steps over a lake, for the Dagster assets, the CLI and the demo."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import polars as pl

from bridge_assets.lake.storage import ObjectStore
from bridge_assets.monitoring.profiles import (
    ObjectProfile,
    list_log_objects,
    object_sha,
    profile_object,
    profiled_objects,
)
from bridge_assets.monitoring.reference import Reference, load_reference
from bridge_assets.monitoring.report import WindowReport, build_report, write_report
from bridge_assets.monitoring.settings import MonitorSettings


def unprofiled_objects(store: ObjectStore) -> list[str]:
    """Interaction-log objects without a completed profile, oldest key first."""
    done = profiled_objects(store)
    return [key for key in list_log_objects(store) if object_sha(key) not in done]


def profile_objects(store: ObjectStore, keys: list[str], window_seconds: int) -> list[ObjectProfile]:
    """Profile each object once (already profiled ones are reported, not redone)."""
    return [profile_object(store, key, window_seconds) for key in keys]


def feedback_joiner(store: ObjectStore) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """Window rows → rows with released labels (`price`, `error`), via the feedback contract."""
    from bridge_assets.lake.feedback import join_feedback, read_feedback_labels

    labels = read_feedback_labels(store)

    def join(rows: pl.DataFrame) -> pl.DataFrame:
        return join_feedback(rows, labels).joined

    return join


def reference_loader(store: ObjectStore, model_name: str) -> Callable[[str], Reference | None]:
    """Lake references by version, each read once per call site."""
    return cache(lambda version: load_reference(store, model_name, version))


def report_window(
    store: ObjectStore, window: str, settings: MonitorSettings, model_name: str
) -> tuple[WindowReport, dict[str, str]]:
    """Build and write a window's report; returns it and the keys of JSON and HTML."""
    report = build_report(store, window, settings, reference_loader(store, model_name), feedback_joiner(store))
    return report, write_report(store, report)
