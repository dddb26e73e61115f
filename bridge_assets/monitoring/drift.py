"""Drift effect sizes from whylogs sketches: KS statistic, PSI and Hellinger distance.

p-values are ~0 at traffic sizes (whylogs' own drift scores flag identical 1M-row data), so
alarms are on effect sizes. A threshold is the smallest effect that matters for a column;
below a few thousand rows sampling noise alone exceeds it, so the bar is raised to a noise
floor that shrinks with the window and reference sizes (`floor_factor * sqrt(1/n + 1/m)`,
the two-sample KS bound: per column ~2·exp(-2·floor_factor²) false alarms).

Continuous columns (floats) use the KLL quantile sketches: KS over the union of both
sketches' split points, PSI and Hellinger over the reference's deciles. Discrete columns
(integers, strings) use the frequent-items counts, exact at these cardinalities: KS over the
sorted levels for integers; for unordered strings the total-variation distance (which is
the KS statistic for a yes/no column).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
from whylogs_sketching import frequent_items_error_type

from bridge_assets.monitoring.whylogs_compat import DatasetProfileView

PSI_BINS = 10
SMOOTHING = 0.5  # pseudo-count per bin: an empty bin must not make PSI infinite


@dataclass(frozen=True)
class Thresholds:
    """Smallest effects that count as drift for one column (see the README's table)."""

    ks: float = 0.05
    psi: float = 0.2
    hellinger: float | None = None  # reported; alarm only when set


@dataclass(frozen=True)
class DriftSettings:
    """Per-column thresholds (default for unnamed columns) and the noise-floor factor."""

    default: Thresholds = field(default_factory=Thresholds)
    per_column: dict[str, Thresholds] = field(default_factory=dict)
    floor_factor: float = 1.9

    def for_column(self, column: str) -> Thresholds:
        return self.per_column.get(column, self.default)


@dataclass(frozen=True)
class ColumnDrift:
    """One column's effect sizes, the bars they were held to, and the verdict."""

    column: str
    kind: str  # "continuous", "ordinal" or "categorical"
    reference_rows: int
    window_rows: int
    ks: float
    psi: float
    hellinger: float
    ks_bar: float
    psi_bar: float
    drifted: bool
    reasons: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class QuantileSketch(Protocol):
    """What drift reads of whylogs' KLL sketch (datasketches' `kll_doubles_sketch`)."""

    def get_quantiles(self, ranks: list[float]) -> Sequence[float]: ...

    def get_cdf(self, points: list[float]) -> Sequence[float]: ...


def _distribution(
    view: DatasetProfileView, column: str
) -> tuple[str, dict[str, float] | None, QuantileSketch | None, int]:
    """(kind, level counts or None, KLL sketch or None, rows) of a column in a profile."""
    profile = view.get_column(column)
    counts = profile.get_metric("counts")
    rows = int(counts.n.value - counts.null.value)
    types = profile.get_metric("types")
    if types is not None and types.fractional.value > 0:
        return "continuous", None, profile.get_metric("distribution").kll.value, rows
    items = profile.get_metric("frequent_items").frequent_strings.value
    levels = {
        value: float(est) for value, est, _, _ in items.get_frequent_items(frequent_items_error_type.NO_FALSE_NEGATIVES)
    }
    kind = "ordinal" if types is not None and types.integral.value > 0 else "categorical"
    return kind, levels, None, rows


def _discrete(
    reference: dict[str, float], window: dict[str, float], ordered: bool
) -> tuple[float, np.ndarray, np.ndarray]:
    levels = sorted(set(reference) | set(window), key=(lambda v: float(v)) if ordered else str)
    p = np.array([reference.get(v, 0.0) for v in levels])
    q = np.array([window.get(v, 0.0) for v in levels])
    p_share, q_share = p / p.sum(), q / q.sum()
    ks = (
        float(np.max(np.abs(np.cumsum(p_share) - np.cumsum(q_share))))
        if ordered
        else float(np.abs(p_share - q_share).sum() / 2)
    )
    return ks, p, q


def _continuous(
    reference: QuantileSketch, window: QuantileSketch, reference_rows: int, window_rows: int
) -> tuple[float, np.ndarray, np.ndarray]:
    points = np.unique(
        np.concatenate(
            [
                reference.get_quantiles(np.linspace(0, 1, 201).tolist()),
                window.get_quantiles(np.linspace(0, 1, 201).tolist()),
            ]
        )
    )
    ks = float(
        np.max(
            np.abs(
                np.asarray(reference.get_cdf(points.tolist())[:-1]) - np.asarray(window.get_cdf(points.tolist())[:-1])
            )
        )
    )
    edges = np.unique(reference.get_quantiles(np.linspace(0.1, 0.9, PSI_BINS - 1).tolist()))
    p = np.diff(np.concatenate([[0.0], reference.get_cdf(edges.tolist())[:-1], [1.0]])) * reference_rows
    q = np.diff(np.concatenate([[0.0], window.get_cdf(edges.tolist())[:-1], [1.0]])) * window_rows
    return ks, np.clip(p, 0, None), np.clip(q, 0, None)


def _psi_hellinger(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    p_share = (p + SMOOTHING) / (p.sum() + SMOOTHING * len(p))
    q_share = (q + SMOOTHING) / (q.sum() + SMOOTHING * len(q))
    psi = float(np.sum((q_share - p_share) * np.log(q_share / p_share)))
    raw_p, raw_q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    hellinger = float(math.sqrt(max(0.0, 1.0 - float(np.sum(np.sqrt(raw_p * raw_q))))))
    return psi, hellinger


def column_drift(
    reference: DatasetProfileView, window: DatasetProfileView, column: str, settings: DriftSettings
) -> ColumnDrift | None:
    """Effect sizes of one column, window against reference; None if either lacks rows."""
    if reference.get_column(column) is None or window.get_column(column) is None:
        return None
    kind, ref_levels, ref_kll, m = _distribution(reference, column)
    _, win_levels, win_kll, n = _distribution(window, column)
    if m == 0 or n == 0:
        return None
    if ref_kll is not None and win_kll is not None:  # both continuous
        ks, p, q = _continuous(ref_kll, win_kll, m, n)
    else:
        if ref_levels is None or win_levels is None:  # a float column that arrived as integers
            kind = "continuous"
            ks, p, q = _continuous(
                reference.get_column(column).get_metric("distribution").kll.value,
                window.get_column(column).get_metric("distribution").kll.value,
                m,
                n,
            )
        else:
            ks, p, q = _discrete(ref_levels, win_levels, ordered=kind == "ordinal")
    psi, hellinger = _psi_hellinger(p, q)
    limits = settings.for_column(column)
    noise = 1 / n + 1 / m
    ks_bar = max(limits.ks, settings.floor_factor * math.sqrt(noise))
    bins = len(p)
    psi_bar = max(limits.psi, (bins - 1 + 4 * math.sqrt(2 * (bins - 1))) * noise)
    reasons = []
    if ks > ks_bar:
        reasons.append(f"KS {ks:.3f} > {ks_bar:.3f}")
    if psi > psi_bar:
        reasons.append(f"PSI {psi:.3f} > {psi_bar:.3f}")
    if limits.hellinger is not None and hellinger > limits.hellinger:
        reasons.append(f"Hellinger {hellinger:.3f} > {limits.hellinger:.3f}")
    return ColumnDrift(column, kind, m, n, ks, psi, hellinger, ks_bar, psi_bar, bool(reasons), reasons)


def profile_drift(
    reference: DatasetProfileView, window: DatasetProfileView, columns: list[str], settings: DriftSettings
) -> list[ColumnDrift]:
    """Drift of every named column present with rows in both profiles."""
    results = (column_drift(reference, window, column, settings) for column in columns)
    return [result for result in results if result is not None]
