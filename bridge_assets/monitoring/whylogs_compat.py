"""whylogs 1.6.4 on numpy 2, and a fast profiling path: the only module that imports whylogs.

whylogs' last release (2024-12) predates numpy 2. One line (`whylogs/core/datatypes.py`)
still reads `np.unicode_`, removed in numpy 2, and breaks on pandas string columns, Arrow
strings, datetimes and `np.str_` values. Restoring the alias (as `np.str_`, what it meant)
before whylogs loads fixes all of them. Every bridge module gets whylogs from here.

Most of `why.log(pandas)`'s time is per-element Python: in its preprocessing
(`PreprocessedColumn._pandas_split`: a `Series.apply` per float for inf, six per string
for type masks), in a 128-character slice of every string for frequent items, and in
`to_pandas()` creating one Python str per row. `profile_frame` takes a Polars frame and
vectorises the two cases our frames hold — float columns, and null-free string columns of
at most 128 characters (handed over as an object array sharing one str per distinct value,
in the numpy view, which whylogs updates without the slice) — and leaves every other column
to the stock code. The summaries equal stock `why.log` on the same frame (tested); it leans
on a private API, so whylogs is pinned to 1.6.x.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import polars as pl

if not hasattr(np, "unicode_"):  # numpy 2 removed the alias whylogs 1.6.4 still uses
    np.unicode_ = np.str_  # type: ignore[attr-defined]

import whylogs as why
from whylogs.api import usage_stats
from whylogs.core.preprocessing import NumpyView, PreprocessedColumn
from whylogs.core.view.dataset_profile_view import DatasetProfileView

# No telemetry from library use: what `WHYLOGS_NO_ANALYTICS` does, without writing to the
# process's environment at import (whylogs sends its first event on first use, not at import).
usage_stats._TELEMETRY_DISABLED = True

WHYLOGS_VERSION = why.__version__
_STOCK_SPLIT = PreprocessedColumn._pandas_split
_MAX_FREQUENT_ITEM_SIZE = 128  # FrequentItemsMetric.max_frequent_item_size
_FAST = contextvars.ContextVar("bridge_fast_whylogs", default=False)
_SHORT_STRINGS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "bridge_short_strings", default=frozenset()
)

__all__ = [
    "WHYLOGS_VERSION",
    "DatasetProfileView",
    "deserialize",
    "merge_views",
    "profile_frame",
    "stock_profile",
    "why",
]


def _fast_split(self: PreprocessedColumn, series: pd.Series, parse_numeric_string: bool = False) -> None:
    """`_pandas_split` for float and all-string columns, vectorised; else the stock code."""
    dtype = series.dtype
    if _FAST.get() and not parse_numeric_string and dtype.kind == "f":
        values = series.to_numpy(dtype=np.float64)
        nulls = np.isnan(values)
        self.null_count = int(nulls.sum())
        self.nan_count = self.null_count  # every null of a float column is a NaN number
        floats = values[~nulls]
        self.inf_count = int(np.isinf(floats).sum())
        self.numpy.floats = floats
        return
    if series.name in _SHORT_STRINGS.get() and dtype == object and not parse_numeric_string:
        # Checked by profile_frame: every value a str of at most 128 characters, no nulls.
        # An object array in the numpy view is what the stock pandas view yields per value,
        # minus the Python loops (type masks here, a 128-character slice per frequent item).
        self.null_count = 0
        self.numpy = NumpyView(
            floats=np.array([], dtype=np.float64), ints=np.array([], dtype=np.int64), strings=series.to_numpy()
        )
        self.pandas.tensors = pd.Series([], dtype="object")
        self.pandas.objs = series.iloc[:0]
        return
    _STOCK_SPLIT(self, series, parse_numeric_string)


PreprocessedColumn._pandas_split = _fast_split  # dispatches to stock unless profile_frame asked


@contextmanager
def _fast_preprocessing(short_strings: frozenset[str]) -> Iterator[None]:
    fast, strings = _FAST.set(True), _SHORT_STRINGS.set(short_strings)
    try:
        yield
    finally:
        _FAST.reset(fast)
        _SHORT_STRINGS.reset(strings)


def profile_frame(frame: pl.DataFrame) -> DatasetProfileView:
    """A whylogs profile of a Polars frame, equal to stock `why.log(frame.to_pandas())`.

    Categorical and enum columns are profiled as their text; datetimes are not supported by
    whylogs' distributions (log epoch numbers instead).
    """
    frame = frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String))
    strings = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    short: frozenset[str] = frozenset()
    if strings and frame.height:
        stats = frame.select(
            *(pl.col(c).null_count().alias(f"n:{c}") for c in strings),
            *(pl.col(c).str.len_chars().max().alias(f"l:{c}") for c in strings),
        ).row(0, named=True)
        short = frozenset(c for c in strings if stats[f"n:{c}"] == 0 and stats[f"l:{c}"] <= _MAX_FREQUENT_ITEM_SIZE)
    pandas_frame = pd.DataFrame(
        {name: _object_strings(frame[name]) if name in short else frame[name].to_pandas() for name in frame.columns},
        copy=False,  # one block per column: no consolidating copy of a million-row frame
    )
    with _fast_preprocessing(short):
        return why.log(pandas=pandas_frame).view()


def _object_strings(column: pl.Series) -> np.ndarray:
    """A null-free string column as a numpy object array, one Python str per distinct value
    (what `to_pandas()` would give, without creating a str per row)."""
    levels = column.unique().sort()
    codes = column.cast(pl.Enum(levels.to_list())).to_physical().to_numpy()
    return np.asarray(levels.to_list(), dtype=object)[codes]


def deserialize(data: bytes) -> DatasetProfileView:
    return DatasetProfileView.deserialize(data)


def merge_views(views: list[DatasetProfileView]) -> DatasetProfileView | None:
    """One view of several (counts and means exact, sketches merged); None for none."""
    merged: DatasetProfileView | None = None
    for view in views:
        merged = view if merged is None else merged.merge(view)
    return merged


def stock_profile(frame: pl.DataFrame) -> DatasetProfileView:
    """Stock `why.log(frame.to_pandas())`: what `profile_frame` must equal (tests, bench)."""
    return why.log(pandas=frame.with_columns(pl.col(pl.Categorical, pl.Enum).cast(pl.String)).to_pandas()).view()
