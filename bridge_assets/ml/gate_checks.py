"""The gates one by one: each judges one property of a registered pyfunc and returns a
`GateResult` with the figures that decided it; `gates.run_gates` runs them all on a version and
records the outcome."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.models import MetricThreshold

from bridge_assets.core.contract import CATEGORY_LEVELS, CONTRACT, COUNT_BOUNDS, FEATURES, MEASURES, SLICES, TARGET
from bridge_assets.core.simulator import load_seed_data
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.tracking import MODEL_SIGNATURE


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome; `summary` names the numbers that decided it."""

    name: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


Predictor = Callable[[pd.DataFrame], np.ndarray]


def model_input(rows: pl.DataFrame) -> pd.DataFrame:
    """Feature rows as a client sends them: categories as text, counts as integers."""
    return rows.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).to_pandas()


def predict(model: Any, frame: pd.DataFrame) -> np.ndarray:
    return np.asarray(model.predict(frame), dtype=np.float64).reshape(-1)


def measure_bounds(seed: pl.DataFrame) -> dict[str, tuple[float, float]]:
    """Each measure's smallest and largest valid value as the edge probe tries them: the
    contract's bounds (above an exclusive lower bound, the next whole number: area 1), else ten
    times beyond the seed's extremes."""
    bounds = {}
    for name in MEASURES:
        rule, values = CONTRACT.number_rules[name], seed[name].cast(pl.Float64).to_numpy()
        smallest, largest = float(values.min()), float(values.max())
        if rule.ge is not None:
            low = rule.ge
        elif rule.gt is not None:
            low = math.floor(rule.gt) + 1.0
        else:
            low = min(smallest * 10, smallest / 10)
        high = rule.le if rule.le is not None else max(largest * 10, largest / 10)
        bounds[name] = (float(low), float(high))
    return bounds


def edge_probe_rows(seed: pl.DataFrame, bounds: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """A typical row varied one field at a time to every bound (for a measure such as area, its
    smallest and largest valid value), all fields at their lows and at their highs, and each
    category level spelled lower, UPPER and ' Title ' (with spaces); `bounds` from `measure_bounds`."""
    base = seed.select(FEATURES).row(0, named=True)
    rows: list[dict[str, Any]] = []
    for name, (count_low, count_high) in COUNT_BOUNDS.items():
        rows += [{**base, name: count_low}, {**base, name: count_high}]
    for name, (low, high) in bounds.items():
        rows += [{**base, name: low}, {**base, name: high}]
    highs = {name: high for name, (_, high) in bounds.items()}
    lows = {name: low for name, (low, _) in bounds.items()}
    rows.append({**base, **highs, **{name: high for name, (_, high) in COUNT_BOUNDS.items()}})
    rows.append({**base, **lows, **{name: low for name, (low, _) in COUNT_BOUNDS.items()}})
    for name, levels in CATEGORY_LEVELS.items():
        for level in levels:
            rows += [{**base, name: spelling} for spelling in (level, level.upper(), f" {level.title()} ")]
    types = {**{name: "float64" for name in MEASURES}, **{name: "int64" for name in COUNT_BOUNDS}}
    return pd.DataFrame(rows, columns=list(FEATURES)).astype(types)


def slice_masks(rows: pl.DataFrame) -> dict[str, np.ndarray]:
    """Boolean masks of the slices an average can hide: each level of the contract's slice columns."""
    return {
        f"{name}={level}": (rows[name].cast(pl.String) == level).to_numpy()
        for name in SLICES
        for level in CATEGORY_LEVELS[name]
    }


def threshold_gate(
    name: str,
    predictions: np.ndarray | None,
    actual: np.ndarray,
    limits: dict[str, float],
    against: str,
    error: str | None,
) -> GateResult:
    """Gates 1 and 2: MLflow's evaluation checked against absolute RMSE/MAE limits."""
    figures: dict[str, Any] = {f"limit_{k}": v for k, v in limits.items()}
    if predictions is None:
        return GateResult(name, False, f"the model did not predict the test rows: {error}", figures)
    if not np.all(np.isfinite(predictions)):
        bad = int(np.sum(~np.isfinite(predictions)))
        return GateResult(
            name, False, f"{bad} of {len(predictions)} test predictions are not finite", {**figures, "non_finite": bad}
        )
    result = evaluate_predictions(predictions, actual)
    rmse, mae = result.metrics["root_mean_squared_error"], result.metrics["mean_absolute_error"]
    figures |= {"rmse": rmse, "mae": mae, "r2": result.metrics["r2_score"]}
    thresholds = {
        "root_mean_squared_error": MetricThreshold(threshold=limits["rmse"], greater_is_better=False),
        "mean_absolute_error": MetricThreshold(threshold=limits["mae"], greater_is_better=False),
    }
    numbers = (
        f"RMSE {rmse:,.0f} (limit {limits['rmse']:,.0f}), MAE {mae:,.0f} (limit {limits['mae']:,.0f}) vs {against}"
    )
    try:
        mlflow.validate_evaluation_results(validation_thresholds=thresholds, candidate_result=result)
    except mlflow.models.evaluation.validation.ModelValidationFailedException:
        return GateResult(name, False, f"worse than {against} beyond tolerance: {numbers}", figures)
    return GateResult(name, True, numbers, figures)


def signature_gate(model: Any) -> GateResult:
    expected = {c["name"]: c["type"] for c in MODEL_SIGNATURE.inputs.to_dict()}
    schema = model.metadata.get_input_schema() if model is not None else None
    if schema is None:
        return GateResult(
            "signature",
            False,
            "the version has no input signature" if model is not None else "the version does not load",
        )
    logged = {c.get("name"): c["type"] for c in schema.to_dict()}
    missing = sorted(set(expected) - set(logged))
    extra = sorted(str(n) for n in set(logged) - set(expected))
    mistyped = sorted(
        f"{n}: {logged[n]} (contract {expected[n]})" for n in set(expected) & set(logged) if logged[n] != expected[n]
    )
    figures = {"inputs": len(logged), "contract_inputs": len(expected)}
    if missing or extra or mistyped:
        parts = [
            f"missing {missing}" if missing else "",
            f"extra {extra}" if extra else "",
            f"types {mistyped}" if mistyped else "",
        ]
        return GateResult(
            "signature", False, "input schema differs from the contract: " + "; ".join(p for p in parts if p), figures
        )
    return GateResult("signature", True, f"{len(logged)} inputs equal the contract's names and types", figures)


def edge_gate(model: Any) -> GateResult:
    seed = load_seed_data()
    bounds = measure_bounds(seed)
    probe = edge_probe_rows(seed, bounds)
    try:
        predictions = predict(model, probe)
    except Exception as error:  # noqa: BLE001 - any failure on valid input blocks the version
        return GateResult(
            "edge_probe",
            False,
            f"failed on valid edge rows: {type(error).__name__}: {str(error)[:300]}",
            {"rows": len(probe)},
        )
    bad = ~np.isfinite(predictions) | (predictions <= 0)
    figures = {"rows": len(probe), "bad_predictions": int(bad.sum()), "bounds": bounds}
    if bad.any():
        examples = probe[bad].head(3).to_dict("records")
        return GateResult(
            "edge_probe",
            False,
            f"{int(bad.sum())} of {len(probe)} edge rows give non-finite or non-positive prices, e.g. {examples}",
            figures,
        )
    figures |= {"min_prediction": float(predictions.min()), "max_prediction": float(predictions.max())}
    return GateResult(
        "edge_probe",
        True,
        f"{len(probe)} edge rows, predictions {predictions.min():,.0f} … {predictions.max():,.3g}",
        figures,
    )


def slice_gate(
    candidate: np.ndarray | None,
    production: np.ndarray | None,
    rows: pl.DataFrame,
    settings: PromotionSettings,
    production_version: str | None,
) -> GateResult:
    if production_version is None:
        return GateResult("slices", True, "skipped: no Production version to compare slices with", skipped=True)
    if candidate is None or production is None:
        return GateResult("slices", False, "no predictions to compare on slices")
    actual = rows[TARGET].to_numpy()
    table: list[tuple[str, int, float | None, float | None, str]] = []
    worse: list[str] = []
    for name, mask in slice_masks(rows).items():
        n = int(mask.sum())
        if n < settings.slice_min_rows:
            table.append((name, n, None, None, "too few rows"))
            continue
        cand_mae = float(np.mean(np.abs(candidate[mask] - actual[mask])))
        prod_mae = float(np.mean(np.abs(production[mask] - actual[mask])))
        ok = bool(np.isfinite(cand_mae)) and cand_mae <= prod_mae * (1 + settings.slice_tolerance)
        table.append((name, n, cand_mae, prod_mae, "ok" if ok else "WORSE"))
        if not ok:
            worse.append(f"{name} (n={n}): MAE {cand_mae:,.0f} vs Production {prod_mae:,.0f}")
    figures = {
        "slices": len(table),
        "judged": sum(1 for t in table if t[2] is not None),
        "table": _slice_markdown(table, production_version),
    }
    if worse:
        return GateResult(
            "slices",
            False,
            f"worse than Production v{production_version} beyond {settings.slice_tolerance:.0%} on " + "; ".join(worse),
            figures,
        )
    return GateResult(
        "slices",
        True,
        f"{figures['judged']} slices within {settings.slice_tolerance:.0%} of Production v{production_version}",
        figures,
    )


def _slice_markdown(table: list[tuple], production_version: str) -> str:
    lines = [f"| slice | rows | candidate MAE | Production v{production_version} MAE | |", "|---|---|---|---|---|"]
    for name, n, cand, prod, mark in table:
        lines.append(
            f"| {name} | {n} | {'' if cand is None else f'{cand:,.0f}'} | {'' if prod is None else f'{prod:,.0f}'} | {mark} |"
        )
    return "\n".join(lines)


_RUN_QUEUE_STAT = Path("/proc/thread-self/schedstat")


def _waited_for_cpu_ms() -> float:
    """Milliseconds this thread has spent runnable but waiting for a CPU (Linux schedstat's
    second field): time a busy machine adds, not the model. 0 where the kernel does not say."""
    try:
        return int(_RUN_QUEUE_STAT.read_text().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


def latency_gate(model: Any, row: pd.DataFrame, settings: PromotionSettings) -> GateResult:
    """Nearest-rank p99 of single-row calls; stops early once p99 must exceed the budget.

    A call's time is its wall time less the time the thread waited for a CPU, so neighbours
    (a training run, a test suite) do not fail a fast model, while a model that computes, sleeps
    or waits on I/O is charged all of it. The wall-time p99 is reported beside."""
    allowed_slow = settings.latency_calls - math.ceil(0.99 * settings.latency_calls)
    timings: list[float] = []
    wall: list[float] = []
    try:
        predict(model, row)  # warm-up
        for _ in range(settings.latency_calls):
            waited, started = _waited_for_cpu_ms(), time.perf_counter()
            predict(model, row)
            wall.append((time.perf_counter() - started) * 1000)
            timings.append(wall[-1] - (_waited_for_cpu_ms() - waited))
            if sum(t > settings.latency_p99_ms for t in timings) > allowed_slow:
                break
    except Exception as error:  # noqa: BLE001
        return GateResult("latency", False, f"single-row prediction failed: {type(error).__name__}: {str(error)[:300]}")

    def p99(values: list[float]) -> float:
        if len(values) < settings.latency_calls:  # stopped early: a lower bound of the p99, already over
            return sorted(values, reverse=True)[allowed_slow]
        return sorted(values)[math.ceil(0.99 * len(values)) - 1]

    waited_ms = sum(wall) - sum(timings)
    figures = {
        "calls": len(timings),
        "p50_ms": float(np.median(timings)),
        "p99_ms": p99(timings),
        "budget_ms": settings.latency_p99_ms,
        "wall_p99_ms": p99(wall),
        "waited_for_cpu_ms": waited_ms,
    }
    summary = (
        f"p99 {figures['p99_ms']:.1f} ms (budget {settings.latency_p99_ms:.0f} ms) over {len(timings)} single-row calls"
        + (
            f", not counting {waited_ms:.0f} ms waiting for a CPU (wall p99 {figures['wall_p99_ms']:.1f} ms)"
            if waited_ms >= 1
            else ""
        )
    )
    return GateResult("latency", figures["p99_ms"] <= settings.latency_p99_ms, summary, figures)


def evaluate_predictions(predictions: np.ndarray, actual: np.ndarray) -> Any:
    """MLflow's regressor evaluation of fixed predictions (logged to the active run)."""
    frame = pd.DataFrame({"prediction": predictions, TARGET: actual})
    return mlflow.models.evaluate(data=frame, targets=TARGET, predictions="prediction", model_type="regressor")
