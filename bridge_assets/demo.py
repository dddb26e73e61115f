"""`make demo`: the main job, run through Dagster on the same DAGSTER_HOME as `make dev`.

Lands the real data and a simulated batch (with some corrupt rows and oddly-cased
categories), registers both as raw partitions, materializes them and the feature table with
`dagster asset materialize`, and prints what was produced, read back from storage. Running it
again lands nothing new and materializes only what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg

from bridge_assets.core.simulator import HousingSimulator
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings

DEMO_BATCH = "demo-sim-s7"
DEMO_ROWS = 20_000


def _materialize(select: str, partition: str | None = None) -> None:
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "bridge_assets.definitions"]
    command += ["--select", select] + (["--partition", partition] if partition else [])
    print(f"$ dagster asset materialize --select {select}" + (f" --partition {partition}" if partition else ""))
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"materializing {select} failed")


def main() -> None:
    store = StorageSettings.from_env().open()
    print(f"storage: {store!r}   DAGSTER_HOME: {os.environ.get('DAGSTER_HOME')}")
    if land_seed(store):
        print("landed the real housing data (545 rows)")
    if DEMO_BATCH not in {b.batch_id for b in landed_batches(store)}:
        blocks = HousingSimulator.fit().generate(
            DEMO_ROWS, seed=7, batch_id=DEMO_BATCH, corrupt_fraction=0.02, case_noise=0.05
        )
        land_batch(store, DEMO_BATCH, blocks)
        print(f"landed simulated batch {DEMO_BATCH} ({DEMO_ROWS} rows, 2% corrupt)")

    # What the landing sensor does under `dagster dev`, done here so the demo needs no daemon.
    instance = dg.DagsterInstance.get()
    batch_ids = [b.batch_id for b in landed_batches(store)]
    known = set(instance.get_dynamic_partitions("raw_batches"))
    instance.add_dynamic_partitions("raw_batches", [b for b in batch_ids if b not in known])
    done = instance.get_materialized_partitions(dg.AssetKey("raw_housing"))
    for batch_id in batch_ids:
        if batch_id not in done:
            _materialize("raw_housing", batch_id)
    _materialize("housing_features")

    features = FeatureStore(store)
    latest = features.latest()
    assert latest is not None
    print("\nfeature table 'housing'")
    print(f"  versions: {', '.join(features.versions())}   latest: {latest.version}")
    print(f"  rows: {latest.rows}   per split: {latest.rows_per_split}")
    print(f"  manifest: {store.uri(f'{features.prefix}versions/{latest.version}.json')}")
    for part in latest.parts:
        print(f"  part {part.batch_id}: {part.rows} rows  {store.uri(part.key)}")
    for batch_id in batch_ids:
        if store.exists(quarantine_key(batch_id)):
            quarantined = store.scan_parquet([quarantine_key(batch_id)]).collect()
            print(f"  quarantined from {batch_id}: {quarantined.height} rows  {store.uri(quarantine_key(batch_id))}")
    reference = features.connect(latest.version).sql(
        "SELECT reference_split, count(*) AS rows FROM features "
        "WHERE reference_split IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"
    )
    print(f"  reference split of the real data (DuckDB): {dict(reference.fetchall())}")
    print("\nopen the UI with `make dev` (http://127.0.0.1:3000) to see these runs and their metadata")


if __name__ == "__main__":
    main()
