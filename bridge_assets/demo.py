"""`make demo`: the main job, run through Dagster on the same DAGSTER_HOME as `make dev`.

Lands the real data and a simulated batch (with some corrupt rows and oddly-cased
categories), registers both as raw partitions, materializes them, the feature table and a
training round (a candidate model in MLflow) with `dagster asset materialize`, and puts the
candidate through the compliance gates (`staged_model`) into Staging. The first time there is
no Production to compare with, so it becomes Production (`promote_model`), and a deliberately
worse candidate (the reference network after one epoch) is shown stopped at a gate with its
numbers. On later runs the new candidate runs an online A/B experiment against Production:
both are deployed behind the router, simulated clients send houses (`bridge traffic`), their
prices are released as delayed feedback, `ab_report` gives a verdict, the monitoring assets
report the experiment's window (Production, trained before prices rose, shows realised decay),
and `promote_model` promotes only on a promote verdict. Then the service answers a few
requests, Serve and Ray stop, the registry's audit trail and the time per stage are printed.
Running it again lands nothing new; it trains a new round each time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import polars as pl

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import Drift, HousingSimulator
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings, load_environment
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.lake.feedback import release_feedback
from bridge_assets.ml.registry import CANDIDATE_ALIAS, PRODUCTION_ALIAS, STAGING_ALIAS, Registry
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.ml.traffic import send_traffic
from bridge_assets.monitoring.profiles import window_versions, windows_with_members
from bridge_assets.monitoring.reference import reference_prefix
from serving.deploy import ServingSettings, stop_serving
from serving.interactions import read_interactions

DEMO_BATCH = "demo-sim-s7"
DEMO_ROWS = 20_000
SHIFT_BATCH = "demo-shift-s8"  # lands on the second run: prices rose 50% (a label shift)
SHIFT = Drift(price_factor=1.5)


STAGE_SECONDS: dict[str, float] = {}


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """Time a stage of the demo (printed at the end: README, demo time per stage)."""
    started = time.monotonic()
    try:
        yield
    finally:
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.monotonic() - started


def _dagster(*args: str, check: bool = True) -> bool:
    """Run a `dagster` command against this code location and DAGSTER_HOME; False if it failed
    and `check` is off (a refusal the demo shows)."""
    print(f"$ dagster {' '.join(args)}")
    command = [sys.executable, "-m", "dagster", *args[:2], "-m", "bridge_assets.definitions", *args[2:]]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0 and check:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"`dagster {' '.join(args)}` failed")
    return completed.returncode == 0


def _materialize(select: str, partition: str | None = None, config: dict | None = None, check: bool = True) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="demo-") as file:
        json.dump(config or {}, file)  # JSON is YAML
        file.flush()
        options = [*(["--partition", partition] if partition else []), *(["-c", file.name] if config else [])]
        return _dagster("asset", "materialize", "--select", select, *options, check=check)


def _job(name: str, config: dict, check: bool = True) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="demo-") as file:
        json.dump(config, file)
        file.flush()
        return _dagster("job", "execute", "-j", name, "-c", file.name, check=check)


def _registry(store: ObjectStore) -> Registry:
    settings = MlflowSettings.from_env()
    return Registry(settings.activate(), settings.model_name, store, actor="make demo")


def _gate(store: ObjectStore, version: str) -> bool:
    """`staged_model`: every gate on the candidate; prints each gate's figures."""
    passed = _materialize("staged_model", check=False)
    record = _registry(store).gate_record(version)
    assert record is not None, "staged_model recorded nothing"
    print(f"gates of v{version}: {'every gate passed' if passed else 'BLOCKED'}")
    for name, gate in record.evidence["gates"].items():
        mark = "skip" if gate["skipped"] else "pass" if gate["passed"] else "FAIL"
        print(f"  {mark:<4} {name:<11} {gate['summary'][:150]}")
    return passed


def _promote(store: ObjectStore) -> bool:
    """`promote_model`: Staging → Production, refused without the evidence it needs."""
    promoted = _job("promote_model", {"ops": {"set_production_alias": {"config": {"actor": "make demo"}}}}, check=False)
    registry = _registry(store)
    last = registry.history()[-1]
    if promoted:
        print(f"v{registry.version_for(PRODUCTION_ALIAS)} is Production: {last.reason}")
    else:
        print(f"promotion refused; Production stays v{registry.version_for(PRODUCTION_ALIAS)} (no 'promote' verdict for v{registry.version_for(STAGING_ALIAS)})")
    return promoted


def _worse_candidate(store: ObjectStore) -> None:
    """A deliberately worse candidate (the reference network after one epoch) stopped at a gate."""
    print("\na deliberately worse candidate: the reference network after one epoch")
    _materialize("candidate_model", config={"ops": {"candidate_model": {"config": {"presets": ["reference"], "max_epochs": 1}}}})
    worse = _registry(store).version_for(CANDIDATE_ALIAS)
    if worse is not None and not _gate(store, worse):
        print(f"v{worse} stays a candidate: {_registry(store).gate_record(worse).reason[:300]}")


def _experiment(store: ObjectStore) -> None:
    """Online A/B: Production and Staging behind the router, simulated clients, delayed
    feedback, the verdict, and a promotion that needs it."""
    registry = _registry(store)
    production, staging = registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)
    print(f"\nA/B experiment: Production v{production} against Staging v{staging} (half the clients each)")
    with _stage("A/B experiment (deploy both, traffic, feedback, verdict)"):
        _materialize("production_deployment")
        url = ServingSettings.from_env().url
        result = send_traffic(store, url, rate=40, duration=15, clients=100, seed=len(registry.history()), drift=SHIFT)
        print(f"  bridge traffic: {result.sent} houses from 100 clients, statuses {dict(result.statuses)}, variants {dict(result.variants)}")
        deadline = time.monotonic() + 60
        while read_interactions(store).filter(pl.col("request_id").str.starts_with(result.traffic_id)).height < result.ok:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        key, labels = release_feedback(store, result.traffic_id)
        print(f"  released {labels} true prices as delayed feedback: {store.uri(key)}")
        _materialize("feedback,ab_report")
        verdict = _registry(store).verdict(staging)
        if verdict is not None:
            print(f"  verdict: {verdict.evidence['verdict']} — {verdict.reason}")
    with _stage("monitoring (references, profiles, window report)"):
        _monitor(store, staging)
    with _stage("promotion"):
        _promote(store)


def _monitor(store: ObjectStore, staging: str) -> None:
    """What the monitoring sensors do under `dagster dev`: a reference per served version, each
    new log object profiled once, and the windows holding the experiment's traffic reported."""
    print("\nmonitoring the experiment's traffic (prices rose 50% after Production was trained)")
    instance = dg.DagsterInstance.get()
    registry = _registry(store)
    served = [registry.version_for(PRODUCTION_ALIAS), staging]
    known = set(instance.get_dynamic_partitions("model_versions"))
    instance.add_dynamic_partitions("model_versions", [v for v in served if v not in known])
    for version in served:
        if not store.exists(f"{reference_prefix(registry.model_name, version)}reference.json"):
            _materialize("model_reference", version)
    _materialize("interaction_profiles")
    windows = sorted(w for w, members in windows_with_members(store).items() if staging in window_versions(members))
    known = set(instance.get_dynamic_partitions("monitor_windows"))
    instance.add_dynamic_partitions("monitor_windows", [w for w in windows if w not in known])
    for window in windows:  # a crossed threshold fails the report's checks, not the demo
        _materialize("window_profiles,labelled_traffic,drift_report", window, check=False)
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(dg.AssetKey("drift_report"), asset_partitions=[window]), limit=1
        ).records
        metadata = records[0].asset_materialization.metadata if records else {}
        alarms = metadata["alarms"].value if "alarms" in metadata else ["no report"]
        print(f"  window {window}: {len(alarms)} alarm(s)")
        for alarm in alarms:
            print(f"    {alarm[:200]}")
        if "report_html" in metadata:
            print(f"  report: {metadata['report_html'].value}")


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


def _promotion(store: ObjectStore, version: str) -> None:
    """Candidate → gates → Staging → (A/B) → Production, by the same jobs and assets as the UI."""
    print()
    registry = _registry(store)
    first = registry.version_for(PRODUCTION_ALIAS) is None
    if version in (registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)):
        print(f"v{version} is already {registry.stage(version)}: nothing new to promote")
    else:
        with _stage("gates"):
            passed = _gate(store, version)
        if not passed:
            print(f"v{version} stays a candidate; Production is unchanged")
        elif first:
            with _stage("promotion"):
                _promote(store)
            with _stage("a worse candidate stopped at a gate"):
                _worse_candidate(store)
        else:
            _experiment(store)


def _serve(store: ObjectStore) -> None:
    """Deploy what the registry says, send requests, stop what was started."""
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
    elif SHIFT_BATCH not in {b.batch_id for b in landed_batches(store)}:
        land_batch(store, SHIFT_BATCH, HousingSimulator.fit().generate(DEMO_ROWS, seed=8, batch_id=SHIFT_BATCH, drift=SHIFT))
        print(f"landed simulated batch {SHIFT_BATCH} ({DEMO_ROWS} rows; prices rose 50%: the challenger trains after a shift)")

    # What the landing sensor does under `dagster dev`, done here so the demo needs no daemon.
    instance = dg.DagsterInstance.get()
    batch_ids = [b.batch_id for b in landed_batches(store)]
    known = set(instance.get_dynamic_partitions("raw_batches"))
    instance.add_dynamic_partitions("raw_batches", [b for b in batch_ids if b not in known])
    done = instance.get_materialized_partitions(dg.AssetKey("raw_housing"))
    with _stage("raw batches (validation, quarantine)"):
        for batch_id in batch_ids:
            if batch_id not in done:
                _materialize("raw_housing", batch_id)
    with _stage("feature table"):
        _materialize("housing_features")
    with _stage("training round (Pipes, MLflow)"):
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
    try:
        _promotion(store, version)
        with _stage("serving (deploy, requests, stop)"):
            _serve(store)
    finally:
        stop_serving()  # also when the experiment failed half-way
    print("\naudit trail of the registry (`bridge history`):")
    for record in _registry(store).history()[-12:]:
        print(f"  {record.line()}")
    print(f"\ntime per stage: {', '.join(f'{name} {seconds:.0f} s' for name, seconds in STAGE_SECONDS.items())}")
    print("\nopen the UI with `make dev` (http://127.0.0.1:3000) to see these runs and their metadata")


if __name__ == "__main__":
    main()
