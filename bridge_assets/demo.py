"""`make demo`: the main job, run through Dagster on the same DAGSTER_HOME as `make dev`.

Lands the real data and a simulated batch (with some corrupt rows and oddly-cased
categories), registers both as raw partitions, materializes them, the feature table and a
training round (a candidate model in MLflow) with `dagster asset materialize`, promotes the
candidate (`promote_model` job), deploys it into Ray Serve (`production_deployment`), sends a
few requests, and stops Serve and Ray again, printing what was produced, read back from
storage and MLflow. Running it again lands nothing new; it trains a new round each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import dagster as dg
import polars as pl

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import HousingSimulator
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings, load_environment
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.tracking import CANDIDATE_ALIAS, MlflowSettings
from serving.deploy import ServingSettings, stop_serving
from serving.interactions import read_interactions

DEMO_BATCH = "demo-sim-s7"
DEMO_ROWS = 20_000


def _dagster(*args: str) -> None:
    """Run a `dagster` command against this code location and DAGSTER_HOME."""
    print(f"$ dagster {' '.join(args)}")
    command = [sys.executable, "-m", "dagster", *args[:2], "-m", "bridge_assets.definitions", *args[2:]]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"`dagster {' '.join(args)}` failed")


def _materialize(select: str, partition: str | None = None) -> None:
    _dagster("asset", "materialize", "--select", select, *(["--partition", partition] if partition else []))


def _print_candidate() -> str:
    """The registered candidate and its metrics next to the baselines', read back from MLflow."""
    settings = MlflowSettings.from_env()
    client = settings.activate()
    version = client.get_model_version_by_alias(settings.model_name, CANDIDATE_ALIAS)
    run = client.get_run(version.tags["bridge.run_id"])
    metrics = run.data.metrics
    print(f"\ncandidate model: models:/{settings.model_name}/{version.version} (alias {CANDIDATE_ALIAS}, "
          f"config {run.info.run_name}, feature version {version.tags['bridge.feature_version']})")
    print(f"  MLflow store: {settings.tracking_uri}")
    print(f"  {'':<22}{'val RMSE':>12}{'val R²':>9}{'test RMSE':>12}{'test R²':>9}")
    for label, prefix in ((run.info.run_name, ""), ("baseline: linear", "linear_"), ("baseline: log-linear", "log_linear_")):
        print(
            f"  {label:<22}{metrics[prefix + 'val_rmse']:>12,.0f}{metrics[prefix + 'val_r2']:>9.4f}"
            f"{metrics[prefix + 'test_rmse']:>12,.0f}{metrics[prefix + 'test_r2']:>9.4f}"
        )
    return str(version.version)


def _serve(store: ObjectStore, version: str) -> None:
    """Gate the candidate into Staging, promote it, deploy it into Ray Serve, send requests,
    stop what was started."""
    print()
    _materialize("staged_model")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="promote-") as config:
        promotion = {"version": version, "override_reason": "make demo: no A/B experiment in the demo yet", "actor": "make demo"}
        json.dump({"ops": {"set_production_alias": {"config": promotion}}}, config)  # JSON is YAML
        config.flush()
        _dagster("job", "execute", "-j", "promote_model", "-c", config.name)
    _materialize("production_deployment")
    url = ServingSettings.from_env().url
    requests = HousingSimulator.fit().generate(5, seed=99, batch_id="demo-traffic")
    traffic = next(iter(requests))
    sent = [*traffic["row_id"], "demo-bad"]
    try:
        print(f"\nPOST {url}/predict (simulated houses; X-Request-ID = row_id):")
        for row in traffic.iter_rows(named=True):
            body = {name: row[name] for name in FEATURES}
            reply = _post(f"{url}/predict", body, row["row_id"])
            print(f"  {row['row_id']}: predicted {reply['response']['prediction']:>12,.0f}   actual {row['price']:>12,.0f}")
        bad = _post(f"{url}/predict", {**{name: traffic.row(0, named=True)[name] for name in FEATURES}, "bedrooms": 10}, "demo-bad")
        print(f"  an invalid request (bedrooms 10) → {bad['status']}: {bad['message']}")
    finally:
        stop_serving()
    logged = read_interactions(store).filter(pl.col("request_id").is_in(sent))
    print(f"stopped Serve and the local Ray; {logged.height} interaction records in {store.uri('interactions/')}")


def _post(url: str, body: dict, request_id: str) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "X-Request-ID": request_id}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def main() -> None:
    load_environment()
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
    _materialize("candidate_model")

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
    version = _print_candidate()
    _serve(store, version)
    print("\nopen the UI with `make dev` (http://127.0.0.1:3000) to see these runs and their metadata")


if __name__ == "__main__":
    main()
