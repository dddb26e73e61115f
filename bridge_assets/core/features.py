"""Cleaning, split assignment and the encode/scale preprocessing shared by training and serving.

Everything is vectorised over Polars frames, so one request row and ten million training rows
take the same code path.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from bridge_assets.core.contract import (
    CATEGORICAL_FEATURES,
    CATEGORY_LEVELS,
    FEATURES,
    NUMERIC_FEATURES,
    ROW_ID,
    SEEN_AT,
    SEEN_AT_DTYPE,
    TARGET,
    category_values,
    normalise_category,
    repeated_values,
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# 80/20 then 80/20 of the rest, as the reference: 64% train, 16% validation, 20% test.
SPLIT_BOUNDS: tuple[float, float] = (0.64, 0.80)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_HASH_BLOCK_ROWS = 1 << 16
# unit >= bound, with unit = (hash >> 11) / 2**53, holds exactly when hash >= ceil(bound * 2**53) << 11.
_SPLIT_HASH_BOUNDS = tuple(np.uint64(math.ceil(bound * float(1 << 53)) << 11) for bound in SPLIT_BOUNDS)
_MAPPED_MATRIX_BYTES = 1 << 22  # where numpy starts advising huge pages
_LEVEL_INDEX = {
    column: {level: index for index, level in enumerate(levels)} for column, levels in CATEGORY_LEVELS.items()
}


def stable_hash64(values: pl.Series) -> np.ndarray:
    """64-bit FNV-1a (fmix64-finalised) of each UTF-8 string, vectorised over Arrow buffers.

    Polars' own `hash` may change between releases; split assignment must not, or a
    row would move between train and test as the library is upgraded.
    """
    if values.is_empty():
        return np.zeros(0, dtype=np.uint64)
    array = values.cast(pl.String).fill_null("").to_arrow()
    if hasattr(array, "combine_chunks"):
        array = array.combine_chunks()
    if (
        array.type != pa.large_string()
    ):  # Polars exports large strings already; a cast would load pyarrow.compute (~0.4 s)
        array = array.cast(pa.large_string())
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(array), _FNV_OFFSET, dtype=np.uint64)
    width = int(lengths[0])
    if width and np.all(lengths == width):
        # Equal-length ids (the usual zero-padded kind): as offsets advance by each length, the
        # bytes form a matrix, one column a step, in place and in blocks of rows that stay in
        # the CPU's cache across the steps and the finalising mix.
        matrix = data[starts[0] : starts[0] + width * len(starts)].reshape(-1, width)
        for first in range(0, len(hashes), _HASH_BLOCK_ROWS):
            block, block_bytes = hashes[first : first + _HASH_BLOCK_ROWS], matrix[first : first + _HASH_BLOCK_ROWS]
            for position in range(width):
                np.bitwise_xor(block, block_bytes[:, position], out=block)
                np.multiply(block, _FNV_PRIME, out=block)
            _fmix64(block)
        return hashes
    padded = np.append(data, np.uint8(0))  # a safe byte to read past the ends of short strings
    for position in range(int(lengths.max(initial=0))):
        active = lengths > position
        byte = padded[np.where(active, starts + position, len(data))].astype(np.uint64)
        hashes = np.where(active, (hashes ^ byte) * _FNV_PRIME, hashes)
    for first in range(0, len(hashes), _HASH_BLOCK_ROWS):
        _fmix64(hashes[first : first + _HASH_BLOCK_ROWS])
    return hashes


def _fmix64(block: np.ndarray) -> None:
    """Finish FNV hashes in place with MurmurHash3's fmix64: FNV's high bits mix poorly for ids
    that differ only in their last digits, and after it every bit depends on every byte."""
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        block ^= block >> np.uint64(33)
        block *= np.uint64(multiplier)
    block ^= block >> np.uint64(33)


def assign_split(row_ids: pl.Series) -> pl.Series:
    """Train/validation/test from a hash of `row_id`: a row never changes split as data grows.

    A row's unit value is its hash's top 53 bits / 2**53; comparing the hashes with the bounds
    scaled to hashes (`_SPLIT_HASH_BOUNDS`) picks the same split without the float pass.
    """
    hashes = stable_hash64(row_ids)
    index = np.zeros(len(hashes), dtype=np.uint8)
    for bound in _SPLIT_HASH_BOUNDS:
        index += hashes >= bound
    return pl.Series("split", SPLITS, dtype=pl.String).gather(index)  # no Python object per row


def reference_split(n_rows: int, seed: int = 42) -> np.ndarray:
    """The BridgeAI reference split by original row position (545 rows → 348/88/109).

    Reproduces scikit-learn's `train_test_split(test_size=0.2, random_state=seed)` applied
    twice (the second to the remaining rows), without importing scikit-learn.
    """
    labels = np.empty(n_rows, dtype=object)
    rest = np.arange(n_rows)
    for held_out in ("test", "validation"):
        permutation = np.random.RandomState(seed).permutation(len(rest))
        n_held = int(np.ceil(0.2 * len(rest)))
        labels[rest[permutation[:n_held]]] = held_out
        rest = rest[permutation[n_held:]]
    labels[rest] = "train"
    return labels


def drop_exact_duplicates(rows: pl.DataFrame, earlier: pl.LazyFrame | None = None) -> tuple[pl.DataFrame, int]:
    """Drop rows equal on every feature and the price to an earlier row (here or in `earlier`).

    Rows that share all features but differ in price are real observations and are kept.
    Returns the kept rows (original order) and how many were dropped.
    """
    subset = [*FEATURES, TARGET]
    kept = rows.filter(~repeated_values(rows.select(subset)))
    if earlier is not None:
        kept = kept.lazy().join(earlier.select(subset), on=subset, how="anti", nulls_equal=True).collect()
    return kept, rows.height - kept.height


@dataclass
class Preprocessor:
    """Median-impute and standardise numerics, impute the mode and one-hot encode categories.

    Fitted on the training split only; its state is a small JSON-able dict that travels with
    every model version, so serving encodes exactly as training did.
    """

    medians: dict[str, float] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        """Column names of the model-ready matrix, in order (5 numeric + 15 one-hot = 20)."""
        return [
            *NUMERIC_FEATURES,
            *(f"{c}_{level}" for c in CATEGORICAL_FEATURES for level in CATEGORY_LEVELS[c]),
        ]

    @classmethod
    def fit(cls, train: pl.DataFrame | pl.LazyFrame) -> Preprocessor:
        """Learn imputation and scaling statistics from training rows."""
        rows = train.lazy().select(FEATURES).collect()  # the split is filtered once
        if rows.height == 0:
            raise ValueError("cannot fit preprocessing on an empty training split")
        numeric = [pl.col(c).cast(pl.Float64) for c in NUMERIC_FEATURES]
        imputed = [e.fill_null(e.median()) if rows[c].null_count() else e for e, c in zip(numeric, NUMERIC_FEATURES)]
        schema = rows.schema
        # Validated categories are enums of a few levels: counting each level is a byte compare
        # a row, where a general mode groups the values (~30 ms for 1.3M rows).
        enums = {c: list(dtype.categories) for c in CATEGORICAL_FEATURES if isinstance(dtype := schema[c], pl.Enum)}
        stats = (
            rows.lazy()
            .select(
                *(e.median().alias(f"median_{c}") for e, c in zip(numeric, NUMERIC_FEATURES)),
                *(e.mean().alias(f"mean_{c}") for e, c in zip(imputed, NUMERIC_FEATURES)),
                *(e.std(ddof=0).alias(f"std_{c}") for e, c in zip(imputed, NUMERIC_FEATURES)),
                *(
                    (pl.col(c) == level).sum().alias(f"count_{c}_{index}")
                    for c, levels in enums.items()
                    for index, level in enumerate(levels)
                ),
                *(
                    _category(c, schema).drop_nulls().mode().sort().first().cast(pl.String).alias(f"mode_{c}")
                    for c in CATEGORICAL_FEATURES
                    if c not in enums
                ),
            )
            .collect()
            .row(0, named=True)
        )
        for c, levels in enums.items():
            stats[f"mode_{c}"] = _most_frequent(levels, [stats[f"count_{c}_{i}"] for i in range(len(levels))])
        return cls(
            medians={c: stats[f"median_{c}"] for c in NUMERIC_FEATURES},
            means={c: stats[f"mean_{c}"] for c in NUMERIC_FEATURES},
            # A constant column scales by 1, as scikit-learn's StandardScaler does.
            stds={c: (stats[f"std_{c}"] or 1.0) for c in NUMERIC_FEATURES},
            modes={c: stats[f"mode_{c}"] for c in CATEGORICAL_FEATURES},
        )

    def transform(self, frame: pl.DataFrame | pl.LazyFrame) -> np.ndarray:
        """Raw housing rows (categories in any case) to a float64 matrix of `feature_names`.

        A missing value takes the training median or mode; a category that is no level encodes
        as all zeros. The matrix is column-major (Fortran order); `np.ascontiguousarray` makes a
        row-major copy.
        """
        rows = frame.select(FEATURES).collect() if isinstance(frame, pl.LazyFrame) else frame
        numeric = [self._filled(rows[c].cast(pl.Float64), c) for c in NUMERIC_FEATURES]
        return self._encoded(rows.height, numeric, [self._level_codes(rows[c], c) for c in CATEGORICAL_FEATURES])

    def _filled(self, values: pl.Series, column: str) -> np.ndarray:
        """A numeric column with the training median where missing (validated rows miss none)."""
        return (values.fill_null(self.medians[column]) if values.null_count() else values).to_numpy()

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """`transform` for contract-valid records (every field present, categories in their one
        spelling, as the API's validated houses are): the same matrix, without Polars' fixed cost
        per expression (~0.1 ms), which made encoding one request's row cost ~2 ms."""
        count = len(records)
        numeric = [np.fromiter((r[c] for r in records), np.float64, count) for c in NUMERIC_FEATURES]
        codes = []
        for column in CATEGORICAL_FEATURES:
            index = _LEVEL_INDEX[column]
            codes.append(np.fromiter((index[r[column]] for r in records), np.uint8, count))
        return self._encoded(count, numeric, codes)

    def _level_codes(self, values: pl.Series, column: str) -> np.ndarray:
        """Each value's level index (its one spelling); the mode's where missing, and one past
        the last level (no column) where the value is no level."""
        levels = CATEGORY_LEVELS[column]
        physical = category_values(values, column).to_physical()
        if not physical.null_count():
            return physical.to_numpy()
        codes = physical.fill_null(len(levels)).to_numpy(writable=True)
        if values.null_count():
            mode = self.modes[column]
            codes[values.is_null().to_numpy()] = levels.index(mode) if mode in levels else len(levels)
        return codes

    def _encoded(self, height: int, numeric: list[np.ndarray], codes: list[np.ndarray]) -> np.ndarray:
        """Standardised numerics, then one indicator column per category level, written one
        contiguous column at a time: the matrix is the only full-size float array."""
        matrix = _empty_matrix(height, len(self.feature_names))
        for index, (column, values) in enumerate(zip(NUMERIC_FEATURES, numeric, strict=True)):
            np.subtract(values, self.means[column], out=matrix[:, index])
            np.divide(matrix[:, index], self.stds[column], out=matrix[:, index])
        index = len(NUMERIC_FEATURES)
        for column, level_codes in zip(CATEGORICAL_FEATURES, codes, strict=True):
            for level in range(len(CATEGORY_LEVELS[column])):
                np.equal(level_codes, level, out=matrix[:, index], casting="unsafe")
                index += 1
        return matrix

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Preprocessor:
        return cls(**state)


def _most_frequent(levels: list[str], counts: list[int]) -> str | None:
    """The level counted most, on a tie the first in the enum's order (where sorting an enum's
    modes puts it); None where every value is missing."""
    top = max(counts, default=0)
    return levels[counts.index(top)] if top else None


def _empty_matrix(height: int, width: int) -> np.ndarray:
    """An uninitialised column-major float64 matrix. A large one is mapped with its pages
    populated in one system call and without numpy's huge-page advice: on a VM that hands free
    2 MiB blocks back to its host (the benchmark's KVM guest does), a huge page often faults in
    on the host too, and first touching a fresh 300 MiB matrix took 0.05-0.6 s depending on what
    ran before; small pages populated at once take a steady 0.12 s."""
    size = height * width * 8
    if size < _MAPPED_MATRIX_BYTES or not hasattr(mmap, "MAP_POPULATE"):  # Linux only
        return np.empty((height, width), dtype=np.float64, order="F")
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return np.frombuffer(pages, dtype=np.float64).reshape(width, height).T


def _category(column: str, schema: pl.Schema) -> pl.Expr:
    """A category column in its one spelling: validated enums as they are, raw text normalised."""
    if isinstance(schema[column], pl.Enum):
        return pl.col(column)
    return normalise_category(pl.col(column))


def add_split_columns(rows: pl.DataFrame) -> pl.DataFrame:
    """Attach the hash-based `split` to validated rows."""
    return rows.with_columns(assign_split(rows[ROW_ID]))


@dataclass(frozen=True)
class PreparedBatch:
    """A batch's feature rows and what cleaning did to it."""

    rows: pl.DataFrame
    duplicates_dropped: int
    awaiting_label: int


def prepare_batch(
    valid: pl.DataFrame,
    batch_id: str,
    *,
    earlier: pl.LazyFrame | None = None,
    labels: pl.DataFrame | None = None,
    reference_rows: int | None = None,
    seen_at: datetime | None = None,
) -> PreparedBatch:
    """Validated raw rows → feature rows: labels joined, duplicates dropped, splits assigned.

    Rows still without a price (labels not landed yet) are counted, not kept: a feature row
    is a training example. For the seed batch, `reference_rows` (545) gives its rows the BridgeAI
    reference split by original position (`reference_split`; null for other batches). Every row
    keeps when it was seen if the batch carried a `seen_at`, else `seen_at` is given here (or
    null: the feature table fills in the batch's landing time from its manifest).
    """
    if labels is not None:
        valid = (
            valid.join(labels.rename({TARGET: "__label"}), on=ROW_ID, how="left")
            .with_columns(pl.coalesce(TARGET, "__label").alias(TARGET))
            .drop("__label")
        )
    labelled = valid.filter(pl.col(TARGET).is_not_null())
    kept, dropped = drop_exact_duplicates(labelled, earlier)
    landed = pl.lit(seen_at, dtype=SEEN_AT_DTYPE)
    own = pl.col(SEEN_AT).cast(SEEN_AT_DTYPE) if SEEN_AT in kept.columns else None
    rows = add_split_columns(kept).with_columns(
        pl.lit(batch_id).alias("batch_id"), (landed if own is None else pl.coalesce(own, landed)).alias(SEEN_AT)
    )
    if reference_rows is not None:
        positions = rows[ROW_ID].str.extract(r"-(\d+)$").cast(pl.Int64).to_numpy()
        labels_by_position = reference_split(reference_rows)
        rows = rows.with_columns(pl.Series("reference_split", labels_by_position[positions], dtype=pl.String))
    else:
        rows = rows.with_columns(pl.lit(None, dtype=pl.String).alias("reference_split"))
    return PreparedBatch(
        rows=rows.select(ROW_ID, "batch_id", *FEATURES, TARGET, "split", "reference_split", SEEN_AT),
        duplicates_dropped=dropped,
        awaiting_label=valid.height - labelled.height,
    )
