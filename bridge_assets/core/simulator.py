"""Industry-data simulator (step 22): new rows of the contract's data set from a generative
model of its seed data (`seed_data` in the contract; housing's by default).

The model is a Gaussian copula over the features (so dependencies such as
area ↔ bedrooms ↔ price survive) with each feature's own marginal, and a log-linear target
relationship with the seed data's residual noise. Rows are drawn, not resampled: measures
(numbers that are not counts, e.g. area) come from a smoothed quantile function and targets
from the noisy target model, so simulated rows almost never equal a real one. Drift knobs act
on the latent copula space or on the target model, so drifted data stays inside the contract's
domain; corrupt rows are a separate, counted knob for exercising quarantine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy.special import ndtr, ndtri

from bridge_assets.core.contract import (
    CATEGORICAL_FEATURES,
    CATEGORY_LEVELS,
    COUNT_BOUNDS,
    COUNT_FEATURES,
    FEATURES,
    MEASURES,
    ROW_ID,
    SEED_COLUMNS,
    SPEC,
    TARGET,
    seed_data_path,
)

SEED_BATCH_ID = f"{SPEC.name}-seed"
# Rows are generated in fixed-size blocks, each from its own seeded stream, so a batch is
# reproducible from (seed, rows) whatever size the caller's chunks are.
BLOCK_ROWS = 250_000
_NOT_A_LEVEL = "not-a-level"


def _corruptions() -> tuple[tuple[str, object], ...]:
    """The contract's planted faults; by default one of each kind its rules allow."""
    if SPEC.simulation.corruptions:
        return tuple((c.column, c.value) for c in SPEC.simulation.corruptions)
    faults: list[tuple[str, object]] = [(TARGET, None), (TARGET, -1.0)]
    faults += [(name, high + 3) for name, (_, high) in list(COUNT_BOUNDS.items())[:1]]
    faults += [(name, None) for name in MEASURES[:1]]
    faults += [(name, _NOT_A_LEVEL) for name in CATEGORICAL_FEATURES[:1]]
    return tuple(faults)


_CORRUPTIONS = _corruptions()


def load_seed_data() -> pl.DataFrame:
    """The contract's real rows with stable row ids `<name>-seed-0000` … in file order."""
    path = seed_data_path()
    if path is None:
        raise FileNotFoundError(f"the {SPEC.name} contract names no seed_data (a CSV of real rows)")
    numbers = {name: pl.Float64 for name in (*MEASURES, TARGET)}
    frame = pl.read_csv(path, schema_overrides=numbers | {name: pl.String for name in CATEGORICAL_FEATURES})
    return frame.select(
        pl.format("{}-{}", pl.lit(SEED_BATCH_ID), pl.int_range(pl.len()).cast(pl.String).str.zfill(4)).alias(ROW_ID),
        *SEED_COLUMNS,
    )


# Rows of the real data, over which the reference split is defined.
SEED_ROWS = load_seed_data().height if seed_data_path() else 0


@dataclass
class Drift:
    """Controlled changes from the seed distribution; the default is no drift.

    - `shift` / `scale`: per feature, move / stretch its latent normal (in standard deviations).
      On `area` this changes sizes; on counts and categories it changes their mix, always
      staying inside the observed, valid values.
    - `area_factor`: multiply areas (e.g. 1.2 = houses 20% larger).
    - `category_weights`: replace a categorical or count feature's mix, e.g.
      `{"furnishingstatus": {"furnished": 0.7, "semi-furnished": 0.2, "unfurnished": 0.1}}`.
    - `price_factor`: label shift, every target value multiplied (e.g. market-wide inflation).
    - `concept`: concept drift, multiply a feature's effect in the price model
      (e.g. `{"airconditioning": 0.0}` = air conditioning no longer adds value).
    """

    shift: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    area_factor: float = 1.0
    category_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    price_factor: float = 1.0
    concept: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = (set(self.shift) | set(self.scale) | set(self.concept) | set(self.category_weights)) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature(s) in drift: {sorted(unknown)}")
        if self.area_factor <= 0 or self.price_factor <= 0 or any(v <= 0 for v in self.scale.values()):
            raise ValueError("area_factor, price_factor and scale must be > 0 to stay in the valid domain")
        if self.area_factor != 1.0 and "area" not in MEASURES:
            raise ValueError(f"area_factor needs an `area` measure, which the {SPEC.name} contract has not")


@dataclass
class Simulator:
    """A fitted generative model of the contract's rows; build it with `Simulator.fit`."""

    correlation: np.ndarray  # latent correlation of FEATURES (in that order)
    quantiles: dict[str, np.ndarray]  # per measure, its sorted seed values (logs where all are positive)
    bandwidths: dict[str, float]  # per measure, the smoothing of its quantile function
    decimals: dict[str, int]  # per measure, the decimals its seed values are given to
    levels: dict[str, np.ndarray]  # per discrete feature, its values in latent order
    probabilities: dict[str, np.ndarray]  # per discrete feature, their frequencies
    target_coefficients: dict[str, float]  # target model: "intercept", "log_area", features…
    target_noise: float  # residual standard deviation of the (log) target
    log_target: bool  # the target model is log-linear (every seed target is positive)
    logged: frozenset[str]  # the measures modelled on a log scale (every seed value positive)

    @classmethod
    def fit(cls, seed: pl.DataFrame | None = None) -> Simulator:
        """Fit marginals, copula correlation and the target model to the (default: real) data."""
        seed = load_seed_data() if seed is None else seed
        n = seed.height
        log_target = bool((seed[TARGET] > 0).all())
        target = seed[TARGET].to_numpy().astype(np.float64)
        logged = frozenset(name for name in MEASURES if (seed[name] > 0).all())
        levels: dict[str, np.ndarray] = {}
        probabilities: dict[str, np.ndarray] = {}
        quantiles: dict[str, np.ndarray] = {}
        bandwidths: dict[str, float] = {}
        scores = np.empty((n, len(FEATURES)))
        for j, name in enumerate(FEATURES):
            values = seed[name].to_numpy()
            if name in COUNT_FEATURES:
                levels[name] = np.unique(values)
            elif name in CATEGORICAL_FEATURES:
                levels[name] = _by_mean_target(name, values, target)
            if name in levels:
                codes = (
                    np.searchsorted(levels[name], values) if name in COUNT_FEATURES else _codes(levels[name], values)
                )
                counts = np.bincount(codes, minlength=len(levels[name]))
                probabilities[name] = counts / counts.sum()
                upper = np.cumsum(probabilities[name])
                lower = upper - probabilities[name]
                scores[:, j] = ndtri(((lower + upper) / 2)[codes])  # mid-rank normal score
            else:  # a measure
                ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
                scores[:, j] = ndtri((ranks + 0.5) / n)
                measured = values.astype(np.float64)
                quantiles[name] = np.sort(np.log(measured) if name in logged else measured)
                # Silverman's rule: smooth the quantile function so measures are new values.
                bandwidths[name] = float(1.06 * quantiles[name].std() * n ** (-1 / 5))
        correlation = np.atleast_2d(np.corrcoef(scores, rowvar=False))
        coefficients, noise = _fit_target_model(seed, levels, logged, log_target)
        return cls(
            correlation=correlation,
            quantiles=quantiles,
            bandwidths=bandwidths,
            decimals={name: _decimals(seed[name].to_numpy()) for name in MEASURES},
            levels=levels,
            probabilities=probabilities,
            target_coefficients=coefficients,
            target_noise=noise,
            log_target=log_target,
            logged=logged,
        )

    def generate(
        self,
        rows: int,
        *,
        seed: int = 0,
        batch_id: str = "sim",
        drift: Drift | None = None,
        corrupt_fraction: float = 0.0,
        case_noise: float = 0.0,
    ) -> Iterator[pl.DataFrame]:
        """Yield the batch in blocks of `BLOCK_ROWS`; deterministic from (seed, rows, knobs).

        `corrupt_fraction` of rows get one contract violation each (the contract's
        `simulation.corruptions`); `case_noise` of rows get valid categories in random case and
        padding, which cleaning must normalise.
        """
        if rows < 0 or not 0 <= corrupt_fraction <= 1 or not 0 <= case_noise <= 1:
            raise ValueError("rows must be >= 0 and fractions within [0, 1]")
        drift = drift or Drift()
        cholesky = np.linalg.cholesky(self.correlation + 1e-9 * np.eye(len(FEATURES)))
        for block, start in enumerate(range(0, rows, BLOCK_ROWS)):
            size = min(BLOCK_ROWS, rows - start)
            rng = np.random.default_rng([seed, block])
            frame = self._block(rng, size, cholesky, drift)
            if case_noise:
                frame = _add_case_noise(frame, rng, case_noise)
            if corrupt_fraction:
                frame = _corrupt(frame, rng, corrupt_fraction)
            ids = pl.int_range(start, start + size, eager=True).cast(pl.String).str.zfill(9)
            yield frame.with_columns((f"{batch_id}-" + ids).alias(ROW_ID)).select(ROW_ID, *SEED_COLUMNS)

    def _block(self, rng: np.random.Generator, size: int, cholesky: np.ndarray, drift: Drift) -> pl.DataFrame:
        latent = rng.standard_normal((size, len(FEATURES))) @ cholesky.T
        for j, name in enumerate(FEATURES):
            latent[:, j] = latent[:, j] * drift.scale.get(name, 1.0) + drift.shift.get(name, 0.0)
        uniform = ndtr(latent)
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(FEATURES):
            if name in self.quantiles:
                columns[name] = self._measure(name, uniform[:, j], rng, drift)
            else:
                probabilities = self.probabilities[name]
                if name in drift.category_weights:
                    probabilities = _weights(name, self.levels[name], drift.category_weights[name])
                codes = np.searchsorted(np.cumsum(probabilities)[:-1], uniform[:, j], side="right")
                columns[name] = self.levels[name][codes]
        decimals = SPEC.simulation.target_decimals
        noisy = self._target_model(columns, drift) + rng.normal(0.0, self.target_noise, size)
        target = np.round((np.exp(noisy) if self.log_target else noisy) * drift.price_factor, decimals)
        return pl.DataFrame(
            {
                TARGET: np.maximum(target, 10.0**-decimals) if self.log_target else target,
                **{c: columns[c].astype(np.int64) if c in COUNT_FEATURES else columns[c] for c in FEATURES},
            },
            schema_overrides={c: pl.String for c in CATEGORICAL_FEATURES},
        )

    def _measure(self, name: str, uniform: np.ndarray, rng: np.random.Generator, drift: Drift) -> np.ndarray:
        """A measure's values: its smoothed quantile function at `uniform`, in the seed's precision."""
        quantiles, decimals = self.quantiles[name], self.decimals[name]
        positions = uniform * (len(quantiles) - 1)
        values = np.interp(positions, np.arange(len(quantiles)), quantiles)
        values += rng.normal(0.0, self.bandwidths[name], len(uniform))
        factor = drift.area_factor if name == "area" else 1.0
        if name in self.logged:
            return np.maximum(np.round(np.exp(values) * factor, decimals), 10.0**-decimals)
        return np.round(values * factor, decimals)

    def _target_model(self, columns: dict[str, np.ndarray], drift: Drift) -> np.ndarray:
        coefficients = self.target_coefficients
        design = _design(columns, self.levels, self.logged)
        total = np.full(len(columns[FEATURES[0]]), coefficients["intercept"])
        for term, values in design.items():
            feature = term.removeprefix("log_") if term.startswith("log_") else term.split("=")[0]
            total += coefficients[term] * drift.concept.get(feature, 1.0) * values
        return total


def _decimals(values: np.ndarray) -> int:
    """The fewest decimals (up to 6) that give every value exactly: a seed's precision."""
    values = values.astype(np.float64)
    return next((k for k in range(7) if np.allclose(np.round(values, k), values, rtol=0, atol=1e-9)), 6)


def _by_mean_target(name: str, values: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A category's levels from the lowest mean target to the highest (levels absent from the
    seed last), so the copula's correlations read naturally (air conditioning goes with higher
    prices)."""
    means = {level: target[values == level].mean() for level in CATEGORY_LEVELS[name] if (values == level).any()}
    absent = [level for level in CATEGORY_LEVELS[name] if level not in means]
    return np.asarray([*sorted(means, key=means.__getitem__), *absent], dtype=object)


def _codes(levels: np.ndarray, values: np.ndarray) -> np.ndarray:
    order = {level: i for i, level in enumerate(levels)}
    return np.fromiter((order[v] for v in values), dtype=np.int64, count=len(values))


def _weights(name: str, levels: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    allowed = {str(level) for level in levels}
    if set(map(str, weights)) - allowed or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"category_weights[{name!r}] needs non-negative weights over {sorted(allowed)}")
    raw = np.array([float(weights.get(str(level), 0.0)) for level in levels])
    return raw / raw.sum()


def _design(
    columns: dict[str, np.ndarray], levels: dict[str, np.ndarray], logged: frozenset[str]
) -> dict[str, np.ndarray]:
    """Regressors of the target model: each measure (its log where positive), counts, one
    indicator per non-base level."""
    design = {}
    for name in MEASURES:
        values = columns[name].astype(np.float64)
        design[f"log_{name}" if name in logged else name] = np.log(values) if name in logged else values
    for name in COUNT_FEATURES:
        design[name] = columns[name].astype(np.float64)
    for name in CATEGORICAL_FEATURES:
        for level in levels[name][1:]:
            design[f"{name}={level}"] = (columns[name] == level).astype(np.float64)
    return design


def _fit_target_model(
    seed: pl.DataFrame, levels: dict[str, np.ndarray], logged: frozenset[str], log_target: bool
) -> tuple[dict[str, float], float]:
    columns = {c: seed[c].to_numpy() for c in FEATURES}
    design = _design(columns, levels, logged)
    matrix = np.column_stack([np.ones(seed.height), *design.values()])
    target = seed[TARGET].to_numpy().astype(np.float64)
    target = np.log(target) if log_target else target
    beta, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    residuals = target - matrix @ beta
    noise = float(np.sqrt(residuals @ residuals / (seed.height - matrix.shape[1])))
    return dict(zip(["intercept", *design], map(float, beta), strict=True)), noise


def _add_case_noise(frame: pl.DataFrame, rng: np.random.Generator, fraction: float) -> pl.DataFrame:
    chosen = pl.Series(rng.random(frame.height) < fraction)
    return frame.with_columns(
        pl.when(chosen).then(pl.lit("  ") + pl.col(c).str.to_uppercase() + pl.lit(" ")).otherwise(pl.col(c)).alias(c)
        for c in CATEGORICAL_FEATURES
    )


def _corrupt(frame: pl.DataFrame, rng: np.random.Generator, fraction: float) -> pl.DataFrame:
    """Give `fraction` of rows one contract violation each, spread over the kinds above."""
    kinds = np.where(rng.random(frame.height) < fraction, rng.integers(0, len(_CORRUPTIONS), frame.height), -1)
    updates = []
    for kind, (column, bad_value) in enumerate(_CORRUPTIONS):
        hit = pl.Series(kinds == kind)
        dtype = frame.schema[column]
        updates.append((column, hit, pl.lit(bad_value, dtype=dtype)))
    exprs: dict[str, pl.Expr] = {}
    for column, hit, value in updates:
        exprs[column] = pl.when(hit).then(value).otherwise(exprs.get(column, pl.col(column)))
    return frame.with_columns(expr.alias(column) for column, expr in exprs.items())


def simulate(
    rows: int,
    *,
    seed: int = 0,
    batch_id: str = "sim",
    drift: Drift | None = None,
    corrupt_fraction: float = 0.0,
    case_noise: float = 0.0,
) -> pl.DataFrame:
    """Convenience for notebooks: one simulated batch as a single DataFrame."""
    blocks = Simulator.fit().generate(
        rows, seed=seed, batch_id=batch_id, drift=drift, corrupt_fraction=corrupt_fraction, case_noise=case_noise
    )
    frames = list(blocks)
    return pl.concat(frames) if frames else pl.DataFrame(schema=load_seed_data().schema)
