"""The steps of `make demo` (`bridge_assets/demo.py` puts them in order): Dagster commands
as a user types them, the gates, deployment, the A/B experiment and the promotion, traffic
with delayed feedback, the daemon and the waits on its work, and the time per stage."""

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
import polars as pl

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.lake.feedback import release_feedback, withheld_key
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import CANDIDATE_ALIAS, PRODUCTION_ALIAS, STAGING_ALIAS, AuditRecord, Registry
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.ml.traffic import TrafficResult, post_json, send_traffic
from bridge_assets.monitoring.settings import MonitorSettings
from bridge_assets.retrying import poll
from serving.deploy import ServingSettings, service_state

SHIFT = Drift(price_factor=1.5)
TRAFFIC_RATE, TRAFFIC_SECONDS = 40, 30  # the loop's 1,200 houses: enough labelled rows to learn the rise
WAIT_SECONDS = 420  # for any one step of the daemon's part
DAEMON_HEARTBEAT_SECONDS = 30  # Dagster's daemons write a heartbeat this often (DEFAULT_HEARTBEAT_INTERVAL_SECONDS)
STAGE_SECONDS: dict[str, float] = {}
T = TypeVar("T")


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the demo (printed at the end: README, demo time per stage)."""
    started = time.monotonic()
    try:
        yield
    finally:
        STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.monotonic() - started


def run_dagster(*args: str, check: bool = True) -> bool:
    """Run a `dagster` command against this code location and DAGSTER_HOME; False if it failed
    and `check` is off (a refusal the demo shows)."""
    print(f"$ dagster {' '.join(args)}")
    command = [sys.executable, "-m", "dagster", *args[:2], "-m", "bridge_assets.definitions", *args[2:]]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0 and check:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"`dagster {' '.join(args)}` failed")
    return completed.returncode == 0


def materialize(select: str, partition: str | None = None, config: dict | None = None, check: bool = True) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="demo-") as file:
        json.dump(config or {}, file)  # JSON is YAML
        file.flush()
        options = [*(["--partition", partition] if partition else []), *(["-c", file.name] if config else [])]
        return run_dagster("asset", "materialize", "--select", select, *options, check=check)


def execute_job(name: str, config: dict, check: bool = True) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="demo-") as file:
        json.dump(config, file)
        file.flush()
        return run_dagster("job", "execute", "-j", name, "-c", file.name, check=check)


def registry_of(store: ObjectStore) -> Registry:
    settings = MlflowSettings.from_env()
    return Registry(settings.activate(), settings.model_name, store, actor="make demo")


def live_daemon(margin: float = 10.0) -> bool:
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


def gate(store: ObjectStore, version: str, daemon: bool) -> bool:
    """`staged_model`: every gate on the candidate (by automation where a daemon runs); prints
    each gate's figures. `daemon`: a daemon runs this instance at the loop's cadences (the
    stack's): the demo leaves the sensors' and automation's steps to it."""
    if daemon:
        record = wait_for(
            f"the gates on v{version} (automation)", lambda: registry_of(store).gate_record(version), None
        )
    else:
        materialize("staged_model", check=False)
        record = required(registry_of(store).gate_record(version), f"a gate record of v{version} from staged_model")
    return print_gates(record)


def deploy(store: ObjectStore, daemon: bool) -> None:
    """`production_deployment` of what the registry says (by registry_sensor where a daemon runs)."""
    if not daemon:
        materialize("production_deployment")
        return
    registry = registry_of(store)
    production, staging = registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)

    def serves_the_registry() -> bool:
        """The service's own answer (its `/model`), as registry_sensor reads it."""
        served = service_state().versions
        return served.get("production") == production and served.get("staging") == staging

    beside = f" beside Staging v{staging}" if staging else ""
    wait_for(f"registry_sensor serving v{production}{beside}", serves_the_registry, None)


def required(value: T | None, what: str) -> T:
    """`value`, or the demo stops saying what it expected to find."""
    if value is None:
        raise SystemExit(f"the demo expected {what} and found none; see `make dev`")
    return value


def print_gates(record: AuditRecord) -> bool:
    passed = record.action == "gates_passed"
    print(f"gates of v{record.version}: {'every gate passed' if passed else 'BLOCKED'}")
    for name, gate in record.evidence["gates"].items():
        mark = "skip" if gate["skipped"] else "pass" if gate["passed"] else "FAIL"
        print(f"  {mark:<4} {name:<11} {gate['summary'][:150]}")
    return passed


def promote(store: ObjectStore) -> bool:
    """`promote_model`: Staging → Production, refused without the evidence it needs."""
    promoted = execute_job(
        "promote_model", {"ops": {"set_production_alias": {"config": {"actor": "make demo"}}}}, check=False
    )
    registry = registry_of(store)
    last = registry.history()[-1]
    if promoted:
        print(f"v{registry.version_for(PRODUCTION_ALIAS)} is Production: {last.reason}")
    else:
        print(
            f"promotion refused; Production stays v{registry.version_for(PRODUCTION_ALIAS)} (no 'promote' verdict for v{registry.version_for(STAGING_ALIAS)})"
        )
    return promoted


def worse_candidate(store: ObjectStore, daemon: bool) -> None:
    """A deliberately worse candidate (the reference network after one epoch) stopped at a gate."""
    print("\na deliberately worse candidate: the reference network after one epoch")
    materialize(
        "candidate_model", config={"ops": {"candidate_model": {"config": {"presets": ["reference"], "max_epochs": 1}}}}
    )
    worse = registry_of(store).version_for(CANDIDATE_ALIAS)
    if worse is not None and not gate(store, worse, daemon):
        record = required(registry_of(store).gate_record(worse), f"a gate record of v{worse}")
        print(f"v{worse} stays a candidate: {record.reason[:300]}")


def experiment(store: ObjectStore, daemon: bool) -> None:
    """Online A/B: Production and Staging behind the router, simulated clients, delayed
    feedback, the verdict, and a promotion that needs it."""
    registry = registry_of(store)
    production = registry.version_for(PRODUCTION_ALIAS)
    staging = required(registry.version_for(STAGING_ALIAS), "a Staging version for the experiment")
    print(f"\nA/B experiment: Production v{production} against Staging v{staging} (half the clients each)")
    with stage("A/B experiment (deploy both, traffic, feedback, verdict)"):
        deploy(store, daemon)
        traffic_with_feedback(
            store,
            ServingSettings.from_env().url,
            SHIFT,
            seed=len(registry.history()),
            seconds=15,
            name=f"demo-ab-v{staging}",
        )
        materialize("feedback,ab_report")
        verdict = registry_of(store).verdict(staging)
        if verdict is not None:
            print(f"  verdict: {verdict.evidence['verdict']} — {verdict.reason}")
    with stage("promotion"):
        promote(store)


def print_candidate() -> str:
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


def promotion(store: ObjectStore, version: str, daemon: bool) -> None:
    """Candidate → gates → Staging → (A/B) → Production, by the same jobs and assets as the UI."""
    print()
    registry = registry_of(store)
    first = registry.version_for(PRODUCTION_ALIAS) is None
    if version in (registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)):
        print(f"v{version} is already {registry.stage(version)}: nothing new to promote")
    else:
        with stage("gates"):
            passed = gate(store, version, daemon)
        if not passed:
            print(f"v{version} stays a candidate; Production is unchanged")
        elif first:
            with stage("promotion"):
                promote(store)
            with stage("a worse candidate stopped at a gate"):
                worse_candidate(store, daemon)
        else:
            experiment(store, daemon)


def serve(store: ObjectStore, daemon: bool) -> str:
    """Deploy what the registry says and send a few requests; the service's URL."""
    deploy(store, daemon)
    url = ServingSettings.from_env().url
    requests = Simulator.fit().generate(5, seed=99, batch_id="demo-traffic")
    traffic = next(iter(requests))
    print(f"\nPOST {url}/predict (simulated houses; X-Request-ID = row_id):")
    for row in traffic.iter_rows(named=True):
        body = {name: row[name] for name in FEATURES}
        _, reply = post_json(f"{url}/predict", body, {"X-Request-ID": row["row_id"]})
        prediction = required(reply, "a JSON reply")["response"]["prediction"]
        print(f"  {row['row_id']}: predicted {prediction:>12,.0f}   actual {row['price']:>12,.0f}")
    _, bad = post_json(
        f"{url}/predict",
        {**{name: traffic.row(0, named=True)[name] for name in FEATURES}, "bedrooms": 10},
        {"X-Request-ID": "demo-bad"},
    )
    refusal = required(bad, "a JSON refusal")
    print(f"  an invalid request (bedrooms 10) → {refusal['status']}: {refusal['message']}")
    return url


@contextmanager
def daemon(running: bool) -> Iterator[Path | None]:
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


def wait_for(what: str, found: Callable[[], T | None], log_path: Path | None) -> T:
    """Poll until the daemon's work shows `found()`; on timeout, fail naming what and where."""
    value = poll(found, WAIT_SECONDS, every=2)
    if value is None:
        tail = log_path.read_text().splitlines()[-15:] if log_path else ["(the running daemon's own log)"]
        raise SystemExit(
            f"gave up after {WAIT_SECONDS} s waiting for {what}; the daemon's log ends:\n" + "\n".join(tail)
        )
    return value


def materialized_since(instance: dg.DagsterInstance, asset: str, since: float) -> list[dg.EventLogRecord]:
    """`asset`'s materializations after `since` (epoch seconds), newest first."""
    return [r for r in instance.fetch_materializations(dg.AssetKey(asset), limit=50).records if r.timestamp > since]


def metadata_of(record: dg.EventLogRecord) -> dict:
    return (
        {k: v.value for k, v in record.asset_materialization.metadata.items()} if record.asset_materialization else {}
    )


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def traffic_with_feedback(
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
