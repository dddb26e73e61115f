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

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import dagster as dg
import mlflow
import polars as pl
import requests

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.metrics import regression_metrics
from bridge_assets.core.simulator import Drift, HousingSimulator
from bridge_assets.defs.retraining import REASON_TAG, RETRAIN_TAG
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.feedback import release_feedback, withheld_key
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings, load_environment, settings_profile
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.gate_checks import model_input
from bridge_assets.ml.registry import CANDIDATE_ALIAS, PRODUCTION_ALIAS, STAGING_ALIAS, AuditRecord, Registry
from bridge_assets.ml.tracking import MlflowSettings, unseen_batches
from bridge_assets.ml.traffic import TrafficResult, post_json, send_traffic
from bridge_assets.monitoring.retrain import FEEDBACK_BATCH_PREFIX
from bridge_assets.monitoring.settings import MonitorSettings
from bridge_assets.retrying import poll
from serving.cluster import stop_serving
from serving.deploy import ServingSettings
from serving.interactions import read_interactions

DEMO_BATCH = "demo-sim-s7"
DEMO_ROWS = 20_000
SHIFT_BATCH = "demo-shift-s8"  # lands on the second run: prices rose 50% (a label shift)
SHIFT = Drift(price_factor=1.5)
TRAFFIC_RATE, TRAFFIC_SECONDS = 40, 30  # the loop's 1,200 houses: enough labelled rows to learn the rise
WAIT_SECONDS = 420  # for any one step of the daemon's part
DAEMON_HEARTBEAT_SECONDS = 30  # Dagster's daemons write a heartbeat this often (DEFAULT_HEARTBEAT_INTERVAL_SECONDS)


STAGE_SECONDS: dict[str, float] = {}
T = TypeVar("T")


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
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
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


def _live_daemon(margin: float = 10.0) -> bool:
    """Whether a daemon runs this instance's sensors now: its heartbeat must *advance*. A recent
    heartbeat alone also comes from a daemon stopped a moment ago, so when one is recent this
    waits for the next (at most one interval and a margin)."""
    instance = dg.DagsterInstance.get()

    def heartbeat() -> float | None:
        beat = instance.get_daemon_heartbeats().get("SENSOR")
        return beat.timestamp if beat is not None else None

    first = heartbeat()
    if first is None or time.time() - first > DAEMON_HEARTBEAT_SECONDS + margin:
        return False
    wait = first + DAEMON_HEARTBEAT_SECONDS + margin - time.time()
    return bool(poll(lambda: (heartbeat() or 0) > first, wait, every=1))


def _gate(store: ObjectStore, version: str, daemon: bool) -> bool:
    """`staged_model`: every gate on the candidate (by automation where a daemon runs); prints
    each gate's figures. `daemon`: a daemon runs this instance at the loop's cadences (the
    stack's): the demo leaves the sensors' and automation's steps to it."""
    if daemon:
        record = _wait_for(f"the gates on v{version} (automation)", lambda: _registry(store).gate_record(version), None)
    else:
        _materialize("staged_model", check=False)
        record = _required(_registry(store).gate_record(version), f"a gate record of v{version} from staged_model")
    return _print_gates(record)


def _deploy(store: ObjectStore, daemon: bool) -> None:
    """`production_deployment` of what the registry says (by registry_sensor where a daemon runs)."""
    if not daemon:
        _materialize("production_deployment")
        return
    registry = _registry(store)
    wanted = (registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS) or "none")

    def deployed() -> bool | None:
        latest = dg.DagsterInstance.get().fetch_materializations(dg.AssetKey("production_deployment"), limit=1).records
        return (
            True
            if latest
            and (_metadata(latest[0]).get("model_version"), _metadata(latest[0]).get("staging_version")) == wanted
            else None
        )

    _wait_for(f"registry_sensor deploying v{wanted[0]} (Staging: {wanted[1]})", deployed, None)


def _required(value: T | None, what: str) -> T:
    """`value`, or the demo stops saying what it expected to find."""
    if value is None:
        raise SystemExit(f"the demo expected {what} and found none; see `make dev`")
    return value


def _print_gates(record: AuditRecord) -> bool:
    passed = record.action == "gates_passed"
    print(f"gates of v{record.version}: {'every gate passed' if passed else 'BLOCKED'}")
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
        print(
            f"promotion refused; Production stays v{registry.version_for(PRODUCTION_ALIAS)} (no 'promote' verdict for v{registry.version_for(STAGING_ALIAS)})"
        )
    return promoted


def _worse_candidate(store: ObjectStore, daemon: bool) -> None:
    """A deliberately worse candidate (the reference network after one epoch) stopped at a gate."""
    print("\na deliberately worse candidate: the reference network after one epoch")
    _materialize(
        "candidate_model", config={"ops": {"candidate_model": {"config": {"presets": ["reference"], "max_epochs": 1}}}}
    )
    worse = _registry(store).version_for(CANDIDATE_ALIAS)
    if worse is not None and not _gate(store, worse, daemon):
        record = _required(_registry(store).gate_record(worse), f"a gate record of v{worse}")
        print(f"v{worse} stays a candidate: {record.reason[:300]}")


def _experiment(store: ObjectStore, daemon: bool) -> None:
    """Online A/B: Production and Staging behind the router, simulated clients, delayed
    feedback, the verdict, and a promotion that needs it."""
    registry = _registry(store)
    production = registry.version_for(PRODUCTION_ALIAS)
    staging = _required(registry.version_for(STAGING_ALIAS), "a Staging version for the experiment")
    print(f"\nA/B experiment: Production v{production} against Staging v{staging} (half the clients each)")
    with _stage("A/B experiment (deploy both, traffic, feedback, verdict)"):
        _deploy(store, daemon)
        _traffic_with_feedback(
            store,
            ServingSettings.from_env().url,
            SHIFT,
            seed=len(registry.history()),
            seconds=15,
            name=f"demo-ab-v{staging}",
        )
        _materialize("feedback,ab_report")
        verdict = _registry(store).verdict(staging)
        if verdict is not None:
            print(f"  verdict: {verdict.evidence['verdict']} — {verdict.reason}")
    with _stage("promotion"):
        _promote(store)


def _print_candidate() -> str:
    """The registered candidate and its metrics next to the baselines', read back from MLflow."""
    settings = MlflowSettings.from_env()
    client = settings.activate()
    version = client.get_model_version_by_alias(settings.model_name, CANDIDATE_ALIAS)
    run = client.get_run(version.tags["bridge.run_id"])
    metrics = run.data.metrics
    print(
        f"\ncandidate model: models:/{settings.model_name}/{version.version} (alias {CANDIDATE_ALIAS}, "
        f"config {run.info.run_name}, feature version {version.tags['bridge.feature_version']})"
    )
    print(f"  MLflow store: {settings.tracking_uri}")
    print(f"  {'':<22}{'val RMSE':>12}{'val R²':>9}{'test RMSE':>12}{'test R²':>9}")
    for label, prefix in (
        (run.info.run_name, ""),
        ("baseline: linear", "linear_"),
        ("baseline: log-linear", "log_linear_"),
    ):
        print(
            f"  {label:<22}{metrics[prefix + 'val_rmse']:>12,.0f}{metrics[prefix + 'val_r2']:>9.4f}"
            f"{metrics[prefix + 'test_rmse']:>12,.0f}{metrics[prefix + 'test_r2']:>9.4f}"
        )
    return str(version.version)


def _promotion(store: ObjectStore, version: str, daemon: bool) -> None:
    """Candidate → gates → Staging → (A/B) → Production, by the same jobs and assets as the UI."""
    print()
    registry = _registry(store)
    first = registry.version_for(PRODUCTION_ALIAS) is None
    if version in (registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)):
        print(f"v{version} is already {registry.stage(version)}: nothing new to promote")
    else:
        with _stage("gates"):
            passed = _gate(store, version, daemon)
        if not passed:
            print(f"v{version} stays a candidate; Production is unchanged")
        elif first:
            with _stage("promotion"):
                _promote(store)
            with _stage("a worse candidate stopped at a gate"):
                _worse_candidate(store, daemon)
        else:
            _experiment(store, daemon)


def _serve(store: ObjectStore, daemon: bool) -> str:
    """Deploy what the registry says and send a few requests; the service's URL."""
    _deploy(store, daemon)
    url = ServingSettings.from_env().url
    requests = HousingSimulator.fit().generate(5, seed=99, batch_id="demo-traffic")
    traffic = next(iter(requests))
    print(f"\nPOST {url}/predict (simulated houses; X-Request-ID = row_id):")
    for row in traffic.iter_rows(named=True):
        body = {name: row[name] for name in FEATURES}
        _, reply = post_json(f"{url}/predict", body, {"X-Request-ID": row["row_id"]})
        prediction = _required(reply, "a JSON reply")["response"]["prediction"]
        print(f"  {row['row_id']}: predicted {prediction:>12,.0f}   actual {row['price']:>12,.0f}")
    _, bad = post_json(
        f"{url}/predict",
        {**{name: traffic.row(0, named=True)[name] for name in FEATURES}, "bedrooms": 10},
        {"X-Request-ID": "demo-bad"},
    )
    refusal = _required(bad, "a JSON refusal")
    print(f"  an invalid request (bedrooms 10) → {refusal['status']}: {refusal['message']}")
    return url


@contextmanager
def _daemon(running: bool) -> Iterator[Path | None]:
    """`dagster-daemon run` on this instance and code location (as under `make dev`), in its
    own process group, stopped at the end with the runs it launched; yields its log's path.
    Where a daemon already runs (`running`: the stack's), that one does the work and is left running."""
    if running:
        print("the instance's own daemon runs the loop (its log is the stack's)")
        yield None
        return
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    log_path = Path(os.environ["DAGSTER_HOME"]) / "demo-daemon.log"
    print(f"$ dagster-daemon run -w {workspace}   (log: {log_path})")
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield log_path
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


def _wait_for(what: str, found: Callable[[], T | None], log_path: Path | None) -> T:
    """Poll until the daemon's work shows `found()`; on timeout, fail naming what and where."""
    value = poll(found, WAIT_SECONDS, every=2)
    if value is None:
        tail = log_path.read_text().splitlines()[-15:] if log_path else ["(the running daemon's own log)"]
        raise SystemExit(
            f"gave up after {WAIT_SECONDS} s waiting for {what}; the daemon's log ends:\n" + "\n".join(tail)
        )
    return value


def _materialized_since(instance: dg.DagsterInstance, asset: str, since: float) -> list[dg.EventLogRecord]:
    """`asset`'s materializations after `since` (epoch seconds), newest first."""
    return [r for r in instance.fetch_materializations(dg.AssetKey(asset), limit=50).records if r.timestamp > since]


def _metadata(record: dg.EventLogRecord) -> dict:
    return (
        {k: v.value for k, v in record.asset_materialization.metadata.items()} if record.asset_materialization else {}
    )


def _traffic_with_feedback(
    store: ObjectStore, url: str, drift: Drift, seed: int, seconds: float, name: str
) -> TrafficResult:
    """Simulated clients send houses, within one monitoring window (so one feedback batch
    holds them all); once their records are in the lake the true prices are released, late,
    as feedback. The traffic id is `name` (suffixed if an earlier attempt used it): row ids,
    hence the hash split of the feedback and what a retrain learns, are the same every run."""
    window = MonitorSettings.from_env().window_seconds
    if (left := window - time.time() % window) < seconds + 5:
        time.sleep(left)
    attempt, traffic_id = 0, name
    while store.exists(withheld_key(traffic_id)):
        attempt += 1
        traffic_id = f"{name}-{attempt}"
    result = send_traffic(
        store, url, rate=TRAFFIC_RATE, duration=seconds, clients=100, seed=seed, drift=drift, traffic_id=traffic_id
    )
    print(
        f"  bridge traffic: {result.sent} houses from 100 clients, statuses {dict(result.statuses)}, variants {dict(result.variants)}"
    )
    poll(  # the records in the lake first: a label joins only a logged request
        lambda: (
            read_interactions(store).filter(pl.col("request_id").str.starts_with(result.traffic_id)).height >= result.ok
        ),
        60,
        every=1,
    )
    key, labels = release_feedback(store, result.traffic_id)
    print(f"  released {labels} true prices as delayed feedback: {store.uri(key)}")
    return result


def _closed_loop(store: ObjectStore, url: str, daemon: bool) -> None:
    """The second half: the daemon's sensors and automation close the loop; this only sends
    traffic, releases labels and waits on what the daemon does."""
    instance = dg.DagsterInstance.get()
    registry = _registry(store)
    production = _required(registry.version_for(PRODUCTION_ALIAS), "a Production version")
    rises = 1 + len(instance.get_run_records(dg.RunsFilter(tags={RETRAIN_TAG: "automatic"})))
    drift = Drift(price_factor=1.5**rises)  # prices rise again on every run of the demo
    feedback_before = {b.batch_id for b in landed_batches(store) if b.batch_id.startswith(FEEDBACK_BATCH_PREFIX)}
    print(
        f"\nthe loop through the Dagster daemon: prices rose to {drift.price_factor:.2f}x what Production v{production} learned"
    )
    started = time.time()
    with _daemon(daemon) as log_path:
        with _stage("drifted traffic, interaction logs, labels released"):
            _traffic_with_feedback(
                store, url, drift, seed=100 + rises, seconds=TRAFFIC_SECONDS, name=f"demo-loop-{rises}"
            )
        with _stage("daemon: profiles, window reports, decay detected"):
            # Reports of earlier windows are rewritten as their labels arrive: wait for an alarm on this Production
            window, alarms = _wait_for(
                f"a window report with an alarm on v{production}",
                lambda: next(
                    (
                        (r.partition_key, _metadata(r)["alarms"])
                        for r in _materialized_since(instance, "drift_report", started)
                        if any(alarm.startswith(f"v{production}/") for alarm in _metadata(r).get("alarms") or [])
                    ),
                    None,
                ),
                log_path,
            )
            print(f"  drift_report[{window}]: {len(alarms)} alarm(s)")
            for alarm in alarms:
                print(f"    {alarm[:200]}")
        with _stage("daemon: feedback batch, raw, new feature version"):
            version = _wait_for(
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
        with _stage("daemon: automatic retraining"):
            run = _wait_for(
                "the automatic retraining run",
                lambda: next(
                    (
                        r
                        for r in instance.get_run_records(
                            dg.RunsFilter(tags={RETRAIN_TAG: "automatic"}, created_after=_utc(started))
                        )
                        if r.dagster_run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
                    ),
                    None,
                ),
                log_path,
            )
            if run.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
                raise SystemExit(f"the retraining run {run.dagster_run.run_id} failed; see it with `make dev`")
            candidate = _required(_registry(store).version_for(CANDIDATE_ALIAS), "the retrained candidate")
            print(
                f"  run {run.dagster_run.run_id[:8]} ({run.dagster_run.tags.get(REASON_TAG, '')[:120]}) → candidate v{candidate}"
            )
        with _stage("daemon: gates on the new candidate (automation)"):
            record = _wait_for(f"the gates on v{candidate}", lambda: _registry(store).gate_record(candidate), log_path)
            passed = _print_gates(record)
        _print_recovery(store, production, candidate)
        if not passed:
            print(f"v{candidate} stays a candidate; Production v{production} keeps serving")
            return
        with _stage("daemon: registry_sensor serves the new version"):
            _wait_for(
                f"v{candidate} deployed beside Production",
                lambda: next(
                    (
                        r
                        for r in _materialized_since(instance, "production_deployment", started)
                        if _metadata(r).get("staging_version") == candidate
                    ),
                    None,
                ),
                log_path,
            )
            experiment = requests.get(f"{url}/model", timeout=30).json()["response"]["experiment"]
            print(
                f"  serving {experiment['versions']} (Staging for {experiment['staging_weight']:.0%} of clients): the A/B experiment runs on live traffic"
            )


def _print_recovery(store: ObjectStore, production: str, candidate: str) -> None:
    """Production's and the new version's RMSE on the same post-rise rows (the test rows of the
    batches Production never saw), and the share of Production's decay the new version recovered.
    Decay is measured relative to the mean price of the rows it is measured on (a 50% rise alone
    makes every error 50% larger): Production's relative RMSE before the rise, on its own test
    rows, is the level a full recovery returns to."""
    settings = MlflowSettings.from_env()
    client = settings.activate()
    features = FeatureStore(store)
    latest = _required(features.latest(), "a feature version")
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
    before = client.get_run(_required(trained.run_id, f"the run of v{production}")).data.metrics["test_rmse"]
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


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def main() -> None:
    started = time.monotonic()
    load_environment()
    # A daemon without the loop's cadences (`make dev`'s, by default) would take hours: the demo
    # then starts its own for the loop, as it does where none runs.
    cadences = settings_profile("demo")
    daemon = _live_daemon() and all(os.environ.get(name) == value for name, value in cadences.items())
    for name, value in cadences.items():
        os.environ.setdefault(name, value)
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
        land_batch(
            store, SHIFT_BATCH, HousingSimulator.fit().generate(DEMO_ROWS, seed=8, batch_id=SHIFT_BATCH, drift=SHIFT)
        )
        print(
            f"landed simulated batch {SHIFT_BATCH} ({DEMO_ROWS} rows; prices rose 50%: the challenger trains after a shift)"
        )

    instance = dg.DagsterInstance.get()
    batch_ids = [b.batch_id for b in landed_batches(store)]
    if daemon:  # the stack's: its landing and feature sensors take the batches
        print("a Dagster daemon runs on this instance: its sensors validate the batches and build the features")
        with _stage("raw batches (validation, quarantine)"):
            _wait_for(
                "raw partitions of every landed batch",
                lambda: (
                    True if set(batch_ids) <= instance.get_materialized_partitions(dg.AssetKey("raw_housing")) else None
                ),
                None,
            )
        with _stage("feature table"):
            _wait_for(
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
        _promotion(store, version, daemon)
        with _stage("serving (deploy, requests)"):
            url = _serve(store, daemon)
        _closed_loop(store, url, daemon)
    finally:
        external_cluster = ServingSettings.from_env().ray_address
        if not external_cluster:  # a cluster the demo did not start keeps serving
            stop_serving()  # also when something failed half-way
    stopped = "nothing: the cluster keeps serving" if external_cluster else "the daemon, Serve and the local Ray"
    print(f"stopped {stopped}; {read_interactions(store).height} interaction records in {store.uri('interactions/')}")
    print("\naudit trail of the registry (`bridge history`):")
    for record in _registry(store).history()[-12:]:
        print(f"  {record.line()}")
    print(f"\ntime per stage: {', '.join(f'{name} {seconds:.0f} s' for name, seconds in STAGE_SECONDS.items())}")
    print(f"the whole run: {time.monotonic() - started:.0f} s")
    dagster_url = (
        os.environ.get("BRIDGE_DAGSTER_URL") or f"http://127.0.0.1:{os.environ.get('BRIDGE_DAGSTER_PORT') or 3000}"
    )
    print(f"\nopen the UI with `make dev` ({dagster_url}) to see these runs, the sensors' ticks and the")
    print(f"metadata; `make mlflow` ({MlflowSettings.from_env().ui_url}) for the runs and the registry.")
    if not any(record.action == "ab_verdict" for record in _registry(store).history()):
        print(
            "Run `make demo` again for the online A/B experiment, its verdict and the promotion, then the loop on the new"
        )
        print("Production.", end=" ")
    print("The demo stopped the service: `make serve` brings Production back (`make stop` ends it).")


if __name__ == "__main__":
    main()
