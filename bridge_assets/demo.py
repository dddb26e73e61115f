"""`make demo`: the main job, run through Dagster on the same DAGSTER_HOME as `make dev`.

First half, by the same commands a user types (`dagster asset materialize`, `dagster job
execute`): the real data and a simulated batch (some corrupt rows, oddly-cased categories)
land and are validated into raw partitions, the feature table and a training round (a
candidate in MLflow) follow, and the candidate goes through the compliance gates
(`staged_model`) into Staging. The first time there is no Production to compare with, so it
becomes Production (`promote_model`), and a deliberately worse candidate (the reference
network after one epoch) is shown stopped at a gate with its numbers. On later runs a
challenger trained after a price rise runs an online A/B experiment against Production
(simulated clients, delayed feedback, `ab_report`), and `promote_model` promotes only on a
promote verdict. Production is deployed into Ray Serve and answers a few requests.

Second half, through the real Dagster daemon and its sensors (started here on the same
instance, with the loop's cadences shortened): a stretch of traffic after prices rose again
is logged, its true prices are released late; the daemon profiles the logs, reports the
windows (realised decay on the old Production), lands the labelled traffic as a feedback
batch into a new feature version, retrains under the automatic policy, puts the new candidate
through the gates and serves it beside Production. Then the daemon, Serve and Ray stop, and
the registry's audit trail and the time per stage are printed. Every run trains new rounds;
data that landed before is not landed again.

On `make stack` the stack's own daemon already runs the instance at these cadences: the demo
starts none, leaves the landing, feature, gate and deployment steps to its sensors and
automation (waiting on them instead of running them a second time beside them), and leaves the
cluster's Serve running.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import requests

from bridge_assets import demo_steps as steps
from bridge_assets.core.contract import CONTRACT_VARIABLE
from bridge_assets.core.contract_spec import HOUSING
from bridge_assets.core.metrics import regression_metrics
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.defs.monitoring import ALARM_RECORDS
from bridge_assets.defs.retraining import REASON_TAG, RETRAIN_TAG
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings, load_environment, settings_profile
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.gate_checks import model_input
from bridge_assets.ml.registry import CANDIDATE_ALIAS, PRODUCTION_ALIAS
from bridge_assets.ml.tracking import MlflowSettings, unseen_batches
from bridge_assets.monitoring.alarms import Alarm
from bridge_assets.monitoring.retrain import FEEDBACK_BATCH_PREFIX
from serving.cluster import stop_serving
from serving.deploy import ServingSettings

DEMO_BATCH = "demo-sim-s7"
DEMO_ROWS = 20_000
SHIFT_BATCH = "demo-shift-s8"  # lands on the second run: prices rose 50% (a label shift)


def _closed_loop(store: ObjectStore, url: str, daemon: bool) -> None:
    """The second half: the daemon's sensors and automation close the loop; this only sends
    traffic, releases labels and waits on what the daemon does."""
    instance = dg.DagsterInstance.get()
    registry = steps.registry_of(store)
    production = steps.required(registry.version_for(PRODUCTION_ALIAS), "a Production version")
    rises = 1 + len(instance.get_run_records(dg.RunsFilter(tags={RETRAIN_TAG: "automatic"})))
    drift = Drift(price_factor=1.5**rises)  # prices rise again on every run of the demo
    feedback_before = {b.batch_id for b in landed_batches(store) if b.batch_id.startswith(FEEDBACK_BATCH_PREFIX)}
    print(
        f"\nthe loop through the Dagster daemon: prices rose to {drift.price_factor:.2f}x what Production v{production} learned"
    )
    started = time.time()
    with steps.daemon(daemon) as log_path:
        with steps.stage("drifted traffic, interaction logs, labels released"):
            steps.traffic_with_feedback(
                store, url, drift, seed=100 + rises, seconds=steps.TRAFFIC_SECONDS, name=f"demo-loop-{rises}"
            )
        with steps.stage("daemon: profiles, window reports, decay detected"):
            # Reports of earlier windows are rewritten as their labels arrive: wait for an alarm on this Production
            window, alarms = steps.wait_for(
                f"a window report with an alarm on v{production}",
                lambda: _window_alarmed_on(instance, production, started),
                log_path,
            )
            print(f"  drift_report[{window}]: {len(alarms)} alarm(s)")
            for alarm in alarms:
                print(f"    {alarm.text[:200]}")
        with steps.stage("daemon: feedback batch, raw, new feature version"):
            version = steps.wait_for(
                "the labelled traffic in a feature version",
                lambda: next(
                    (
                        v
                        for v in [FeatureStore(store).latest()]
                        if v
                        and any(b.startswith(FEEDBACK_BATCH_PREFIX) and b not in feedback_before for b in v.batch_ids)
                    ),
                    None,
                ),
                log_path,
            )
            print(
                f"  feature version {version.version}: {version.rows} rows, with {', '.join(b for b in version.batch_ids if b.startswith(FEEDBACK_BATCH_PREFIX) and b not in feedback_before)}"
            )
        with steps.stage("daemon: automatic retraining"):
            run = steps.wait_for(
                "the automatic retraining run",
                lambda: next(
                    (
                        r
                        for r in instance.get_run_records(
                            dg.RunsFilter(tags={RETRAIN_TAG: "automatic"}, created_after=steps.utc(started))
                        )
                        if r.dagster_run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
                    ),
                    None,
                ),
                log_path,
            )
            if run.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
                raise SystemExit(f"the retraining run {run.dagster_run.run_id} failed; see it with `make dev`")
            candidate = steps.required(steps.registry_of(store).version_for(CANDIDATE_ALIAS), "the retrained candidate")
            print(
                f"  run {run.dagster_run.run_id[:8]} ({run.dagster_run.tags.get(REASON_TAG, '')[:120]}) → candidate v{candidate}"
            )
        with steps.stage("daemon: gates on the new candidate (automation)"):
            record = steps.wait_for(
                f"the gates on v{candidate}", lambda: steps.registry_of(store).gate_record(candidate), log_path
            )
            passed = steps.print_gates(record)
        _print_recovery(store, production, candidate)
        if not passed:
            print(f"v{candidate} stays a candidate; Production v{production} keeps serving")
            return
        with steps.stage("daemon: registry_sensor serves the new version"):
            steps.wait_for(
                f"v{candidate} deployed beside Production",
                lambda: next(
                    (
                        r
                        for r in steps.materialized_since(instance, "production_deployment", started)
                        if steps.metadata_of(r).get("staging_version") == candidate
                    ),
                    None,
                ),
                log_path,
            )
            experiment = requests.get(f"{url}/model", timeout=30).json()["response"]["experiment"]
            print(
                f"  serving {experiment['versions']} (Staging for {experiment['staging_weight']:.0%} of clients): the A/B experiment runs on live traffic"
            )


def _window_alarmed_on(instance: dg.DagsterInstance, version: str, since: float) -> tuple[str, list[Alarm]] | None:
    """The first window report since `since` with an alarm on `version` (read from its alarm
    records, not its text): its window and alarms."""
    for report in steps.materialized_since(instance, "drift_report", since):
        alarms = [Alarm.from_dict(a) for a in steps.metadata_of(report).get(ALARM_RECORDS) or []]
        if report.partition_key and any(alarm.model_version == version for alarm in alarms):
            return report.partition_key, alarms
    return None


def _print_recovery(store: ObjectStore, production: str, candidate: str) -> None:
    """Production's and the new version's RMSE on the same post-rise rows (the test rows of the
    batches Production never saw), and the share of Production's decay the new version recovered.
    Decay is measured relative to the mean price of the rows it is measured on (a 50% rise alone
    makes every error 50% larger): Production's relative RMSE before the rise, on its own test
    rows, is the level a full recovery returns to."""
    settings = MlflowSettings.from_env()
    client = settings.activate()
    features = FeatureStore(store)
    latest = steps.required(features.latest(), "a feature version")
    unseen = unseen_batches(client, settings.model_name, production, features, latest.batch_ids) or []
    rows = features.scan(latest).collect().filter((pl.col("split") == "test") & pl.col("batch_id").is_in(unseen))
    if rows.is_empty():
        print(f"  no test rows Production v{production} never saw: nothing to compare")
        return
    actual = rows["price"].to_numpy()
    rmse = {
        v: regression_metrics(
            actual, mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{v}").predict(model_input(rows))
        )["rmse"]
        for v in (production, candidate)
    }
    trained = client.get_model_version(settings.model_name, production)
    before = client.get_run(steps.required(trained.run_id, f"the run of v{production}")).data.metrics["test_rmse"]
    own_test = (
        features.scan(trained.tags["bridge.feature_version"])
        .filter(pl.col("split") == "test")
        .select(pl.col("price").mean())
        .collect()
        .item()
    )
    relative = {"before": before / own_test, **{v: value / actual.mean() for v, value in rmse.items()}}
    details = client.get_model_version(settings.model_name, candidate)
    print(
        f"  v{candidate} is {details.tags.get('bridge.option', 'scratch')}: {details.tags.get('bridge.choice', '')[:200]}"
    )
    print(
        f"  on the same {rows.height} post-rise test rows: Production v{production} RMSE {rmse[production]:,.0f}, "
        f"v{candidate} RMSE {rmse[candidate]:,.0f} = {rmse[candidate] / rmse[production]:.2f} × v{production}'s"
    )
    recovered = (relative[production] - relative[candidate]) / (relative[production] - relative["before"])
    print(
        f"  decay recovered: {recovered:.0%} (RMSE / mean price: v{production} {relative['before']:.1%} before the rise, "
        f"{relative[production]:.1%} after; v{candidate} {relative[candidate]:.1%})"
    )


def main() -> None:
    started = time.monotonic()
    load_environment()
    chosen = os.environ.get(CONTRACT_VARIABLE)
    if chosen and Path(chosen).expanduser().resolve() != HOUSING.resolve():
        sys.exit(f"make demo tells the housing data's story (a price rise): unset {CONTRACT_VARIABLE} ({chosen})")
    # A daemon without the loop's cadences (`make dev`'s, by default) would take hours: the demo
    # then starts its own for the loop, as it does where none runs.
    cadences = settings_profile("demo")
    daemon = steps.live_daemon() and all(os.environ.get(name) == value for name, value in cadences.items())
    for name, value in cadences.items():
        os.environ.setdefault(name, value)
    store = StorageSettings.from_env().open()
    print(f"storage: {store!r}   DAGSTER_HOME: {os.environ.get('DAGSTER_HOME')}")
    if land_seed(store):
        print("landed the real housing data (545 rows)")
    if DEMO_BATCH not in {b.batch_id for b in landed_batches(store)}:
        blocks = Simulator.fit().generate(
            DEMO_ROWS, seed=7, batch_id=DEMO_BATCH, corrupt_fraction=0.02, case_noise=0.05
        )
        land_batch(store, DEMO_BATCH, blocks)
        print(f"landed simulated batch {DEMO_BATCH} ({DEMO_ROWS} rows, 2% corrupt)")
    elif SHIFT_BATCH not in {b.batch_id for b in landed_batches(store)}:
        land_batch(
            store,
            SHIFT_BATCH,
            Simulator.fit().generate(DEMO_ROWS, seed=8, batch_id=SHIFT_BATCH, drift=steps.SHIFT),
        )
        print(
            f"landed simulated batch {SHIFT_BATCH} ({DEMO_ROWS} rows; prices rose 50%: the challenger trains after a shift)"
        )

    instance = dg.DagsterInstance.get()
    batch_ids = [b.batch_id for b in landed_batches(store)]
    if daemon:  # the stack's: its landing and feature sensors take the batches
        print("a Dagster daemon runs on this instance: its sensors validate the batches and build the features")
        with steps.stage("raw batches (validation, quarantine)"):
            steps.wait_for(
                "raw partitions of every landed batch",
                lambda: (
                    True if set(batch_ids) <= instance.get_materialized_partitions(dg.AssetKey("raw_housing")) else None
                ),
                None,
            )
        with steps.stage("feature table"):
            steps.wait_for(
                "a feature version with every batch",
                lambda: (
                    True
                    if (latest := FeatureStore(store).latest()) and set(batch_ids) <= set(latest.batch_ids)
                    else None
                ),
                None,
            )
    else:  # what the landing and feature sensors do under `dagster dev`, done here
        known = set(instance.get_dynamic_partitions("raw_batches"))
        instance.add_dynamic_partitions("raw_batches", [b for b in batch_ids if b not in known])
        done = instance.get_materialized_partitions(dg.AssetKey("raw_housing"))
        with steps.stage("raw batches (validation, quarantine)"):
            for batch_id in batch_ids:
                if batch_id not in done:
                    steps.materialize("raw_housing", batch_id)
        with steps.stage("feature table"):
            steps.materialize("housing_features")
    with steps.stage("training round (Pipes, MLflow)"):
        steps.materialize("candidate_model")

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
    version = steps.print_candidate()
    try:
        steps.promotion(store, version, daemon)
        with steps.stage("serving (deploy, requests)"):
            url = steps.serve(store, daemon)
        _closed_loop(store, url, daemon)
    finally:
        external_cluster = ServingSettings.from_env().address
        if not external_cluster:  # a cluster the demo did not start keeps serving
            stop_serving()  # also when something failed half-way
    stopped = "nothing: the cluster keeps serving" if external_cluster else "the daemon, Serve and the local Ray"
    print(f"stopped {stopped}; {read_interactions(store).height} interaction records in {store.uri('interactions/')}")
    print("\naudit trail of the registry (`bridge history`):")
    for record in steps.registry_of(store).history()[-12:]:
        print(f"  {record.line()}")
    print(f"\ntime per stage: {', '.join(f'{name} {seconds:.0f} s' for name, seconds in steps.STAGE_SECONDS.items())}")
    print(f"the whole run: {time.monotonic() - started:.0f} s")
    dagster_url = (
        os.environ.get("BRIDGE_DAGSTER_URL") or f"http://127.0.0.1:{os.environ.get('BRIDGE_DAGSTER_PORT') or 3000}"
    )
    print(f"\nopen the UI with `make dev` ({dagster_url}) to see these runs, the sensors' ticks and the")
    print(f"metadata; `make mlflow` ({MlflowSettings.from_env().ui_url}) for the runs and the registry.")
    if not any(record.action == "ab_verdict" for record in steps.registry_of(store).history()):
        print(
            "Run `make demo` again for the online A/B experiment, its verdict and the promotion, then the loop on the new"
        )
        print("Production.", end=" ")
    print("The demo stopped the service: `make serve` brings Production back (`make stop` ends it).")


if __name__ == "__main__":
    main()
