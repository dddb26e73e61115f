"""Rows per CPU-second of the feature pipeline and of profiling, for the sizing table in
docs/production.md.

Why CPU time, not wall time: the build machine is shared (other jobs run beside this), so wall
clock measures the neighbours; one thread's CPU seconds (`POLARS_MAX_THREADS=1`, set before
Polars loads) is what a core spends, and what a cluster must provide. The feature pipeline is
the same calls as `bench/features.py`'s "ours" (validate, de-duplicate, split, fit, encode);
profiling is `profile_frame` on the 12 features plus a prediction, as `bench/drift.py`.

    python bench/sizing.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["POLARS_MAX_THREADS"] = "1"  # one core, before Polars is imported
os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from bridge_assets.core.contract import FEATURES, TARGET, validate  # noqa: E402
from bridge_assets.core.features import Preprocessor, add_split_columns, drop_exact_duplicates  # noqa: E402
from bridge_assets.core.simulator import Simulator  # noqa: E402
from bridge_assets.monitoring.profiles import PREDICTION  # noqa: E402
from bridge_assets.monitoring.whylogs_compat import profile_frame  # noqa: E402


def cpu_seconds(work) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def features(frame: pl.DataFrame) -> None:
    kept, _ = drop_exact_duplicates(validate(frame).valid)
    rows = add_split_columns(kept.filter(pl.col(TARGET).is_not_null()))
    Preprocessor.fit(rows.lazy().filter(pl.col("split") == "train")).transform(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (the least disturbed by neighbours)")
    args = parser.parse_args()
    frame = pl.concat(list(Simulator.fit().generate(args.rows, seed=0, batch_id="sizing", case_noise=0.05)))
    scored = frame.select(FEATURES).with_columns(pl.Series(PREDICTION, np.asarray(frame[TARGET], dtype=float)))
    for name, work in (("features", lambda: features(frame)), ("profiling", lambda: profile_frame(scored))):
        best = min(cpu_seconds(work) for _ in range(args.repeats))
        print(f"{name:<10} {args.rows:,} rows in {best:.2f} CPU-s (one thread): {args.rows / best:,.0f} rows per CPU-second")


if __name__ == "__main__":
    main()
