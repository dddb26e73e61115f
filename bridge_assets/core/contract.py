"""The data contract applied: columns, types, allowed values and the API's plausibility bounds,
as the contract file declares them: `BRIDGE_CONTRACT` (a path), else `contracts/housing.toml`.

The contract is chosen once per process, when bridge is imported: every process of a
deployment (`dagster dev` and its runs, Serve's replicas, the CLI) reads the same file, so the
constants below are the data set's wherever they are imported.

Training, serving and the simulator all validate and normalise through this module, so a
category spelled "YES " in a request means exactly what "yes" meant in training (the
BridgeAI reference upper-cased in serving and lower-cased in training, and silently lost
every category feature).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from bridge_assets.core.contract_spec import HOUSING, CategoryRule, ContractSpec, IntegerRule, NumberRule, load_contract

# When a row was seen (optional in a batch, e.g. the request time of labelled traffic; else its
# batch's landing time): what recency-aware training weights by.
SEEN_AT = "seen_at"  # the default time column (a contract may name another)
SEEN_AT_DTYPE = pl.Datetime("us", "UTC")


def seen_at_values(column: pl.Series) -> pl.Series:
    """A `seen_at` column as UTC datetimes; an unreadable value becomes null (the caller falls
    back to the batch's landing time), never a reason to quarantine a row."""
    if isinstance(column.dtype, pl.Datetime):
        typed = (
            column.dt.replace_time_zone("UTC") if column.dtype.time_zone is None else column.dt.convert_time_zone("UTC")
        )
    else:
        typed = column.cast(pl.String).str.to_datetime(strict=False, time_zone="UTC")
    return typed.cast(SEEN_AT_DTYPE).alias(column.name)


class ContractError(ValueError):
    """A whole batch does not fit the contract (e.g. a required column is missing)."""


@dataclass(frozen=True)
class Validated:
    """Rows that passed the contract (typed, normalised) and rows quarantined with a reason."""

    valid: pl.DataFrame
    quarantined: pl.DataFrame

    def reason_counts(self) -> dict[str, int]:
        """How many quarantined rows failed each individual check."""
        if self.quarantined.is_empty():
            return {}
        counts = (
            self.quarantined.select(pl.col("reason").str.split("; ").alias("r"))
            .explode("r")
            .group_by("r")
            .len()
            .sort("len", descending=True)
        )
        return dict(zip(counts["r"].to_list(), counts["len"].to_list(), strict=True))


def normalise_category(expr: pl.Expr) -> pl.Expr:
    """Strip surrounding whitespace and lower-case: the one spelling of every category."""
    return expr.cast(pl.String).str.strip_chars().str.to_lowercase()


def _respelled(text: pl.Series, values: pl.Series) -> pl.Series:
    """`values` (text matched to its enum) with the text that did not match as sent stripped
    and lower-cased first: only those few values pay for string work."""
    unmatched = (values.is_null() & text.is_not_null()).arg_true()
    if len(unmatched):
        fixed = text.gather(unmatched).str.strip_chars().str.to_lowercase().cast(values.dtype, strict=False)
        values = values.scatter(unmatched, fixed)
    return values.alias(text.name)


def repeated_values(values: pl.Series | pl.DataFrame) -> pl.Series:
    """True for every occurrence of a value (or a frame's row) after its first.

    Exact, but fast where repeats are rare: sorted 64-bit hashes find the few hashes seen
    twice, and only rows carrying those are compared in full.
    """
    if isinstance(values, pl.Series) and _strictly_increasing(values):
        return pl.repeat(False, len(values), eager=True, dtype=pl.Boolean).alias(values.name)
    hashes = values.hash_rows() if isinstance(values, pl.DataFrame) else values.hash()
    ordered = hashes.sort().to_numpy()
    seen_twice = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    repeated = pl.repeat(False, len(values), eager=True, dtype=pl.Boolean)
    if len(seen_twice):
        candidates = hashes.is_in(pl.Series(seen_twice, dtype=hashes.dtype).implode()).arg_true()
        rows = values[candidates]
        first = rows.select(pl.struct(pl.all())).to_series() if isinstance(rows, pl.DataFrame) else rows
        repeated = repeated.scatter(candidates, ~first.is_first_distinct())
    return repeated.alias(values.name if isinstance(values, pl.Series) else "repeated")


def _strictly_increasing(values: pl.Series) -> bool:
    """True for text without nulls in strictly increasing order (a landed batch's zero-padded
    row ids), which cannot repeat: one comparison a row instead of hashing and sorting."""
    if values.dtype != pl.String or values.null_count():
        return False
    return len(values) < 2 or bool((values.slice(1) > values.slice(0, len(values) - 1)).all())


def _number_problems(column: str, typed: pl.Expr, rule: NumberRule) -> list[tuple[pl.Expr, str]]:
    """A number is finite and within its bounds; an infinite or NaN one fails the lower bound."""
    finite = typed.is_finite()
    if rule.gt is not None:
        checks = [(~finite | (typed <= rule.gt), f"{column} must be > {plain_number(rule.gt)}")]
    elif rule.ge is not None:
        checks = [(~finite | (typed < rule.ge), f"{column} must be ≥ {plain_number(rule.ge)}")]
    else:
        checks = [(~finite, f"{column} is not finite")]
    if rule.le is not None:
        checks.append((finite & (typed > rule.le), f"{column} above {plain_number(rule.le)}"))
    return checks


def _number_conforms(typed: pl.Expr, rule: NumberRule) -> pl.Expr:
    ok = typed.is_finite()
    if rule.gt is not None:
        ok = ok & (typed > rule.gt)
    if rule.ge is not None:
        ok = ok & (typed >= rule.ge)
    if rule.le is not None:
        ok = ok & (typed <= rule.le)
    return ok


def plain_number(bound: float) -> str:
    """100000.0 → "100000"; 0.5 → "0.5"."""
    return str(int(bound)) if bound.is_integer() else str(bound)


class Contract:
    """One data set's contract applied: its columns, their polars types, and the checks that
    split a raw batch into conforming rows and quarantined rows with reasons."""

    def __init__(self, spec: ContractSpec) -> None:
        self.spec = spec
        self.version = spec.version
        self.row_id = spec.row_id
        self.target = spec.target.name
        self.seen_at = spec.seen_at
        rules = spec.features
        self.numeric_features = tuple(n for n, rule in rules.items() if not isinstance(rule, CategoryRule))
        self.count_bounds = {n: (rule.ge, rule.le) for n, rule in rules.items() if isinstance(rule, IntegerRule)}
        self.category_levels = {n: rule.levels for n, rule in rules.items() if isinstance(rule, CategoryRule)}
        self.features = (*self.numeric_features, *self.category_levels)
        self.number_rules = {
            self.target: spec.target,
            **{n: rule for n, rule in rules.items() if isinstance(rule, NumberRule)},
        }
        # Validated categories are enums: one byte a value, and an invalid level cannot exist.
        self.category_dtypes = {n: pl.Enum(list(levels)) for n, levels in self.category_levels.items()}
        self.schema: dict[str, pl.DataType] = {
            self.row_id: pl.String(),
            **{n: pl.Int64() if n in self.count_bounds else pl.Float64() for n in self.numeric_features},
            **self.category_dtypes,
            self.target: pl.Float64(),
        }

    def upper_bound(self, column: str) -> float:
        """A number column's largest allowed value (infinite where the contract sets none)."""
        bound = self.number_rules[column].le
        return math.inf if bound is None else bound

    def category_values(self, raw: pl.Series, column: str) -> pl.Series:
        """A raw category column as its enum, normalised; null where missing or not a valid level.

        Values already spelled canonically (nearly all) are matched by plain comparisons; only the
        rest are stripped and lower-cased, which is what `normalise_category` does to every value.
        """
        dtype = self.category_dtypes[column]
        if raw.dtype == dtype:
            return raw
        text = raw.cast(pl.String)
        return _respelled(text, text.to_frame().select(self._as_spelled(pl.col(column), column)).to_series())

    def _as_spelled(self, text: pl.Expr, column: str) -> pl.Expr:
        """Text as its category's enum where it is a level exactly as sent, else null: one string
        comparison per level, several times cheaper than a cast to the enum (a look-up per value)."""
        dtype = self.category_dtypes[column]
        matched = pl.lit(None, dtype=dtype)
        for level in reversed(self.category_levels[column]):
            matched = pl.when(text == level).then(pl.lit(level, dtype=dtype)).otherwise(matched)
        return matched.alias(column)

    def _problems(self, column: str, raw: pl.Expr, typed: pl.Expr, require_target: bool) -> list[tuple[pl.Expr, str]]:
        """(condition, message) pairs: where a condition holds, `column` breaks the contract."""
        checks: list[tuple[pl.Expr, str]] = []
        if column != self.target or require_target:
            checks.append((raw.is_null(), f"{column} is missing"))
        if column in self.category_levels:
            levels = self.category_levels[column]
            checks.append((raw.is_not_null() & typed.is_null(), f"{column} not one of {'/'.join(levels)}"))
            return checks
        checks.append((raw.is_not_null() & typed.is_null(), f"{column} is not a number"))
        if column in self.count_bounds:
            low, high = self.count_bounds[column]
            checks.append(((typed % 1) != 0, f"{column} is not a whole number"))
            checks.append(((typed < low) | (typed > high), f"{column} outside {low}-{high}"))
        else:
            checks += _number_problems(column, typed, self.number_rules[column])
        return [(condition.fill_null(False), message) for condition, message in checks]

    def _conforms(self, column: str, raw: pl.Expr, typed: pl.Expr, whole: bool, require_target: bool) -> pl.Expr:
        """True where `column` meets the contract: none of `_problems`' conditions holds, in one or
        two comparisons (a null typed value is missing or unreadable, which is a problem except for
        an optional target that is absent). `whole`: the raw values are integers already."""
        if column in self.category_levels:
            ok = typed.is_not_null()
        elif column in self.count_bounds:
            ok = typed.is_between(*self.count_bounds[column])  # NaN sorts above every bound: refused too
            ok = ok if whole else ok & (typed % 1 == 0)
        else:
            ok = _number_conforms(typed, self.number_rules[column])
            if column == self.target and not require_target:
                ok = raw.is_null() | ok
        return ok.fill_null(False)

    def _respelled_categories(self, raw: pl.DataFrame, staged: pl.DataFrame) -> pl.DataFrame:
        """`staged` with its typed categories (`__typed_<column>`) fixed in the rows where some did
        not match a level as sent (in practice the same few rows for every column): only their raw
        text is normalised. A value that matched as sent is a level already and a missing one stays
        missing, so normalising the whole row changes neither."""
        columns = [c for c in self.category_levels if raw.schema[c] != self.category_dtypes[c]]
        if not columns:
            return staged
        odd = staged.select(pl.any_horizontal(pl.col(f"__typed_{c}").is_null() for c in columns)).to_series()
        rows = odd.arg_true()
        if not len(rows):
            return staged
        text = raw.select(pl.col(columns).filter(odd))
        return staged.with_columns(staged[f"__typed_{c}"].scatter(rows, self._folded(text[c], c)) for c in columns)

    def _folded(self, text: pl.Series, column: str) -> pl.Series:
        """Text stripped, lower-cased and matched to its category's enum (null where no level),
        with the string work done once per distinct spelling: odd spellings come in few kinds."""
        spellings = text.drop_nulls().unique()
        levels = spellings.to_frame().select(self._as_spelled(normalise_category(pl.col(column)), column)).to_series()
        return text.replace_strict(spellings, levels, default=None, return_dtype=self.category_dtypes[column])

    def validate(self, frame: pl.DataFrame, *, require_target: bool = True) -> Validated:
        """Split a raw batch into contract-conforming rows and quarantined rows with reasons.

        Accepts string or numeric columns (CSV batches may hold anything); categories are
        accepted in any case and with surrounding whitespace. `row_id` must already be present.
        Raises ContractError when a required column is missing, since then no row can be judged.
        """
        wanted = [*self.features, self.target] if require_target else list(self.features)
        missing = [c for c in (self.row_id, *wanted) if c not in frame.columns]
        if missing:
            raise ContractError(f"missing required column(s): {', '.join(missing)}")
        if self.target not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(self.target))

        schema = frame.schema
        typed: dict[str, pl.Expr] = {}
        for column in (*self.features, self.target):
            raw = pl.col(column)
            if column in self.category_levels:
                typed[column] = (
                    raw
                    if schema[column] == self.category_dtypes[column]
                    else self._as_spelled(raw.cast(pl.String), column)
                )
            elif column in self.count_bounds and schema[column].is_integer():
                typed[column] = raw.cast(pl.Int64)  # whole already: no round trip through floats
            elif schema[column].is_numeric() or schema[column] == pl.Null:
                typed[column] = raw.cast(pl.Float64)
            else:  # text (CSV): anything that does not parse as a number is flagged, not dropped
                typed[column] = raw.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
        # Typed values in one parallel pass, then one chunk per column (Parquet gives one per row
        # group; the series computed below have one, and mixing the two re-aligns every query). The
        # raw text stays out: only the few quarantined rows need it.
        staged = frame.select(
            self.row_id,
            self.target,  # raw: an optional target may be absent, but not unreadable
            *(expr.alias(f"__typed_{name}") for name, expr in typed.items()),
        ).rechunk()
        staged = self._respelled_categories(frame, staged)
        staged = staged.with_columns(repeated_values(staged[self.row_id]).alias("__repeated_id"))
        row_id = pl.col(self.row_id)
        # One cheap boolean pass decides; reasons are spelled out only for the (few) bad rows.
        conforming = [
            row_id.is_not_null() & ~pl.col("__repeated_id"),
            *(
                self._conforms(c, pl.col(c), pl.col(f"__typed_{c}"), schema[c].is_integer(), require_target)
                for c in (*self.features, self.target)
            ),
        ]
        bad = staged.select(~pl.all_horizontal(conforming)).to_series()
        valid = (
            staged.select(self.row_id, *(f"__typed_{c}" for c in (*self.features, self.target)))
            .filter(~bad)
            .select(  # no raw text copied
                row_id.cast(pl.String),
                *(pl.col(f"__typed_{c}").cast(self.schema[c]).alias(c) for c in (*self.features, self.target)),
            )
        )
        if self.seen_at in frame.columns:
            valid = valid.with_columns(seen_at_values(frame[self.seen_at]).filter(~bad))
        checks = [
            (row_id.is_null(), f"{self.row_id} is missing"),
            (row_id.is_not_null() & pl.col("__repeated_id"), f"duplicate {self.row_id}"),
            *(
                check
                for column in (*self.features, self.target)
                for check in self._problems(column, pl.col(column), pl.col(f"__typed_{column}"), require_target)
            ),
        ]
        reasons = [pl.when(condition).then(pl.lit(message)) for condition, message in checks]
        flags = [f"__typed_{c}" for c in (*self.features, self.target)] + ["__repeated_id"]
        quarantined = pl.concat([frame.filter(bad), staged.filter(bad).select(flags)], how="horizontal").select(
            *(pl.col(c).cast(pl.String) for c in frame.columns if c != "reason"),
            pl.concat_str(reasons, separator="; ", ignore_nulls=True).alias("reason"),
        )
        return Validated(valid=valid, quarantined=quarantined)


CONTRACT_VARIABLE = "BRIDGE_CONTRACT"
CONTRACT_PATH = Path(os.environ.get(CONTRACT_VARIABLE) or HOUSING).expanduser().resolve()
SPEC = load_contract(CONTRACT_PATH)
CONTRACT = Contract(SPEC)
CONTRACT_VERSION = CONTRACT.version

ROW_ID = CONTRACT.row_id
TARGET = CONTRACT.target
NUMERIC_FEATURES: tuple[str, ...] = CONTRACT.numeric_features
COUNT_FEATURES: tuple[str, ...] = tuple(CONTRACT.count_bounds)
# Numbers that are not counts (housing's area): drawn from a smoothed quantile function by the
# simulator, probed at their bounds by the gates.
MEASURES: tuple[str, ...] = tuple(n for n in NUMERIC_FEATURES if n not in CONTRACT.count_bounds)
CATEGORY_LEVELS: dict[str, tuple[str, ...]] = CONTRACT.category_levels
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(CATEGORY_LEVELS)
FEATURES: tuple[str, ...] = CONTRACT.features
SEED_COLUMNS: tuple[str, ...] = SPEC.seed_columns
SLICES: tuple[str, ...] = SPEC.slices
COUNT_BOUNDS: dict[str, tuple[int, int]] = CONTRACT.count_bounds
CATEGORY_DTYPES: dict[str, pl.Enum] = CONTRACT.category_dtypes
SCHEMA: dict[str, pl.DataType] = CONTRACT.schema
COLUMNS: tuple[str, ...] = (ROW_ID, *FEATURES, TARGET)
# What the data set is for and where models of it fall short: the model card's "Intended use"
# and "Limits" (facts about the data, not about one version).
INTENDED_USE = SPEC.intended_use
KNOWN_LIMITS: tuple[str, ...] = SPEC.known_limits
validate = CONTRACT.validate
category_values = CONTRACT.category_values


def seed_data_path() -> Path | None:
    """The contract's CSV of real rows (its `seed_data`, relative to the contract file), if any."""
    return CONTRACT_PATH.parent / SPEC.seed_data if SPEC.seed_data else None
