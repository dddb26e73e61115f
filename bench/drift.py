"""Benchmark: how well monitoring detects drift, how rarely it cries wolf, how well it
estimates error without labels, and how fast it profiles.

Why: a monitor that misses a 0.2-SD shift, or alarms on every other unchanged window, or
cannot profile an hour of traffic in seconds, is not a monitor. Goals (issue 9):
- detection rate of a 0.2-SD latent shift of `area` at 5k rows per window: >= 95%;
  and of a one-level shift of `bedrooms` (every house's bedroom count one level up);
- false alarms per same-distribution window, any alarm on any of the 13 columns (12
  features + the prediction): <= 5% at 1k, 10k, 100k and 1M rows;
- the label-free RMSE estimate (direct loss estimation) against realised RMSE on 5k-row
  windows under covariate shift: within 15%;
- profiling throughput of all 13 columns against stock `why.log(pandas_df)` on the same
  1M-row frame: >= 5x (printed last).

    python bench/drift.py            # ~5-8 minutes on 2 cores

Setup: a model trained by the core (`run_round`, default preset) on the real data plus
`--train-rows` simulated rows; its reference is built exactly as for a registered version
(`build_reference`: training-split features, held-out predictions, loss estimator on the
held-out rows). Each window is simulated by `Simulator` with its own seed, scored by
the model, profiled by `profile_frame` and judged by `profile_drift` with the default
thresholds (`DriftSettings()`: KS 0.05, PSI 0.2 per column, noise floor 1.9·sqrt(1/n+1/m)).

Windows of 1k, 5k and 10k rows are independent simulations. Windows of 100k and 1M rows
are merges of whylogs profiles of independent 10k-row blocks (profiles merge exactly as a
window's object profiles do), drawn without replacement from a pool of `--pool-blocks`
blocks: every window holds distinct rows, but large windows share blocks with each other,
so their alarm rates are less independent than the count of windows suggests.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import polars as pl

from bridge_assets.core.contract import FEATURES, TARGET, validate
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.presets import preset
from bridge_assets.core.simulator import SEED_BATCH_ID, SEED_ROWS, Drift, Simulator, load_seed_data
from bridge_assets.ml.round import run_round
from bridge_assets.monitoring.drift import DriftSettings, profile_drift
from bridge_assets.monitoring.profiles import MONITORED_COLUMNS, PREDICTION
from bridge_assets.monitoring.reference import build_reference
from bridge_assets.monitoring.whylogs_compat import merge_views, profile_frame, why


def bedrooms_one_level_up(simulator: Simulator) -> Drift:
    """Every house's bedroom count moved one level up (the top level keeps its own)."""
    levels = [str(v) for v in simulator.levels["bedrooms"]]
    shares = simulator.probabilities["bedrooms"]
    shifted = {level: 0.0 for level in levels}
    for index, share in enumerate(shares):
        shifted[levels[min(index + 1, len(levels) - 1)]] += float(share)
    return Drift(category_weights={"bedrooms": shifted})


# KLL's normalised rank error at whylogs' default size is about 1.3%: two sketches of the same
# data may place a quantile up to about twice that apart.
RANK_TOLERANCE = 0.03


def timed_rounds(work: Callable[[], object], rounds: int) -> tuple[float, object]:
    """The median seconds of `rounds` runs of `work`, and its last result."""
    seconds, result = [], None
    for _ in range(rounds):
        tick = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - tick)
    return float(np.median(seconds)), result


def profile_disagreements(stock, ours, columns: list[str]) -> list[str]:
    """Where two profiles of the same frame differ beyond the sketches' error: counts, frequent
    items, and both sketches' ranks at our deciles."""
    problems = []
    for column in columns:
        a, b = stock.get_column(column), ours.get_column(column)
        if a.get_metric("counts").n.value != b.get_metric("counts").n.value:
            problems.append(f"{column}: counts differ")
        items = [c.get_metric("frequent_items") for c in (a, b)]
        if all(items) and items[0].to_summary_dict() != items[1].to_summary_dict():
            problems.append(f"{column}: frequent items differ")
        kll_a, kll_b = (c.get_metric("distribution").kll.value for c in (a, b))
        if kll_a.get_n() != kll_b.get_n():
            problems.append(f"{column}: {kll_a.get_n()} vs {kll_b.get_n()} values in the distribution")
        elif kll_a.get_n():  # both sketches' ranks at our deciles (also right for counts' point masses)
            points = kll_b.get_quantiles(list(np.linspace(0.1, 0.9, 9)))
            gap = max(abs(kll_a.get_rank(x) - kll_b.get_rank(x)) for x in points)
            if gap > RANK_TOLERANCE:
                problems.append(f"{column}: ranks at the deciles differ by up to {gap:.3f}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=200, help="simulated windows per size")
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--pool-blocks", type=int, default=300, help="10k-row blocks for the 100k/1M windows")
    parser.add_argument("--throughput-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="timed profiling rounds per side (median)")
    args = parser.parse_args()
    started = time.perf_counter()
    simulator = Simulator.fit()

    def frame(rows: int, seed: int, drift: Drift | None = None) -> pl.DataFrame:
        blocks = simulator.generate(rows, seed=seed, batch_id=f"b{seed}", drift=drift)
        return validate(pl.concat(list(blocks))).valid

    seed_rows = prepare_batch(validate(load_seed_data()).valid, SEED_BATCH_ID, reference_rows=SEED_ROWS).rows
    rows = pl.concat([seed_rows, prepare_batch(frame(args.train_rows, 1), "sim-train").rows])
    model = run_round(rows, [preset("default", max_epochs=60)]).best.model
    reference = build_reference(rows, model.predict, model_name="bench", version="1", feature_version="bench")
    print(f"model: trained on {reference.train_rows} rows; held-out test RMSE {reference.metrics['rmse']:,.0f} on {reference.heldout_rows} rows")
    settings = DriftSettings()
    columns = list(MONITORED_COLUMNS)

    def profile(data: pl.DataFrame):
        return profile_frame(data.select(FEATURES).with_columns(pl.Series(PREDICTION, model.predict(data))))

    ratios: list[float] = []  # per window: the largest effect / bar (KS or PSI) over the columns

    def alarmed(view) -> list[str]:
        drifts = profile_drift(reference.profile, view, columns, settings)
        ratios.append(max(max(d.ks / d.ks_bar, d.psi / d.psi_bar) for d in drifts))
        return [d.column for d in drifts if d.drifted]

    def margin() -> str:
        """How close same-distribution windows came to an alarm (1.0 = at the bar)."""
        worst = np.asarray(ratios)
        ratios.clear()
        return f"largest effect/bar: median {np.median(worst):.2f}, 95th pct {np.quantile(worst, 0.95):.2f}"

    def rate(hits: int, total: int) -> str:
        return f"{hits / total:6.1%} ({hits}/{total})"

    seed = 1000
    for label, drift, column in (
        ("area +0.2 SD (latent shift)", Drift(shift={"area": 0.2}), "area"),
        ("bedrooms one level up", bedrooms_one_level_up(simulator), "bedrooms"),
    ):
        hits = 0
        for _ in range(args.windows):
            seed += 1
            hits += column in alarmed(profile(frame(5_000, seed, drift)))
        print(f"detection  {label:32s} 5k rows/window: {rate(hits, args.windows)}")
        ratios.clear()

    for size in (1_000, 10_000):
        alarms = 0
        for _ in range(args.windows):
            seed += 1
            alarms += bool(alarmed(profile(frame(size, seed))))
        print(f"false alarms  {size:>9,} rows/window: {rate(alarms, args.windows)}; {margin()}")
    block_rows = 10_000
    pool = []
    for _ in range(args.pool_blocks):
        seed += 1
        pool.append(profile(frame(block_rows, seed)))
    rng = np.random.default_rng(7)
    for size in (100_000, 1_000_000):
        per_window = size // block_rows
        alarms = 0
        for _ in range(args.windows):
            chosen = rng.choice(len(pool), size=per_window, replace=False)
            alarms += bool(alarmed(merge_views([pool[i] for i in chosen])))
        print(f"false alarms  {size:>9,} rows/window: {rate(alarms, args.windows)}; {margin()} (merged from {per_window} of {len(pool)} 10k-row blocks)")

    errors = []
    for index in range(min(args.windows, 100)):
        seed += 1
        drift = Drift(shift={"area": 0.5 + 0.5 * (index % 3), "bathrooms": 0.5 * (index % 2)})
        data = frame(5_000, seed, drift)
        predictions = model.predict(data)
        realised = float(np.sqrt(np.mean((predictions - data[TARGET].to_numpy()) ** 2)))
        errors.append(reference.estimator.estimate_rmse(data, predictions) / realised - 1)
    errors_array = np.abs(np.asarray(errors))
    print(
        f"label-free RMSE vs realised, 5k rows, covariate shift ({len(errors)} windows): "
        f"mean |error| {errors_array.mean():.1%}, 95th pct {np.quantile(errors_array, 0.95):.1%}, max {errors_array.max():.1%}, "
        f"within 15%: {rate(int((errors_array <= 0.15).sum()), len(errors))}"
    )

    big = pl.concat(list(simulator.generate(args.throughput_rows, seed=99, batch_id="tp")))
    big = big.select(FEATURES).with_columns(pl.Series(PREDICTION, model.predict(validate(big).valid)))
    pandas_frame = big.to_pandas()  # stock is timed without this conversion; ours includes its own
    why.log(pandas=pandas_frame.head(1_000))  # both warm (imports, first-call caches) before timing
    profile_frame(big.head(1_000))
    stock_seconds, stock_view = timed_rounds(lambda: why.log(pandas=pandas_frame).view(), args.rounds)
    fast_seconds, fast_view = timed_rounds(lambda: profile_frame(big), args.rounds)
    agreement = profile_disagreements(stock_view, fast_view, columns)
    print(f"profiles of the {big.height:,}-row frame: " + ("; ".join(agreement) if agreement else
          f"agree on all {len(columns)} columns (counts and frequent items equal, numeric quantile ranks within {RANK_TOLERANCE})"))
    print(f"profiling {big.height:,} rows x {len(columns)} columns, median of {args.rounds} rounds: "
          f"stock why.log(pandas) {big.height / stock_seconds:,.0f} rows/s, bridge {big.height / fast_seconds:,.0f} rows/s")
    print(f"(total {time.perf_counter() - started:.0f}s)")
    print(f"profiling speed-up vs stock whylogs: {stock_seconds / fast_seconds:.1f}x")


if __name__ == "__main__":
    main()
