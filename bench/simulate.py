"""Benchmark: generate and land N simulated rows (goal: 10M rows in under 60 s on 2 cores).

    python bench/simulate.py --rows 10000000 [--format parquet|csv]

Lands into a temporary local store through the same `land_batch` the CLI and the
`simulated_batch` asset use, and prints rows/s and the object's size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bridge_assets.core.simulator import Simulator
from bridge_assets.lake.landing import land_batch
from bridge_assets.lake.storage import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as root:
        store = LocalStore(root)
        started = time.perf_counter()
        simulator = Simulator.fit()
        batch, rows = land_batch(store, "bench", simulator.generate(args.rows, seed=args.seed), fmt=args.format)
        elapsed = time.perf_counter() - started
        size = Path(store.uri(batch.key)).stat().st_size
        print(f"fit + generate + land {rows:,} rows as {args.format}: {elapsed:.1f} s, {rows / elapsed:,.0f} rows/s, {size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
