"""Industry-data simulator (step 22): new housing rows from a generative model of the seed data.

The model is a Gaussian copula over the twelve features (so dependencies such as
area ↔ bedrooms ↔ price survive) with each feature's own marginal, and a log-linear price
relationship with the seed data's residual noise. Rows are drawn, not resampled: areas come
from a smoothed quantile function and prices from the noisy price model, so simulated rows
almost never equal a real one. Drift knobs act on the latent copula space or on the price
model, so drifted data stays inside the contract's domain; corrupt rows are a separate,
counted knob for exercising quarantine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
from scipy.special import ndtr, ndtri

from bridge_assets.core.contract import (
    CATEGORICAL_FEATURES,
    COUNT_FEATURES,
    FEATURES,
    ROW_ID,
    SEED_COLUMNS,
    TARGET,
)

SEED_BATCH_ID = "housing-seed"
SEED_ROWS = 545  # rows of the real data, over which the reference split is defined
# Rows are generated in fixed-size blocks, each from its own seeded stream, so a batch is
# reproducible from (seed, rows) whatever size the caller's chunks are.
BLOCK_ROWS = 250_000
# Latent order of each categorical: low to high price, so the copula's correlations read
# naturally (more bathrooms, air conditioning and furnishing all go with higher prices).
_CATEGORY_ORDER: dict[str, tuple[str, ...]] = {
    **{c: ("no", "yes") for c in CATEGORICAL_FEATURES if c != "furnishingstatus"},
    "furnishingstatus": ("unfurnished", "semi-furnished", "furnished"),
}
_CORRUPTIONS: tuple[tuple[str, object], ...] = (
    ("bedrooms", 12),
    ("stories", 0),
    ("area", -250.0),
    ("area", None),
    ("price", None),
    ("price", -1.0),
    ("mainroad", "maybe"),
    ("furnishingstatus", "partly"),
)


def seed_data_path() -> Path:
    """The real Kaggle housing data shipped in the package (see data/SOURCE.md)."""
    return Path(str(resources.files("bridge_assets.core") / "data" / "HousingData.csv"))


def load_seed_data() -> pl.DataFrame:
    """The 545 real rows with stable row ids `housing-seed-0000` … in file order."""
    frame = pl.read_csv(seed_data_path(), schema_overrides={"area": pl.Float64, "price": pl.Float64})
    return frame.select(
        pl.format("{}-{}", pl.lit(SEED_BATCH_ID), pl.int_range(pl.len()).cast(pl.String).str.zfill(4)).alias(ROW_ID),
        *SEED_COLUMNS,
    )


@dataclass
class Drift:
    """Controlled changes from the seed distribution; the default is no drift.

    - `shift` / `scale`: per feature, move / stretch its latent normal (in standard deviations).
      On `area` this changes sizes; on counts and categories it changes their mix, always
      staying inside the observed, valid values.
    - `area_factor`: multiply areas (e.g. 1.2 = houses 20% larger).
    - `category_weights`: replace a categorical or count feature's mix, e.g.
      `{"furnishingstatus": {"furnished": 0.7, "semi-furnished": 0.2, "unfurnished": 0.1}}`.
    - `price_factor`: label shift, every price multiplied (e.g. market-wide inflation).
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


@dataclass
class HousingSimulator:
    """A fitted generative model of housing rows; build it with `HousingSimulator.fit`."""

    correlation: np.ndarray  # latent correlation of FEATURES (in that order)
    log_area_quantiles: np.ndarray  # sorted log areas of the seed data
    log_area_bandwidth: float
    levels: dict[str, np.ndarray]  # per discrete feature, its values in latent order
    probabilities: dict[str, np.ndarray]  # per discrete feature, their frequencies
    price_coefficients: dict[str, float]  # log-price model: "intercept", "log_area", features…
    price_noise: float  # residual standard deviation of log price

    @classmethod
    def fit(cls, seed: pl.DataFrame | None = None) -> HousingSimulator:
        """Fit marginals, copula correlation and the price model to the (default: real) data."""
        seed = load_seed_data() if seed is None else seed
        n = seed.height
        levels: dict[str, np.ndarray] = {}
        probabilities: dict[str, np.ndarray] = {}
        scores = np.empty((n, len(FEATURES)))
        for j, name in enumerate(FEATURES):
            values = seed[name].to_numpy()
            if name in COUNT_FEATURES:
                levels[name] = np.unique(values)
            elif name in CATEGORICAL_FEATURES:
                levels[name] = np.asarray(_CATEGORY_ORDER[name], dtype=object)
            if name in levels:
                codes = np.searchsorted(levels[name], values) if name in COUNT_FEATURES else _codes(name, values)
                counts = np.bincount(codes, minlength=len(levels[name]))
                probabilities[name] = counts / counts.sum()
                upper = np.cumsum(probabilities[name])
                lower = upper - probabilities[name]
                scores[:, j] = ndtri(((lower + upper) / 2)[codes])  # mid-rank normal score
            else:  # area
                ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
                scores[:, j] = ndtri((ranks + 0.5) / n)
        correlation = np.atleast_2d(np.corrcoef(scores, rowvar=False))
        log_area = np.sort(np.log(seed["area"].to_numpy()))
        coefficients, noise = _fit_price_model(seed)
        return cls(
            correlation=correlation,
            log_area_quantiles=log_area,
            # Silverman's rule: smooth the quantile function so areas are new values.
            log_area_bandwidth=float(1.06 * log_area.std() * n ** (-1 / 5)),
            levels=levels,
            probabilities=probabilities,
            price_coefficients=coefficients,
            price_noise=noise,
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

        `corrupt_fraction` of rows get one contract violation each (out-of-range count,
        non-positive or missing area or price, unknown category); `case_noise` of rows get
        valid categories in random case and padding, which cleaning must normalise.
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
            if name == "area":
                positions = uniform[:, j] * (len(self.log_area_quantiles) - 1)
                log_area = np.interp(positions, np.arange(len(self.log_area_quantiles)), self.log_area_quantiles)
                log_area += rng.normal(0.0, self.log_area_bandwidth, size)
                columns[name] = np.maximum(np.round(np.exp(log_area) * drift.area_factor), 1.0)
            else:
                probabilities = self.probabilities[name]
                if name in drift.category_weights:
                    probabilities = _weights(name, self.levels[name], drift.category_weights[name])
                codes = np.searchsorted(np.cumsum(probabilities)[:-1], uniform[:, j], side="right")
                columns[name] = self.levels[name][codes]
        log_price = self._log_price(columns, drift) + rng.normal(0.0, self.price_noise, size)
        price = np.round(np.exp(log_price) * drift.price_factor, -3)
        return pl.DataFrame(
            {
                TARGET: np.maximum(price, 1000.0),
                **{c: columns[c].astype(np.int64) if c in COUNT_FEATURES else columns[c] for c in FEATURES},
            },
            schema_overrides={c: pl.String for c in CATEGORICAL_FEATURES},
        )

    def _log_price(self, columns: dict[str, np.ndarray], drift: Drift) -> np.ndarray:
        coefficients = self.price_coefficients
        design = _price_design(columns)
        total = np.full(len(columns["area"]), coefficients["intercept"])
        for term, values in design.items():
            feature = "area" if term == "log_area" else term.split("=")[0]
            total += coefficients[term] * drift.concept.get(feature, 1.0) * values
        return total


def _codes(name: str, values: np.ndarray) -> np.ndarray:
    order = {level: i for i, level in enumerate(_CATEGORY_ORDER[name])}
    return np.fromiter((order[v] for v in values), dtype=np.int64, count=len(values))


def _weights(name: str, levels: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    allowed = {str(level) for level in levels}
    if set(map(str, weights)) - allowed or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"category_weights[{name!r}] needs non-negative weights over {sorted(allowed)}")
    raw = np.array([float(weights.get(str(level), 0.0)) for level in levels])
    return raw / raw.sum()


def _price_design(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Regressors of the log-price model: log area, counts, one indicator per non-base level."""
    design = {"log_area": np.log(columns["area"].astype(np.float64))}
    for name in COUNT_FEATURES:
        design[name] = columns[name].astype(np.float64)
    for name in CATEGORICAL_FEATURES:
        for level in _CATEGORY_ORDER[name][1:]:
            design[f"{name}={level}"] = (columns[name] == level).astype(np.float64)
    return design


def _fit_price_model(seed: pl.DataFrame) -> tuple[dict[str, float], float]:
    columns = {c: seed[c].to_numpy() for c in FEATURES}
    design = _price_design(columns)
    matrix = np.column_stack([np.ones(seed.height), *design.values()])
    target = np.log(seed[TARGET].to_numpy().astype(np.float64))
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
    blocks = HousingSimulator.fit().generate(
        rows, seed=seed, batch_id=batch_id, drift=drift, corrupt_fraction=corrupt_fraction, case_noise=case_noise
    )
    frames = list(blocks)
    return pl.concat(frames) if frames else pl.DataFrame(schema=load_seed_data().schema)
