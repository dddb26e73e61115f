"""Benchmark: how much of a model's decay a retrain recovers after the world moves.

Why: a team runs the loop to get its accuracy back after drift. Before bridge's drift-aware
rounds, a retrain mixed a few hundred new rows with 20,000 old ones on equal terms and closed
4-8% of the gap after a 50% price rise. This script measures bridge's retrain against that
anchor and against an oracle, on the project's own simulator and trainer:

    python bench/recovery.py                 # everything below, 2 worker processes
    python bench/recovery.py --seeds 1 --sizes 300 --scenarios a   # a quick look

For each seed, 20,000 pre-shift rows land as 20 daily batches of 1,000 (days -20 … -1) and
Production ("no retrain", v1) is a plain round on them. Then the world moves (one scenario)
and N labelled post-shift rows land as one batch during day 0. Scenarios:

- (a) market level x1.5 (`price_factor`), a label shift;
- (b) concept drift: the effect of `area` x1.3 in the price model;
- (c) covariate shift only: houses 30% larger (`area_factor` 1.3), same price model;
- (d) no shift (the control).

Each is scored on 3,000 held-out post-shift rows (and, for the control, 3,000 held-out
pre-shift rows: the policy must not forget what still holds), with RMSE on the price scale:

- no retrain: Production v1;
- mixed: a plain round on all rows, today's behaviour before drift-aware rounds (the anchor);
- recalibrate: the first step of the automatic policy (v1 rescaled, no network trained);
- bridge: the full round the policy escalates to (`run_round` with every option, the retrain
  recency `MonitorSettings().retrain_half_life_hours`, the batch Production never saw as the
  recent rows, v1 as the incumbent) and the option it chose;
- oracle: a plain round on 20,000 post-shift rows.

Recovery = (no retrain - method) / (no retrain - oracle), per seed, then averaged (shown only
where no retrain is at least 2% worse than the oracle: there is a decay to recover). Goals:
recovery >= 90% in (a) with N = 300, >= 70% in (b) with N = 1,200; in (c) and (d) bridge never
more than 1% worse than mixed (mean RMSE over seeds). The recovery ratios are printed last, one
line each. Every round uses the `default` preset as shipped; torch runs one thread per worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from bridge_assets.core.contract import TARGET, validate
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.metrics import regression_metrics
from bridge_assets.core.presets import OPTIONS, preset
from bridge_assets.core.recency import Recency
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.ml.round import Candidate, Incumbent, RoundPolicy, run_round
from bridge_assets.monitoring.settings import MonitorSettings

SCENARIOS: dict[str, tuple[str, Drift]] = {
    "a": ("market level x1.5", Drift(price_factor=1.5)),
    "b": ("concept: area effect x1.3", Drift(concept={"area": 1.3})),
    "c": ("covariate: area x1.3", Drift(area_factor=1.3)),
    "d": ("no shift (control)", Drift()),
}
SIZES = (300, 1200, 5000)
PRE_ROWS, PRE_DAYS, TEST_ROWS, ORACLE_ROWS = 20_000, 20, 3_000, 20_000
SHIFT_AT = datetime(2025, 1, 1, tzinfo=UTC)
METHODS = ("no retrain", "mixed", "recalibrate", "bridge", "oracle")
GOALS = {("a", 300): 0.90, ("b", 1200): 0.70}
NO_DECAY = 0.02  # no retrain within 2% of the oracle: nothing to recover


@dataclass
class Cell:
    """One scenario, seed and N: RMSE per method on post-shift test rows."""

    scenario: str
    seed: int
    size: int
    rmse: dict[str, float]
    chosen: str
    pre_rmse: dict[str, float]  # the control's pre-shift test rows


def _rows(simulator: Simulator, n: int, seed: int, drift: Drift, batch_id: str, seen_at: datetime) -> pl.DataFrame:
    frame = pl.concat(list(simulator.generate(n, seed=seed, drift=drift, batch_id=batch_id)))
    return prepare_batch(validate(frame).valid, batch_id, seen_at=seen_at).rows


def _rmse(candidate: Candidate, rows: pl.DataFrame) -> float:
    predictions = candidate.predict_encoded(candidate.model.preprocessor.transform(rows))
    return regression_metrics(rows[TARGET].to_numpy(), predictions)["rmse"]


def run_scenario(scenario: str, seed: int, sizes: tuple[int, ...]) -> list[Cell]:
    """Every N of one scenario and seed (one worker's task)."""
    import torch

    torch.set_num_threads(1)
    simulator, drift = Simulator.fit(), SCENARIOS[scenario][1]
    config = preset("default")
    pre = pl.concat([
        _rows(simulator, PRE_ROWS // PRE_DAYS, seed * 100 + day, Drift(), f"pre-{day:02d}", SHIFT_AT - timedelta(days=PRE_DAYS - day))
        for day in range(PRE_DAYS)
    ])  # fmt: skip
    production = run_round(pre, [config]).best
    test = _rows(simulator, TEST_ROWS, 10_000 + seed, drift, "test", SHIFT_AT)
    pre_test = _rows(simulator, TEST_ROWS, 20_000 + seed, Drift(), "pre-test", SHIFT_AT)
    oracle = run_round(_rows(simulator, ORACLE_ROWS, 30_000 + seed, drift, "oracle", SHIFT_AT), [config]).best
    recency = Recency(half_life_hours=MonitorSettings().retrain_half_life_hours)
    incumbent = Incumbent("1", production.model)
    cells = []
    for size in sizes:
        post = _rows(simulator, size, 40_000 + seed * 10 + sizes.index(size), drift, "post", SHIFT_AT + timedelta(hours=12))
        rows = pl.concat([pre, post])
        mixed = run_round(rows, [config]).best
        round_ = run_round(rows, [config], policy=RoundPolicy(OPTIONS, recency, frozenset({"post"})), incumbent=incumbent)
        recalibrated = next((c for c in round_.candidates if c.option == "recalibrate"), None)
        models = {"no retrain": production, "mixed": mixed, "recalibrate": recalibrated, "bridge": round_.best, "oracle": oracle}
        rmse = {name: _rmse(model, test) if model else float("nan") for name, model in models.items()}
        pre_rmse = {name: _rmse(models[name], pre_test) for name in ("no retrain", "mixed", "bridge")} if scenario == "d" else {}
        cells.append(Cell(scenario, seed, size, rmse, round_.best.option, pre_rmse))
    return cells


def recovery(cell: Cell, method: str) -> float:
    gap = cell.rmse["no retrain"] - cell.rmse["oracle"]
    return (cell.rmse["no retrain"] - cell.rmse[method]) / gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sizes = tuple(args.sizes)
    started = time.monotonic()
    print(f"{len(args.scenarios)} scenarios x {len(sizes)} sizes x {args.seeds} seeds, {args.workers} workers, "
          f"retrain recency {Recency(MonitorSettings().retrain_half_life_hours).describe()}; load {os.getloadavg()[0]:.1f}", flush=True)
    cells: list[Cell] = []
    with ProcessPoolExecutor(args.workers) as pool:
        tasks = {pool.submit(run_scenario, s, seed, sizes): (s, seed) for seed in range(args.seeds) for s in args.scenarios}
        for done in as_completed(tasks):
            scenario, seed = tasks[done]
            cells += done.result()
            print(f"  done: scenario {scenario}, seed {seed} ({time.monotonic() - started:.0f} s)", flush=True)

    print("\nmean RMSE on 3,000 held-out post-shift rows (5 seeds unless told), and what bridge's round chose")
    print(f"{'scenario':<28}{'N':>6}" + "".join(f"{m:>14}" for m in METHODS) + "   bridge chose")
    for scenario in args.scenarios:
        for size in sizes:
            mine = [c for c in cells if c.scenario == scenario and c.size == size]
            means = {m: np.mean([c.rmse[m] for c in mine]) for m in METHODS}
            chosen = ", ".join(f"{o} {sum(c.chosen == o for c in mine)}" for o in OPTIONS if any(c.chosen == o for c in mine))
            print(f"{f'({scenario}) ' + SCENARIOS[scenario][0]:<28}{size:>6}" + "".join(f"{means[m]:>14,.0f}" for m in METHODS) + f"   {chosen}")
    if "d" in args.scenarios:
        print("\ncontrol (d): mean RMSE on 3,000 held-out pre-shift rows (what still holds)")
        for size in sizes:
            mine = [c for c in cells if c.scenario == "d" and c.size == size]
            print(f"  N={size:>5}: " + ", ".join(f"{m} {np.mean([c.pre_rmse[m] for c in mine]):,.0f}" for m in ("no retrain", "mixed", "bridge")))
    print(f"\ntotal {time.monotonic() - started:.0f} s; load {os.getloadavg()[0]:.1f}")

    print("\nrecovery = (no retrain - method) / (no retrain - oracle), mean over seeds [worst seed]; goals in brackets")
    failed = []
    for scenario in args.scenarios:
        for size in sizes:
            mine = [c for c in cells if c.scenario == scenario and c.size == size]
            ratios = {m: [recovery(c, m) for c in mine] for m in ("mixed", "recalibrate", "bridge")}
            gap = np.mean([c.rmse["no retrain"] / c.rmse["oracle"] - 1 for c in mine])
            if gap < NO_DECAY:  # a ratio of two near-zero differences says nothing
                line = f"({scenario}) N={size:<5} recovery n/a: no decay to recover (no retrain is {gap:+.1%} vs the oracle)"
            else:
                line = f"({scenario}) N={size:<5} bridge {np.mean(ratios['bridge']):6.0%} [{min(ratios['bridge']):.0%}]  " \
                       f"recalibrate {np.mean(ratios['recalibrate']):6.0%}  mixed {np.mean(ratios['mixed']):6.0%}"
            if scenario in ("c", "d"):
                worse = np.mean([c.rmse["bridge"] for c in mine]) / np.mean([c.rmse["mixed"] for c in mine]) - 1
                line += f"  bridge vs mixed {worse:+.1%} (goal <= +1.0%)"
                if worse > 0.01:
                    failed.append(line)
            elif (scenario, size) in GOALS:
                line += f"  (goal >= {GOALS[(scenario, size)]:.0%})"
                if np.mean(ratios["bridge"]) < GOALS[(scenario, size)]:
                    failed.append(line)
            print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
