"""Benchmark: raw landed rows → model-ready matrix, our Polars pipeline vs a pandas/scikit-learn reference.

Why: the feature path must stay cheap as the lake grows. The goal is that, at 2M rows, our
pipeline turns a landed batch into the model-ready matrix at no less than 10x the reference's
rows/s while using no more than half of its peak memory. The reference is what a typical
BridgeAI-style project does: pandas `read_parquet`, lower/strip the categories, drop the rows
that break the contract (the same rules as ours, as boolean masks), `drop_duplicates`, then a
scikit-learn `ColumnTransformer` (median imputer + StandardScaler on the numerics,
most-frequent imputer + OneHotEncoder on the categories).

    python bench/features.py --rows 2000000

The parent simulates N rows as real batches arrive (`Simulator`; by default 1% break the
contract and 5% have oddly-cased categories), lands them as one Parquet batch in a
temporary `LocalStore`, then runs each pipeline in its own process, one after the other, so that
each process's peak RSS is its own. Each worker times its work from reading the landed file to
the finished float64 matrix (writing the matrix out is not timed), and reports rows/s, its CPU
time (all threads; on a machine shared with other work, the ratio of CPU times is the steadier
figure) and peak RSS as JSON on stdout, with the time of each stage (read, validate,
de-duplicate, split hashing, fit, encode), printed under its line. Both sides use the same train
split (our hash `assign_split` on `row_id`). The parent then checks, in row chunks via memory-mapped `.npy` files, that both matrices have
the same rows in the same order and agree within 1e-6 after aligning the one-hot columns, and
exits non-zero if they do not. The last line printed is the throughput ratio (ours / reference).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package is normally installed editable; be safe anyway
    sys.path.insert(0, str(REPO_ROOT))

from bridge_assets.core.contract import (  # noqa: E402
    CONTRACT,
    CATEGORICAL_FEATURES,
    CATEGORY_LEVELS,
    COUNT_BOUNDS,
    FEATURES,
    NUMERIC_FEATURES,
    ROW_ID,
    TARGET,
)

TOLERANCE = 1e-6
COMPARE_CHUNK_ROWS = 250_000
BATCH_ID = "bench"
WORKERS: tuple[str, ...] = ("ours", "reference")


# --------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# --------------------------------------------------------------------------------------------


def _peak_rss_kib() -> int:
    """Peak resident set size of this process so far (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _current_rss_kib() -> int | None:
    """Current resident set size (KiB), from /proc; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Stages:
    """Wall seconds per stage of a pipeline, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


def run_ours(path: Path, stages: Stages) -> tuple[np.ndarray, list[str], Any, int]:
    """Our pipeline: validate, de-duplicate, split on row_id, fit on train, encode all rows.

    Returns the matrix, its column names, the kept row ids (for the order check) and the
    number of rows read; `stages` gets each stage's time.
    """
    import polars as pl

    from bridge_assets.core.contract import validate
    from bridge_assets.core.features import Preprocessor, add_split_columns, drop_exact_duplicates

    frame = pl.read_parquet(path)
    rows_read = frame.height
    stages.done("read")
    valid = validate(frame).valid
    del frame
    stages.done("validate")
    kept, _ = drop_exact_duplicates(valid)
    del valid
    kept = kept.filter(pl.col(TARGET).is_not_null())
    stages.done("de-duplicate")
    rows = add_split_columns(kept)  # assign_split on row_id
    del kept
    stages.done("split hashing")
    preprocessor = Preprocessor.fit(rows.lazy().filter(pl.col("split") == "train"))
    stages.done("fit")
    matrix = preprocessor.transform(rows)
    stages.done("encode")
    return matrix, preprocessor.feature_names, rows[ROW_ID], rows_read


def run_reference(path: Path, stages: Stages) -> tuple[np.ndarray, list[str], Any, int]:
    """The reference: pandas cleaning and a scikit-learn ColumnTransformer fitted on train rows."""
    import pandas as pd
    import polars as pl
    from scipy import sparse
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from bridge_assets.core.features import assign_split

    frame = pd.read_parquet(path)
    rows_read = len(frame)
    stages.done("read")
    for column in CATEGORICAL_FEATURES:
        frame[column] = frame[column].str.strip().str.lower()
    valid = frame["area"].gt(0) & frame["area"].le(CONTRACT.upper_bound("area")) & frame[TARGET].gt(0)  # NaN compares False
    for column, (low, high) in COUNT_BOUNDS.items():
        valid &= frame[column].between(low, high) & (frame[column] % 1 == 0)
    for column, levels in CATEGORY_LEVELS.items():
        valid &= frame[column].isin(levels)
    frame = frame[valid]
    stages.done("validate")
    frame = frame.drop_duplicates(subset=[*FEATURES, TARGET])  # the 13 contract columns, not row_id
    stages.done("de-duplicate")
    # Same split as ours: our hash of row_id (assign_split takes a Polars Series).
    train = (assign_split(pl.from_pandas(frame[ROW_ID])) == "train").to_numpy()
    stages.done("split hashing")
    transformer = ColumnTransformer(
        [
            (
                "num",
                Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]),
                list(NUMERIC_FEATURES),
            ),
            (
                "cat",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="most_frequent")),
                        ("onehot", OneHotEncoder(handle_unknown="ignore")),
                    ]
                ),
                list(CATEGORICAL_FEATURES),
            ),
        ]
    )
    transformer.fit(frame[train])
    stages.done("fit")
    matrix = transformer.transform(frame)
    if sparse.issparse(matrix):  # dense at this density (sparse_threshold 0.3), but be sure
        matrix = matrix.toarray()
    stages.done("encode")
    names = [_reference_name(str(name)) for name in transformer.get_feature_names_out()]
    return np.asarray(matrix, dtype=np.float64), names, frame[ROW_ID], rows_read


def _reference_name(name: str) -> str:
    """`num__area` → `area`, `cat__mainroad_yes` → `mainroad_yes` (our naming)."""
    return name.split("__", 1)[1] if "__" in name else name


def _row_id_hashes(row_ids: Any) -> np.ndarray:
    """Stable 64-bit hashes of the kept row ids in matrix order, for the parent's order check."""
    import polars as pl

    from bridge_assets.core.features import stable_hash64

    series = row_ids if isinstance(row_ids, pl.Series) else pl.from_pandas(row_ids)
    return stable_hash64(series)


def _import_libraries(kind: str) -> None:
    """Import what a pipeline uses before the clock starts: interpreter start-up is not its work."""
    import polars  # noqa: F401

    import bridge_assets.core.features  # noqa: F401

    if kind == "reference":
        import pandas  # noqa: F401
        import sklearn.compose  # noqa: F401
        import sklearn.impute  # noqa: F401
        import sklearn.pipeline  # noqa: F401
        import sklearn.preprocessing  # noqa: F401


def worker(kind: str, input_path: Path, out: Path, row_ids_out: Path | None) -> dict[str, Any]:
    """Run one pipeline, time it, write its matrix (untimed) and return the figures."""
    _import_libraries(kind)
    start_rss = _current_rss_kib()
    run = run_ours if kind == "ours" else run_reference
    stages = Stages()
    started, cpu_started = time.perf_counter(), time.process_time()
    matrix, names, row_ids, rows_read = run(input_path, stages)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = _peak_rss_kib()  # taken before the untimed writing below
    np.save(out, np.ascontiguousarray(matrix))
    if row_ids_out is not None:
        np.save(row_ids_out, _row_id_hashes(row_ids))
    return {
        "worker": kind,
        "rows_read": rows_read,
        "rows_out": int(matrix.shape[0]),
        "columns": names,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rows_per_s": rows_read / seconds if seconds > 0 else float("inf"),
        "stages": stages.seconds,
        "peak_rss_kib": peak,
        "start_rss_kib": start_rss,
        "matrix": str(out),
        "row_ids": str(row_ids_out) if row_ids_out else None,
    }


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------


def land(rows: int, seed: int, root: Path, corrupt: float, case_noise: float) -> tuple[Path, float]:
    """Simulate `rows` rows and land them as one Parquet batch; returns path and seconds."""
    from bridge_assets.core.simulator import Simulator
    from bridge_assets.lake.landing import land_batch
    from bridge_assets.lake.storage import LocalStore

    started = time.perf_counter()
    store = LocalStore(root / "lake")
    blocks = Simulator.fit().generate(
        rows, seed=seed, batch_id=BATCH_ID, corrupt_fraction=corrupt, case_noise=case_noise
    )
    batch, landed = land_batch(store, BATCH_ID, blocks, fmt="parquet")
    if landed != rows:
        raise RuntimeError(f"landed {landed} rows, expected {rows}")
    return Path(store.uri(batch.key)), time.perf_counter() - started


def spawn(kind: str, input_path: Path, workdir: Path) -> dict[str, Any]:
    """Run a worker in a fresh interpreter and parse the JSON it prints last."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker", kind,
        "--input", str(input_path),
        "--out", str(workdir / f"{kind}.npy"),
        "--row-ids-out", str(workdir / f"{kind}-row-ids.npy"),
    ]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker failed (exit {done.returncode}); see its stderr above")
    return json.loads(lines[-1])


def compare(ours: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Problems found comparing the two matrices (empty: they agree); prints a summary line."""
    problems: list[str] = []
    ours_ids = np.load(ours["row_ids"], mmap_mode="r")
    reference_ids = np.load(reference["row_ids"], mmap_mode="r")
    if ours_ids.shape != reference_ids.shape:
        problems.append(f"row count differs: ours {ours_ids.shape[0]:,}, reference {reference_ids.shape[0]:,}")
    else:
        for start in range(0, ours_ids.shape[0], COMPARE_CHUNK_ROWS * 8):
            stop = start + COMPARE_CHUNK_ROWS * 8
            mismatch = np.nonzero(ours_ids[start:stop] != reference_ids[start:stop])[0]
            if mismatch.size:
                problems.append(f"row order differs, first at row {start + int(mismatch[0]):,}")
                break

    ours_names: list[str] = ours["columns"]
    reference_names: list[str] = reference["columns"]
    missing = [n for n in ours_names if n not in reference_names]
    extra = [n for n in reference_names if n not in ours_names]
    if missing or extra:
        problems.append(f"columns differ: missing in reference {missing}, only in reference {extra}")
    if problems:
        return problems

    order = np.array([reference_names.index(n) for n in ours_names])
    a = np.load(ours["matrix"], mmap_mode="r")
    b = np.load(reference["matrix"], mmap_mode="r")
    if a.shape != b.shape:
        return [f"matrix shapes differ: ours {a.shape}, reference {b.shape}"]
    max_diff = 0.0
    bad = 0
    bad_columns: set[str] = set()
    for start in range(0, a.shape[0], COMPARE_CHUNK_ROWS):
        ours_chunk = np.asarray(a[start : start + COMPARE_CHUNK_ROWS])
        reference_chunk = np.asarray(b[start : start + COMPARE_CHUNK_ROWS])[:, order]
        diff = np.abs(ours_chunk - reference_chunk)
        diff[np.isnan(ours_chunk) & np.isnan(reference_chunk)] = 0.0  # NaN in both: agree
        diff[np.isnan(diff)] = np.inf  # NaN on one side only: disagree
        off = diff > TOLERANCE
        if off.any():
            bad += int(off.sum())
            bad_columns.update(ours_names[j] for j in np.nonzero(off.any(axis=0))[0])
        if diff.size:
            max_diff = max(max_diff, float(diff.max()))
    if bad:
        problems.append(
            f"{bad:,} values differ by more than {TOLERANCE:g} (max |diff| {max_diff:.3g}) "
            f"in columns {sorted(bad_columns)}"
        )
    else:
        print(
            f"matrices agree: {a.shape[0]:,} rows x {a.shape[1]} columns in the same row order, "
            f"max |diff| {max_diff:.2g} (tolerance {TOLERANCE:g})"
        )
    return problems


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def parent(rows: int, seed: int, tmp_root: str | None, corrupt: float, case_noise: float) -> int:
    with tempfile.TemporaryDirectory(prefix="bridge-bench-", dir=tmp_root) as tmp:
        workdir = Path(tmp)
        path, landing_seconds = land(rows, seed, workdir, corrupt, case_noise)
        print(
            f"landed {rows:,} simulated rows (seed {seed}; {corrupt:.0%} breaking the contract, "
            f"{case_noise:.0%} oddly cased) as Parquet "
            f"({path.stat().st_size / 2**20:,.1f} MiB) in {landing_seconds:.1f} s"
        )
        results = {kind: spawn(kind, path, workdir) for kind in WORKERS}
        for kind in WORKERS:
            r = results[kind]
            start = f", {_mib(r['start_rss_kib'])} before reading" if r.get("start_rss_kib") else ""
            print(
                f"{kind:<9}  {r['rows_read']:,} rows -> {r['rows_out']:,} x {len(r['columns'])} in "
                f"{r['seconds']:.2f} s (CPU {r['cpu_seconds']:.2f} s): {r['rows_per_s']:,.0f} rows/s, peak RSS {_mib(r['peak_rss_kib'])}{start}"
            )
            print(f"{'':<9}  stages: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in r["stages"].items()))
        problems = compare(results["ours"], results["reference"])
        for problem in problems:
            print(f"MISMATCH: {problem}")
        ours, reference = results["ours"], results["reference"]
        print(f"memory ratio (ours / reference peak RSS): {ours['peak_rss_kib'] / reference['peak_rss_kib']:.2f}x")
        print(f"CPU time ratio (reference / ours): {reference['cpu_seconds'] / ours['cpu_seconds']:.1f}x (less disturbed by other work on the machine)")
        print(f"throughput ratio (ours / reference): {ours['rows_per_s'] / reference['rows_per_s']:.1f}x")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows to simulate and land (default 2,000,000)")
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    parser.add_argument("--tmpdir", default=None, help="where to create the temporary lake (default: system temp)")
    parser.add_argument("--corrupt-fraction", type=float, default=0.01, help="rows breaking the contract (default 0.01)")
    parser.add_argument("--case-noise", type=float, default=0.05, help="rows with oddly-cased categories (default 0.05)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-ids-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.input is None or args.out is None:
            parser.error("--worker needs --input and --out")
        print(json.dumps(worker(args.worker, args.input, args.out, args.row_ids_out)))
        return 0
    if args.rows <= 0:
        parser.error("--rows must be positive")
    return parent(args.rows, args.seed, args.tmpdir, args.corrupt_fraction, args.case_noise)


if __name__ == "__main__":
    sys.exit(main())
