"""The loop against a running `dagster dev` (webserver and daemon as real processes), seen
only through its GraphQL API: data lands in the lake as `bridge simulate` lands it, the real sensors validate it
and build the feature table, and a training round launched over GraphQL registers a version.
Nothing here calls an asset; the `first_round` fixture drives the loop, the tests read it back,
and `bridge train` registers a candidate outside Dagster that the candidates sensor gates.
"""

import json
import subprocess
import sys

import requests
from mlflow.tracking import MlflowClient

from bridge_assets.core.contract import ROW_ID
from bridge_assets.core.simulator import simulate
from bridge_assets.lake.raw import quarantine_key
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.registry import CANDIDATE_ALIAS, Registry, promote_to_production
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets_tests.dagster_dev import (
    CORRUPT_FRACTION,
    SIM_BATCH,
    SIM_ROWS,
    SIM_SEED,
    DagsterDev,
    FirstRound,
    materializations,
    run_tags,
)

LOCATION = "bridge_assets.definitions:defs"
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
AUTOMATION = """
query($repo: RepositorySelector!) { repositoryOrError(repositorySelector: $repo) { ... on Repository {
  sensors { name minIntervalSeconds sensorState { status } }
  schedules { name cronSchedule executionTimezone scheduleState { status } }
} } }
"""
SENSOR_TICKS = """
query($sensor: SensorSelector!) { sensorOrError(sensorSelector: $sensor) { ... on Sensor {
  sensorState { ticks(limit: 200) { status runIds skipReason } }
} } }
"""
CHECK_EXECUTIONS = """
query($key: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $check, limit: 50) { runId status evaluation { success } }
}
"""
CHECKS = """
query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  groupName
  freshnessStatusInfo { freshnessStatus }
  assetChecksOrError { ... on AssetChecks { checks { name blocking
    executionForLatestMaterialization { status runId evaluation { success severity } } } } }
} } }
"""


def _successful_ticks(dev: DagsterDev, sensor: str) -> list[dict]:
    data = dev.graphql(SENSOR_TICKS, {"sensor": {**REPOSITORY, "sensorName": sensor}})
    return [t for t in data["sensorOrError"]["sensorState"]["ticks"] if t["status"] == "SUCCESS"]


def _checks(dev: DagsterDev, asset: str) -> tuple[dict, dict[str, dict]]:
    node = dev.graphql(CHECKS, {"key": {"path": [asset]}})["assetNodeOrError"]
    return node, {c["name"]: c for c in node["assetChecksOrError"]["checks"]}


def test_every_sensor_and_schedule_runs_by_default_with_intervals_from_the_environment(dagster_dev: DagsterDev):
    repository = dagster_dev.graphql(AUTOMATION, {"repo": REPOSITORY})["repositoryOrError"]
    sensors = {s["name"]: s for s in repository["sensors"]}
    assert {"landed_batches_sensor", "feature_backlog_sensor", "bridge_automation"} <= set(sensors)
    stopped = [name for name, s in sensors.items() if s["sensorState"]["status"] != "RUNNING"]
    assert not stopped, f"sensors a user would have to switch on by hand: {stopped}"
    # The harness shortened some sensors through the environment; the rest keep their defaults.
    assert {sensors[name]["minIntervalSeconds"] for name in ("landed_batches_sensor", "feature_backlog_sensor", "registry_sensor")} == {5}
    assert sensors["bridge_automation"]["minIntervalSeconds"] == 30
    schedules = {s["name"]: s for s in repository["schedules"]}
    training = schedules["training_round_schedule"]
    assert training["scheduleState"]["status"] == "RUNNING"
    assert (training["cronSchedule"], training["executionTimezone"]) == ("0 3 * * 1", "UTC")


def test_landed_batches_become_raw_partitions_through_the_landing_sensor(dagster_dev: DagsterDev, first_round: FirstRound):
    raw = first_round.raw
    assert set(raw) == set(first_round.batches)
    requested = {run_id for tick in _successful_ticks(dagster_dev, "landed_batches_sensor") for run_id in tick["runIds"]}
    for batch_id, event in raw.items():
        assert event.run_id in requested, f"{batch_id} was not materialized by a landing-sensor run"
        tags = run_tags(dagster_dev, event.run_id)
        assert (tags["dagster/sensor_name"], tags["dagster/partition"], tags["dagster/run_key"]) == (
            "landed_batches_sensor", batch_id, batch_id,
        )  # fmt: skip
    simulated = raw[SIM_BATCH].metadata
    assert simulated["rows_landed"] == SIM_ROWS
    # The rows the simulator broke, found without the contract: where the batch differs from the
    # same seed generated clean. Exactly those are quarantined, and every other row is valid.
    clean, dirty = (simulate(SIM_ROWS, seed=SIM_SEED, batch_id=SIM_BATCH, corrupt_fraction=f) for f in (0.0, CORRUPT_FRACTION))
    broken = {d[0] for d, c in zip(dirty.rows(), clean.rows(), strict=True) if d != c}
    assert len(broken) > 0 and simulated["rows_quarantined"] == len(broken)
    assert simulated["rows_valid"] == SIM_ROWS - len(broken)
    quarantined = StorageSettings.from_env(dagster_dev.env).open().scan_parquet([quarantine_key(SIM_BATCH)]).collect()
    assert set(quarantined[ROW_ID]) == broken
    node, checks = _checks(dagster_dev, "raw_housing")
    assert node["groupName"] == "ingestion"
    assert checks["quarantine_rate"]["executionForLatestMaterialization"]["status"] == "SUCCEEDED"


def test_the_backlog_sensor_builds_a_feature_version_holding_every_batch(dagster_dev: DagsterDev, first_round: FirstRound):
    features = first_round.features
    assert run_tags(dagster_dev, features.run_id)["dagster/sensor_name"] == "feature_backlog_sensor"
    assert features.run_id in {r for t in _successful_ticks(dagster_dev, "feature_backlog_sensor") for r in t["runIds"]}
    metadata = features.metadata
    assert metadata["published"] is True
    valid_rows = sum(event.metadata["rows_valid"] for event in first_round.raw.values())
    assert metadata["rows"] == valid_rows - metadata["duplicates_dropped"] > 0
    assert sum(metadata["rows_per_split"].values()) == metadata["rows"]
    assert set(metadata["batches"]) == set(first_round.batches)
    node, checks = _checks(dagster_dev, "housing_features")
    assert node["groupName"] == "features"
    for name in ("schema", "no_nulls", "row_count"):  # in the run that built this version (a later one may be running)
        executions = dagster_dev.graphql(CHECK_EXECUTIONS, {"key": {"path": ["housing_features"]}, "check": name})
        (execution,) = [e for e in executions["assetCheckExecutions"] if e["runId"] == features.run_id]
        assert checks[name]["blocking"] and execution["status"] == "SUCCEEDED", (name, execution)
    # Just built, well inside its freshness window (the daemon evaluates it on its own loop).
    assert node["freshnessStatusInfo"]["freshnessStatus"] in {"HEALTHY", "UNKNOWN"}


def test_a_training_round_launched_through_graphql_registers_a_version(dagster_dev: DagsterDev, first_round: FirstRound):
    assert first_round.training_status == "SUCCESS", dagster_dev.log_tail()
    candidate = first_round.candidate
    assert candidate is not None, "the training run succeeded but reported no candidate_model materialization"
    metadata = candidate.metadata
    assert metadata["feature_version"] == first_round.features.metadata["version"]
    assert metadata["best_config"] == "reference"
    assert "baseline: linear" in metadata["metrics"] and metadata["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    settings = MlflowSettings.from_env(dagster_dev.env)
    client = MlflowClient(settings.tracking_uri)
    version = client.get_model_version(settings.model_name, str(metadata["model_version"]))
    assert version.tags["bridge.feature_version"] == metadata["feature_version"]
    assert metadata["model_uri"] == f"models:/{settings.model_name}/{version.version}"
    assert run_tags(dagster_dev, first_round.training_run_id)["bridge/test"] == "e2e"


def test_a_candidate_registered_by_the_cli_meets_the_gates_through_the_candidates_sensor(dagster_dev: DagsterDev, first_round: FirstRound):
    """`bridge train` registers outside Dagster; with `dagster dev` running, the gates still run."""
    assert first_round.training_status == "SUCCESS", dagster_dev.log_tail()
    settings = MlflowSettings.from_env(dagster_dev.env)
    registry = Registry(MlflowClient(settings.tracking_uri), settings.model_name, StorageSettings.from_env(dagster_dev.env).open())
    first = str(first_round.candidate.metadata["model_version"])  # the automation gates it: let it finish first
    dagster_dev.wait_until(lambda: registry.gate_record(first), 300, f"the automation's gate record for v{first}", every=3.0)
    trained = subprocess.run(
        [sys.executable, "-m", "bridge_assets.cli", "train", "--preset", "reference", "--max-epochs", "4"],
        env=dagster_dev.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0 and "candidates_sensor" in trained.stdout, trained.stdout + trained.stderr
    version = registry.version_for(CANDIDATE_ALIAS)
    assert version is not None and version != first
    def staged() -> list | None:
        found = [m for m in materializations(dagster_dev, "staged_model") if m.metadata["model_version"] == version]
        return found or None

    (judged_in,) = dagster_dev.wait_until(staged, 300, f"staged_model for CLI-trained v{version}", every=3.0)
    assert registry.gate_record(version).actor == f"dagster run {judged_in.run_id[:8]} (sensor candidates_sensor)"
    assert run_tags(dagster_dev, judged_in.run_id)["bridge/candidate"] == version


# A deploy by hand, outside Dagster. The sensor may put Production back before this deploy has
# seen its own version answer (its wait then times out): that race is the behaviour under test,
# so the deploy's confirmation is not required; the sensor's deployment run is.
HAND_DEPLOY = """
import sys
from serving.deploy import deploy
try:
    deploy(sys.argv[1], sys.argv[2], None)
except TimeoutError as unconfirmed:
    print(f"hand deploy not confirmed: {unconfirmed}")
"""


def test_the_running_daemon_follows_what_serve_serves_not_what_it_last_deployed(dagster_dev: DagsterDev, first_round: FirstRound):
    """With `dagster dev` running, registry_sensor reads the service itself: with nothing
    serving, `serving_matches_registry` fails (and nothing is started behind people's backs);
    `make serve` brings it in line; a version deployed by hand is put back by a deployment the
    sensor launches; `make stop` is reported again."""
    assert first_round.candidate is not None, dagster_dev.log_tail()
    settings = MlflowSettings.from_env(dagster_dev.env)
    client = settings.activate()  # the registry resolves a version's logged model through the tracking store
    store = StorageSettings.from_env(dagster_dev.env).open()
    production = str(first_round.candidate.metadata["model_version"])
    registered = client.get_model_version(settings.model_name, production)
    other = str(client.create_model_version(settings.model_name, registered.source, registered.run_id, tags=registered.tags).version)
    url = f"http://127.0.0.1:{dagster_dev.env['BRIDGE_SERVE_PORT']}"
    key = {"path": ["production_deployment"]}

    def check_outcomes() -> list[bool]:
        """`serving_matches_registry`'s evaluations, newest first."""
        data = dagster_dev.graphql(CHECK_EXECUTIONS, {"key": key, "check": "serving_matches_registry"})
        return [e["evaluation"]["success"] for e in data["assetCheckExecutions"] if e["evaluation"]]

    def reported(passed: bool, after: int) -> bool | None:
        """A new evaluation (beyond the `after` seen before) that came out `passed`."""
        outcomes = check_outcomes()
        return True if len(outcomes) > after and outcomes[0] is passed else None

    def served() -> str | None:
        try:
            return str(requests.get(f"{url}/model", timeout=5).json()["response"]["model_version"])
        except (requests.RequestException, KeyError, ValueError):
            return None

    def bridge(*command: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, *command], env=dagster_dev.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    seen = len(check_outcomes())
    promote_to_production(client, settings.model_name, production, store=store, reason="e2e: deployment follows Serve")
    try:
        dagster_dev.wait_until(lambda: reported(False, seen), 120, "the unserved Production reported", every=2.0)
        assert served() is None  # nothing started behind people's backs:
        assert not [r for t in _successful_ticks(dagster_dev, "registry_sensor") for r in t["runIds"]]

        seen = len(check_outcomes())
        bridge("-m", "serving.deploy")  # `make serve`
        assert served() == production
        dagster_dev.wait_until(lambda: reported(True, seen), 120, "the service reported in line")

        launched = {r for t in _successful_ticks(dagster_dev, "registry_sensor") for r in t["runIds"]}
        bridge("-c", HAND_DEPLOY, settings.model_name, other)  # by hand, outside Dagster
        run_id = dagster_dev.wait_until(
            lambda: next((r for t in _successful_ticks(dagster_dev, "registry_sensor") for r in t["runIds"] if r not in launched), None),
            120, f"a production_deployment launched for the hand-deployed v{other}",
        )  # fmt: skip
        assert json.loads(run_tags(dagster_dev, run_id)["bridge/served"]) == {"production": other}  # what it saw
        assert dagster_dev.wait_for_run(run_id) == "SUCCESS", dagster_dev.log_tail()
        assert served() == production  # put back

        seen = len(check_outcomes())
        bridge("-m", "serving.deploy", "stop")  # `make stop`
        dagster_dev.wait_until(lambda: reported(False, seen), 120, "the stopped service reported")
    finally:
        subprocess.run([sys.executable, "-m", "serving.deploy", "stop"], env=dagster_dev.env, capture_output=True, timeout=300)
