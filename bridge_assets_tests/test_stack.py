"""The production-shaped stack (`make stack`, deploy/stack.py), run for real: PostgreSQL, an
MLflow server with S3 artifacts, moto's S3 server, a two-node Ray cluster, the Dagster
webserver, daemon and code location — started once for this module and stopped after it.

The loop runs through the stack's daemon and webserver (sensors, GraphQL); nothing is run
in-process. The tests read the results where production keeps them: Postgres tables, the
MLflow server's registry, the bucket, the cluster's processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import mlflow
import pandas as pd
import polars as pl
import psutil
import pytest

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import Simulator
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.landing import land_batch
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS, promote_to_production, read_audit
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.monitoring.monitor import unprofiled_objects
from bridge_assets.monitoring.profiles import list_log_objects
from bridge_assets_tests.conftest import LAKE_VARIABLES, _environment
from bridge_assets_tests.dagster_dev import artifacts_dir
from bridge_assets_tests.serving_support import pick_free_ports
from deploy import stack as stack_module
from deploy.stack import StackSettings
from serving.processes import listening, session_members

pytestmark = pytest.mark.stack  # `make test-stack` runs these alone

PRESETS = {"ops": {"candidate_model": {"config": {"presets": ["reference"], "max_epochs": 8, "seed": 3}}}}


def _wait_for(what: str, condition: Callable[[], object], timeout: float = 300.0, every: float = 2.0) -> object:
    """Poll until `condition()` is truthy or a frame (returned); fail naming `what`. Not a timed
    assertion: the deadline only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if isinstance(value, pl.DataFrame) or value:
            return value
        time.sleep(every)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def _clean_environment() -> dict[str, str]:
    """This process's environment without any lake, MLflow, Ray, Dagster or bridge setting."""
    drop = set(LAKE_VARIABLES) | {"RAY_ADDRESS", "DAGSTER_HOME"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("BRIDGE_", "DAGSTER_PG_"))}


def _psql(stack: stack_module.Stack, database: str, query: str) -> list[list[str]]:
    done = subprocess.run(
        [str(stack_module.postgres_bin() / "psql"), "-d", database, "-tA", "-F", "\t", "-c", query],
        env=stack_module._pg_env(stack), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in done.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def stack() -> Iterator[SimpleNamespace]:
    """The whole stack on free ports under a fresh folder (mode 755: the postgres user enters it)."""
    root = Path(tempfile.mkdtemp(prefix="bridge-stack-test-"))
    root.chmod(0o755)
    ray_port, serve_port = pick_free_ports(nodes=2)  # reserved: the suite's other process starts its own Rays
    env = _clean_environment() | {
        "BRIDGE_RAY_PORT": str(ray_port),
        "BRIDGE_SERVE_PORT": str(serve_port),
        "BRIDGE_HOME": str(root / "home"),
        "BRIDGE_STACK_DIR": str(root / "stack"),
        "BRIDGE_ENV_FILE": "",
        "BRIDGE_SENSOR_INTERVAL": "5",
        "BRIDGE_SERVE_LOG_FLUSH_SECONDS": "1",
        "BRIDGE_SERVE_REPLICAS": "2",
    }
    settings = StackSettings.from_env(env)
    try:
        running = stack_module.start(settings, base_env=env)
        yield SimpleNamespace(root=root, settings=settings, stack=running, base_env=env, env={**env, **running.env})
    finally:
        stack_module.stop(settings)
        logs = settings.directory / "logs"
        kept = Path(tempfile.gettempdir()) / f"{root.name}-logs"
        if logs.exists():  # the servers' logs outlive the stack, for a failure's story
            shutil.copytree(logs, kept, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def on_stack(stack: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """The stack's environment in this process (as `make demo` applies stack.env)."""
    with _environment(stack.env):
        yield stack


def _graphql(stack: SimpleNamespace):
    from dagster_graphql import DagsterGraphQLClient

    port = stack.stack.processes["dagster-webserver"]["port"]
    return DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)


def _materialize(stack: SimpleNamespace, asset: str, run_config: dict | None = None) -> str:
    """Submit an asset run to the stack's webserver and wait for it to succeed; its run id."""
    from dagster_graphql import DagsterGraphQLClientError

    client = _graphql(stack)
    run_id = client.submit_job_execution("__ASSET_JOB", run_config=run_config or {}, asset_selection=[dg.AssetKey(asset)])

    def finished() -> dg.DagsterRunStatus | None:
        try:
            status = client.get_run_status(run_id)
        except DagsterGraphQLClientError:
            return None
        return status if status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) else None

    status = _wait_for(f"run {run_id} of {asset}", finished, timeout=600)
    assert status == dg.DagsterRunStatus.SUCCESS, _failure(dg.DagsterInstance.get(), run_id)
    return run_id


def _deployment_run(stack: SimpleNamespace) -> str:
    """The run that deploys the new Production version: the daemon's registry sensor must start
    one when it sees the alias move (nothing else deploys here: a sensor that does not is a
    failure, not something this test makes up for)."""
    key = dg.AssetKey("production_deployment")
    instance = dg.DagsterInstance.get()

    def started() -> str | None:
        runs = [r for r in instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": "registry_sensor"}))]
        return runs[0].run_id if runs else None

    run_id = _wait_for("a production_deployment run started by registry_sensor", started, timeout=180)
    _wait_for(f"deployment run {run_id}", lambda: instance.get_run_by_id(run_id).is_finished, timeout=600)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS, _failure(instance, run_id)
    assert key in (instance.get_run_by_id(run_id).asset_selection or {key})
    return run_id


def _failure(instance: dg.DagsterInstance, run_id: str) -> str:
    """A failed run's error messages, for the assertion."""
    failed = [e for e in instance.all_logs(run_id) if e.is_dagster_event and e.dagster_event.is_failure]
    return f"run {run_id} failed: " + " | ".join(str(e.dagster_event.event_specific_data)[:1500] for e in failed)


def _materialized_partitions(asset: str) -> set[str]:
    return set(dg.DagsterInstance.get().get_materialized_partitions(dg.AssetKey(asset)))


def _post(url: str, body: dict, request_id: str, timeout: float = 10.0) -> int:
    request = urllib.request.Request(
        f"{url}/predict", json.dumps(body).encode(), {"Content-Type": "application/json", "X-Request-ID": request_id}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def _traffic_rows(rows: int, seed: int) -> list[dict]:
    frame = pl.concat(list(Simulator.fit().generate(rows, seed=seed, batch_id=f"traffic-{seed}")))
    return [{name: row[name] for name in FEATURES} | {"row_id": row["row_id"]} for row in frame.iter_rows(named=True)]


@pytest.fixture(scope="module")
def trained(stack: SimpleNamespace) -> SimpleNamespace:
    """land → raw → features (the daemon's sensors) → restart mid-loop → train (a run submitted
    to the webserver) → promote, all on the stack."""
    with _environment(stack.env):
        store = StorageSettings.from_env().open()
        simulator = Simulator.fit()
        land_batch(store, "stack-a", simulator.generate(1500, seed=21, batch_id="stack-a"))
        _wait_for("raw partitions of the first batches", lambda: "stack-a" in _materialized_partitions("raw_housing"))

        # Restart mid-loop: a batch lands while the daemon and webserver are down.
        stack_module.stop_dagster(stack.stack)
        land_batch(store, "stack-b", simulator.generate(1500, seed=22, batch_id="stack-b"))
        stack_module.start_dagster(stack.stack, stack.base_env)
        _wait_for("the batch landed during the restart", lambda: "stack-b" in _materialized_partitions("raw_housing"))
        features = FeatureStore(store)
        _wait_for("a feature version with every batch",
                  lambda: (latest := features.latest()) is not None and {"stack-a", "stack-b"} <= set(latest.batch_ids))  # fmt: skip

        train_run = _materialize(stack, "candidate_model", PRESETS)
        mlflow_settings = MlflowSettings.from_env()
        client = mlflow_settings.activate()
        (version,) = [v.version for v in client.search_model_versions(f"name='{mlflow_settings.model_name}'")]
        promote_to_production(client, mlflow_settings.model_name, version, store=store, reason="stack test")
    return SimpleNamespace(store=store, version=version, train_run=train_run, client=client, model_name=mlflow_settings.model_name)


@pytest.fixture(scope="module")
def loop(stack: SimpleNamespace, trained: SimpleNamespace) -> SimpleNamespace:
    """… → deploy (the daemon's registry sensor) → traffic → interaction logs."""
    store = trained.store
    with _environment(stack.env):
        deploy_run = _deployment_run(stack)

        url = f"http://127.0.0.1:{stack.env['BRIDGE_SERVE_PORT']}"
        rows = _traffic_rows(40, seed=5)
        statuses = {row["row_id"]: _post(url, {k: row[k] for k in FEATURES}, row["row_id"]) for row in rows}

        def traffic_logged() -> pl.DataFrame | None:
            frame = read_interactions(store).filter(pl.col("request_id").is_in(list(statuses)))
            return frame if frame.height >= len(statuses) else None

        logged = _wait_for("interaction records of the traffic", traffic_logged, timeout=120)
    return SimpleNamespace(**vars(trained), deploy_run=deploy_run, url=url, statuses=statuses, logged=logged)


def test_stack_writes_an_environment_of_documented_variables_only(stack: SimpleNamespace) -> None:
    """stack.env holds only variables the docs name, and every process the state records runs."""
    written = dict(line.split("=", 1) for line in stack.settings.env_file.read_text().splitlines())
    assert {"MLFLOW_TRACKING_URI", "BRIDGE_S3_BUCKET", "AWS_ENDPOINT_URL_S3", "DAGSTER_HOME", "RAY_ADDRESS"} <= set(written)
    documented = (Path(__file__).parents[1] / "docs" / "production.md").read_text()
    assert [name for name in written if f"`{name}`" not in documented] == []
    assert oct(stack.settings.env_file.stat().st_mode & 0o777) == "0o600"  # it holds generated credentials
    assert set(stack.stack.processes) == set(stack_module.COMPOSE_COUNTERPARTS)  # each has its compose service
    assert stack_module.status(stack.settings) and all(
        line.startswith("up") for name, line in stack_module.status(stack.settings).items() if name != "ray"
    )


def test_loop_runs_on_the_stack(stack: SimpleNamespace, loop: SimpleNamespace) -> None:
    """Runs and events in Postgres, the model in the server's registry, every object in the
    bucket, the service on both nodes, one interaction record per request."""
    assert set(loop.statuses.values()) == {200}
    assert sorted(loop.logged["request_id"].to_list()) == sorted(loop.statuses)

    runs = dict(_psql(stack.stack, "dagster", "SELECT run_id, status FROM runs"))
    assert runs[loop.train_run] == "SUCCESS" and runs[loop.deploy_run] == "SUCCESS"
    materialized = {row[0] for row in _psql(stack.stack, "dagster",
        "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")}  # fmt: skip
    assert {'["raw_housing"]', '["housing_features"]', '["candidate_model"]', '["production_deployment"]'} <= materialized

    registered = _psql(stack.stack, "mlflow", "SELECT name, version FROM model_versions")
    assert registered == [[loop.model_name, loop.version]]
    assert loop.client.get_model_version_by_alias(loop.model_name, PRODUCTION_ALIAS).version == loop.version

    client = stack_module.s3_client(stack.stack)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.settings.bucket)
            for o in page.get("Contents", [])]  # fmt: skip
    for prefix in ("lake/landing/", "lake/raw/valid/", "lake/features/housing/", "lake/interactions/", "lake/registry/audit/", "mlflow/"):
        assert any(key.startswith(prefix) for key in keys), f"nothing under s3://{stack.settings.bucket}/{prefix}"
    assert not (stack.root / "home" / "lake").exists()  # nothing went to the local lake
    assert not (stack.root / "home" / "mlflow").exists()

    replicas = {index: [p for p in _node_processes(stack, index) if "ServeReplica:bridge:PredictionService" in _name(p)]
                for index in (0, 1)}  # fmt: skip
    assert replicas[0] and replicas[1], f"replicas per node: { {i: len(r) for i, r in replicas.items()} }"


def test_restart_resumes_sensors_without_repeating_or_missing_a_batch_or_a_log_object(stack: SimpleNamespace, loop: SimpleNamespace) -> None:
    """The batch landed while the daemon was down ran once, none before it ran again; log
    objects written while it was down are profiled, and every log object exactly once."""
    with _environment(stack.env):
        instance = dg.DagsterInstance.get()
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": "landed_batches_sensor"}))
        per_batch: dict[str, int] = {}
        for run in runs:
            per_batch[run.tags["dagster/partition"]] = per_batch.get(run.tags["dagster/partition"], 0) + 1
        assert per_batch == {"stack-a": 1, "stack-b": 1}
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)

        before = set(list_log_objects(loop.store))
        stack_module.stop_dagster(stack.stack)
        rows = _traffic_rows(20, seed=7)
        assert {_post(loop.url, {k: row[k] for k in FEATURES}, f"{row['row_id']}-down") for row in rows} == {200}
        _wait_for("log objects written while the daemon is down", lambda: set(list_log_objects(loop.store)) - before, timeout=60)
        stack_module.start_dagster(stack.stack, stack.base_env)
        objects = _wait_for("every log object profiled",
                            lambda: list_log_objects(loop.store) if not unprofiled_objects(loop.store) else None, timeout=300)  # fmt: skip

        def profiling_recorded() -> list | None:
            """The runs' materializations, once they account for every object: a run writes its
            profiles to the lake during its step, and Dagster records the event when it ends."""
            records = instance.fetch_materializations(dg.AssetKey("interaction_profiles"), limit=1000).records
            metadata = [r.asset_materialization.metadata for r in records if r.asset_materialization]
            return metadata if sum(m["objects_profiled"].value for m in metadata) >= len(objects) else None

        profiles = _wait_for("the profiling runs' materializations", profiling_recorded, timeout=120)
    assert len(objects) > len(before)
    assert sum(m["objects_profiled"].value for m in profiles) == len(objects)  # none missed, none twice
    assert sum(m["objects_already_done"].value for m in profiles) == 0  # no object requested again


def test_backup_restores_into_a_fresh_stack(stack: SimpleNamespace, loop: SimpleNamespace, tmp_path: Path) -> None:
    """pg_dump of both databases + the bucket, restored into a fresh Postgres, S3 and MLflow
    server: the same versions, aliases, tags, runs and audit trail."""
    with _environment(stack.env):  # a quiescent point: the promotion's last write (the monitoring reference) is done
        _wait_for("the Production version's monitoring reference", lambda: loop.version in _materialized_partitions("model_reference"))
    runs_query = "SELECT run_id, status FROM runs"
    runs_before = dict(_psql(stack.stack, "dagster", runs_query))  # the daemon goes on launching runs
    backup = stack_module.backup(stack.stack, tmp_path / "backup")
    fresh_root = Path(tempfile.mkdtemp(prefix="bridge-restore-test-"))
    fresh_root.chmod(0o755)
    fresh = StackSettings.for_components({**stack.base_env, "BRIDGE_STACK_DIR": str(fresh_root / "stack")}, ("postgres", "s3", "mlflow"))
    try:
        restored = stack_module.start(fresh, restore_from=backup)
        assert restored.env["MLFLOW_TRACKING_URI"] != stack.env["MLFLOW_TRACKING_URI"]

        def registry(env: dict[str, str]) -> dict:
            with _environment(env):
                settings = MlflowSettings.from_env()
                client = settings.activate()
                store = StorageSettings.from_env().open()
                model = client.get_registered_model(settings.model_name)
                versions = {v.version: (v.run_id, dict(v.tags), v.source) for v in client.search_model_versions(f"name='{settings.model_name}'")}
                runs = {r.info.run_id: (r.data.metrics, r.data.params) for r in client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id])}
                artifacts = sorted(a.path for a in client.list_artifacts(next(iter(versions.values()))[0]))
                audit = [r.to_json() for r in read_audit(store, settings.model_name)]
            return {"aliases": dict(model.aliases), "versions": versions, "runs": runs, "artifacts": artifacts, "audit": audit}

        before, after = registry(stack.env), registry({**stack.base_env, **restored.env})
        assert after == before
        assert before["aliases"][PRODUCTION_ALIAS] == loop.version
        assert before["audit"]  # the promotion's record came back too
        runs_restored = dict(_psql(restored, "dagster", runs_query))
        runs_after = dict(_psql(stack.stack, "dagster", runs_query))
        assert set(runs_before) <= set(runs_restored) <= set(runs_after)
        finished = ("SUCCESS", "FAILURE", "CANCELED")
        assert {r: s for r, s in runs_before.items() if s in finished} == {r: runs_restored[r] for r, s in runs_before.items() if s in finished}
    finally:
        stack_module.stop(fresh)
        shutil.rmtree(fresh_root, ignore_errors=True)


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _executable(process: psutil.Process) -> str:
    """The process's name; "" once it has exited."""
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def _node_processes(stack: SimpleNamespace, index: int) -> list[psutil.Process]:
    """Node `index`'s raylet and everything under it (its workers, replicas, proxy), found by the
    node's recorded session; the head's processes are never among them."""
    node = next(n for n in stack.stack.processes["ray"]["nodes"] if n["index"] == index)
    return session_members(node["sid"], node["started_at"], descendants=True)


def test_service_survives_the_worker_node(stack: SimpleNamespace, loop: SimpleNamespace) -> None:
    """Under continuous load the worker node's raylet and workers are SIGKILLed: the head keeps
    answering; the failures are few (at most two per client: the request in flight and one sent
    before the proxies notice) and all around the kill; every 2xx reply has exactly one
    interaction record."""
    worker = _node_processes(stack, 1)
    head = _node_processes(stack, 0)
    head_raylets = [p for p in head if _executable(p) == "raylet"]  # a node's workers come and go; its raylet stays
    assert any(_executable(p) == "raylet" for p in worker) and head_raylets
    assert not {p.pid for p in worker} & {p.pid for p in head}

    rows = _traffic_rows(100, seed=6)
    replies: list[tuple[str, int, bool]] = []  # request id, status, sent after the kill
    connection_failures: list[str] = []
    failed_at: list[float] = []  # when each failing request was sent (monotonic)
    killed, done = threading.Event(), threading.Event()

    def client(name: int) -> None:
        n = 0
        while not done.is_set():
            row = rows[n % len(rows)]
            request_id, n = f"{row['row_id']}-c{name}-{n}", n + 1
            after_kill, sent = killed.is_set(), time.monotonic()
            try:
                status = _post(loop.url, {k: row[k] for k in FEATURES}, request_id, timeout=30)
            except OSError:
                connection_failures.append(request_id)
                status = 0
            else:
                replies.append((request_id, status, after_kill))
            if status != 200:
                failed_at.append(sent)

    threads = [threading.Thread(target=client, args=(name,)) for name in range(4)]
    for thread in threads:
        thread.start()
    try:
        _wait_for("traffic before the failure", lambda: len(replies) >= 40, timeout=120, every=0.2)
        kill_started = time.monotonic()
        for process in worker:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(worker, timeout=10)
        killed.set()
        _wait_for("traffic after the failure", lambda: sum(r[2] for r in replies) >= 100, timeout=300, every=0.5)
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)

    assert all(p.is_running() for p in head_raylets)
    answered = [request_id for request_id, status, _ in replies if status == 200]
    after = [status for _, status, after_kill in replies if after_kill]
    assert after.count(200) >= 90, f"after the kill: {after.count(200)} of {len(after)} answered 200"
    assert len(failed_at) <= 2 * len(threads), f"{len(failed_at)} failed requests around the kill"
    assert all(-5 < sent - kill_started < 30 for sent in failed_at), [round(sent - kill_started, 1) for sent in failed_at]
    figures = (f"node failure: {len(answered)} answered 200 ({after.count(200)} after the kill), {len(connection_failures)} "
               f"connection-level failures, {sum(status != 200 for _, status, _ in replies)} other replies\n")  # fmt: skip
    (artifacts_dir() / "stack-node-failure.txt").write_text(figures)  # the README's reliability figures

    with _environment(stack.env):
        def logged() -> pl.DataFrame | None:
            frame = read_interactions(loop.store).filter(pl.col("request_id").is_in(answered))
            return frame if frame.height >= len(answered) else None

        frame = _wait_for("one interaction record per 2xx reply", logged, timeout=180)
    counts = frame.group_by("request_id").len()
    assert counts.height == len(answered) and counts["len"].max() == 1


def test_a_stopped_stack_starts_again_with_every_object(stack: SimpleNamespace, loop: SimpleNamespace) -> None:
    """`make stack-stop` then `make stack`: the bucket's objects are files, so every batch,
    feature version, model artifact and interaction record is there again, and the registered
    model loads through the restarted MLflow server. Last in the module: it restarts the stack."""

    def objects(running: stack_module.Stack) -> dict[str, str]:
        client = stack_module.s3_client(running)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.settings.bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    in_flight = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    with _environment(stack.env):  # quiescent: the promotion's last write is done
        _wait_for("the Production version's monitoring reference", lambda: loop.version in _materialized_partitions("model_reference"))
        stack_module.stop_dagster(stack.stack)  # no new runs; the runs it launched go on, so wait for them
        instance = dg.DagsterInstance.get()
        _wait_for("the launched runs to end", lambda: not instance.get_runs_count(dg.RunsFilter(statuses=in_flight)), timeout=300)
    before = objects(stack.stack)
    for prefix in ("lake/landing/batches/", "lake/features/housing/versions/", "lake/interactions/", "mlflow/"):
        assert any(key.startswith(prefix) for key in before), prefix
    stack_module.stop(stack.settings)
    assert not listening(stack.stack.processes["s3"]["port"])  # the S3 server really went
    restarted = stack_module.start(stack.settings, base_env=stack.base_env)
    after = objects(restarted)
    lost = {key: (etag, after.get(key)) for key, etag in before.items() if after.get(key) != etag}
    assert not lost, f"{len(lost)} of {len(before)} objects missing or changed (ETag before, after): {dict(list(lost.items())[:8])}"
    with _environment({**stack.base_env, **restarted.env}):
        MlflowSettings.from_env().activate()  # the restarted server (a new port): MLflow's URI is process-wide
        model = mlflow.pyfunc.load_model(f"models:/{loop.model_name}/{loop.version}")  # its artifacts, read back
        houses = pd.DataFrame([{name: row[name] for name in FEATURES} for row in _traffic_rows(3, seed=9)])
        assert model.predict(houses).min() > 0
