"""The `bridge` CLI and `make demo`'s job, run as the user runs them: in subprocesses."""

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest

from bridge_assets.lake.feature_store import build_features
from bridge_assets.lake.landing import land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.lake.settings import PROJECT_ROOT, StorageSettings, bridge_home
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS, Registry
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets_tests.dagster_dev import artifacts_dir
from bridge_assets_tests.serving_support import pick_free_ports


def bridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge_assets.cli", *args], env={**os.environ, **env}, capture_output=True, text=True
    )


def test_cli_lands_batches_and_withheld_labels_from_another_process(lake_env):
    landed = bridge(lake_env, "simulate", "--rows", "3000", "--seed", "4", "--batch-id", "cli-b", "--withhold-labels", "--quiet")
    assert landed.returncode == 0, landed.stderr
    assert "landed 3000 rows as batch cli-b" in landed.stdout
    store = StorageSettings.from_env(lake_env).open()
    batch = store.scan_parquet(["landing/batches/cli-b/data.parquet"]).collect()
    assert batch.height == 3000 and "price" not in batch.columns
    assert not store.exists("landing/labels/cli-b/labels.parquet")

    released = bridge(lake_env, "release-labels", "cli-b")
    assert released.returncode == 0, released.stderr
    labels = store.scan_parquet(["landing/labels/cli-b/labels.parquet"]).collect()
    assert labels.columns == ["row_id", "price"] and labels["row_id"].to_list() == batch["row_id"].to_list()

    again = bridge(lake_env, "simulate", "--rows", "10", "--batch-id", "cli-b", "--quiet")
    assert again.returncode == 2 and "already landed" in again.stderr


def test_simulate_draws_a_new_seed_and_warns_when_it_repeats_a_batch(lake_env):
    first, second = (bridge(lake_env, "simulate", "--rows", "500", "--quiet") for _ in range(2))
    seeds = [out.stdout.split("(seed ")[1].split(")")[0] for out in (first, second)]
    assert first.returncode == second.returncode == 0 and seeds[0] != seeds[1]  # new rows by default
    assert "WARNING" not in first.stderr + second.stderr

    repeat = bridge(lake_env, "simulate", "--rows", "500", "--seed", seeds[0], "--batch-id", "again", "--quiet")
    assert repeat.returncode == 0 and "WARNING: batch again repeats the rows of sim-" in repeat.stderr
    store = StorageSettings.from_env(lake_env).open()
    recorded = json.loads(store.get_text("landing/batches/again/simulation.json"))
    assert recorded["recipe"]["seed"] == int(seeds[0]) and recorded["rows"] == 500


def test_release_labels_twice_is_refused_with_the_place(lake_env):
    assert bridge(lake_env, "simulate", "--rows", "50", "--batch-id", "twice", "--withhold-labels", "--quiet").returncode == 0
    assert bridge(lake_env, "release-labels", "twice").returncode == 0
    again = bridge(lake_env, "release-labels", "twice")
    assert again.returncode == 2 and "already landed" in again.stderr and "labels/twice/labels.parquet" in again.stderr


def test_features_command_lists_newest_first_describes_and_reports_sql_errors(lake_env):
    store = StorageSettings.from_env(lake_env).open()
    empty = bridge(lake_env, "features")
    assert empty.returncode == 1 and store.uri("features/housing/") in empty.stderr  # names where it looked
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    first = build_features(store).version
    time.sleep(1.1)  # created_at has second resolution
    assert bridge(lake_env, "simulate", "--rows", "300", "--batch-id", "zz-later", "--quiet").returncode == 0
    validate_batch(store, next(b for b in landed_batches(store) if b.batch_id == "zz-later"))
    newer = build_features(store).version

    listed = bridge(lake_env, "features").stdout.splitlines()
    assert [line[2:].split()[0] for line in listed] == [newer.version, first.version] and listed[0].startswith("*")
    described = bridge(lake_env, "features", "--version", first.version)
    assert described.returncode == 0 and f"rows {first.rows}" in described.stdout and "part housing-seed" in described.stdout
    typo = bridge(lake_env, "features", "--sql", "SELEC count(*) FROM features")
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 1 and "syntax error" in typo.stderr
    counted = bridge(lake_env, "features", "--version", first.version, "--sql", "SELECT count(*) AS n FROM features")
    assert counted.returncode == 0 and str(first.rows) in counted.stdout
    unknown = bridge(lake_env, "features", "--version", "nope")
    assert (unknown.returncode, unknown.stderr) == (2, "bridge: feature table 'housing' has no version 'nope'\n")


def test_home_is_anchored_to_the_project_not_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bridge_home({}) == PROJECT_ROOT / ".bridge"
    assert bridge_home({"BRIDGE_HOME": "~/elsewhere"}) == Path.home() / "elsewhere"


def test_every_entry_point_reads_the_same_env_file(tmp_path):
    home = tmp_path / "from-dotenv"
    dotenv = tmp_path / "project.env"
    dotenv.write_text(f"BRIDGE_HOME={home}\nBRIDGE_MODEL_NAME=from-dotenv-model\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_", "DAGSTER_HOME", "MLFLOW_"))}
    env["BRIDGE_ENV_FILE"] = str(dotenv)
    run = lambda *args: subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    listed = run(sys.executable, "-m", "bridge_assets.cli", "features")
    assert listed.returncode == 1 and str(home / "lake") in listed.stderr  # the CLI read BRIDGE_HOME from .env
    code = "from bridge_assets.lake.settings import load_environment; load_environment(); import os; " \
           "from bridge_assets.ml.tracking import MlflowSettings; print(MlflowSettings.from_env().model_name, os.environ['DAGSTER_HOME'])"
    shown = run(sys.executable, "-c", code)
    assert shown.stdout.split() == ["from-dotenv-model", str(home / "dagster")]  # what serving.deploy and the demo call
    runs = run(sys.executable, "-m", "bridge_assets.cli", "dagster", "run", "list")
    assert runs.returncode == 0 and f"DAGSTER_HOME={home / 'dagster'}" in runs.stderr, runs.stderr[-2000:]
    instance = (home / "dagster" / "dagster.yaml").read_text()
    assert "telemetry:\n  enabled: false" in instance  # the embedded instance sends nothing home


def test_cli_rejects_bad_drift_with_a_message(lake_env):
    result = bridge(lake_env, "simulate", "--rows", "10", "--shift", "garden=1", "--quiet")
    assert result.returncode == 2 and "unknown feature" in result.stderr


def test_cli_says_when_there_is_nothing_and_hands_dagster_its_own_arguments(lake_env):
    history = bridge(lake_env, "history", "--version", "99")
    assert history.returncode == 1 and history.stderr.endswith("\nbridge: no audit records for housing-price v99\n")
    dagster_help = bridge(lake_env, "dagster", "--help")
    assert dagster_help.returncode == 0 and "asset" in dagster_help.stdout and "release-feedback" not in dagster_help.stdout
    simulate_help = bridge(lake_env, "simulate", "--help").stdout
    assert "rows in the batch (default: 10000)" in " ".join(simulate_help.split())


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A fresh `.bridge` for `make demo`'s job, as a user's first run finds it; the two demo
    tests run it twice in a row there."""
    root = tmp_path_factory.mktemp("demo")
    home = root / "bridge"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_", "MLFLOW_", "DAGSTER_"))}
    env.update(BRIDGE_ENV_FILE="", BRIDGE_HOME=str(home), DAGSTER_HOME=str(dagster_home), BRIDGE_RAY_TMPDIR=f"/tmp/bridge-ray-{os.getpid()}")
    env["BRIDGE_RAY_PORT"], env["BRIDGE_SERVE_PORT"] = map(str, pick_free_ports())
    # `make test` runs the demo beside the rest of the suite on two cores: single-row calls there
    # reach a p99 of 270 ms (measured, CPU waits already not counted), beyond the 250 ms a laptop
    # alone never nears (15-30 ms). The budget a team sets is a setting; this one fits the box.
    env["BRIDGE_GATE_LATENCY_P99_MS"] = "1000"
    yield SimpleNamespace(root=root, home=home, dagster_home=dagster_home, env=env)


def _run_demo(demo_home: SimpleNamespace, name: str) -> str:
    """`make demo`'s job; its whole output is kept in the test artifacts (a failed assertion
    shows only a slice of it)."""
    demo = subprocess.run([sys.executable, "-m", "bridge_assets.demo"], env=demo_home.env, capture_output=True, text=True, cwd=demo_home.root)
    (artifacts_dir() / f"{name}.log").write_text(demo.stdout + "\n--- stderr\n" + demo.stderr)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    return demo.stdout


def _section(stdout: str, start: str, lines: int = 12) -> str:
    """The demo's lines from the first that contains `start`: what a failed assertion shows."""
    printed = stdout.splitlines()
    first = next((i for i, line in enumerate(printed) if start in line), max(len(printed) - lines, 0))
    return "\n".join(printed[first : first + lines])


def test_demo_closes_the_loop_through_the_daemon_into_the_ui_instance(demo_home: SimpleNamespace, monkeypatch):
    home, dagster_home = demo_home.home, demo_home.dagster_home
    demo = SimpleNamespace(stdout=_run_demo(demo_home, "demo-first-run"))
    assert "reference split of the real data (DuckDB): {'train': 348, 'test': 109, 'validation': 88}" in demo.stdout

    quarantine = pl.read_parquet(home / "lake" / "raw" / "quarantine" / "demo-sim-s7" / "rows.parquet")
    assert f"quarantined from demo-sim-s7: {quarantine.height} rows" in demo.stdout

    # First half: candidate → gates → Staging → Production; a worse candidate stopped at a gate.
    assert "candidate model: models:/housing-price/1 " in demo.stdout and "baseline: log-linear" in demo.stdout
    assert "gates of v1: every gate passed" in demo.stdout and "v1 is Production" in demo.stdout
    assert "v2 stays a candidate:" in demo.stdout  # the one-epoch network, with the gate's reason
    assert "an invalid request (bedrooms 10) → 422: invalid input: bedrooms" in demo.stdout
    # Second half: drifted traffic → decay detected → feedback batch → automatic retraining →
    # gates → the new candidate served beside Production.
    assert "v1/production: realised decay" in demo.stdout
    assert "with feedback-" in demo.stdout and "→ candidate v3" in demo.stdout
    # The price rise is a level shift: the policy's first, cheapest action recalibrates
    # Production on the labelled traffic, the new version passes every gate and is served
    # beside Production, and it recovers most of the decay on the same post-rise rows.
    assert "v3 is recalibrate:" in demo.stdout
    assert "gates of v3: every gate passed" in demo.stdout, _section(demo.stdout, "gates of v3")
    assert "serving {'production': '1', 'staging': '3'}" in demo.stdout, _section(demo.stdout, "registry_sensor serves the new version")
    (figures,) = [line for line in demo.stdout.splitlines() if "post-rise test rows: Production v1 RMSE" in line]
    ratio = float(figures.split(" × v1's")[0].rsplit(" = ", 1)[1])
    assert ratio <= 0.6, figures  # the issue's goal: new RMSE at most 0.6 x v1's
    (recovered,) = [line for line in demo.stdout.splitlines() if "decay recovered: " in line]
    assert int(recovered.split("decay recovered: ")[1].split("%")[0]) >= 80, recovered
    assert "time per stage: " in demo.stdout and "daemon: automatic retraining" in demo.stdout

    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with dg.DagsterInstance.get() as instance:
        raw = instance.get_materialized_partitions(dg.AssetKey("raw_housing"))
        assert {"housing-seed", "demo-sim-s7"} < raw and any(p.startswith("feedback-") for p in raw)
        first = instance.fetch_materializations(dg.AssetKey("housing_features"), limit=10, ascending=True).records[0]
        version = first.asset_materialization.metadata["version"].value
        # The second half ran in the daemon: each step was launched by its sensor or automation.
        launched = {
            asset: {run_tags(instance, r.run_id).get("dagster/sensor_name") for r in instance.fetch_materializations(dg.AssetKey(asset), limit=20).records}
            for asset in ("interaction_profiles", "drift_report", "candidate_model", "staged_model", "production_deployment")
        }  # fmt: skip
    assert "interaction_logs_sensor" in launched["interaction_profiles"] and "monitor_windows_sensor" in launched["drift_report"]
    assert "retrain_sensor" in launched["candidate_model"] and "bridge_automation" in launched["staged_model"]
    assert "registry_sensor" in launched["production_deployment"]
    assert f"latest: {version}" in demo.stdout


def test_the_demo_run_again_promotes_on_an_ab_verdict_and_loops_on_the_new_production_under_the_canary(demo_home: SimpleNamespace):
    """The second run: a challenger trained after the price rise passes the gates, wins an
    online A/B experiment and is promoted on the verdict; the loop then runs on it while the
    previous version keeps its canary share, and the retrain it triggers is either served beside
    it or blocked by a named gate with Production unchanged: both are checked, neither accepted
    silently."""
    stdout = _run_demo(demo_home, "demo-second-run")
    assert "landed simulated batch demo-shift-s8" in stdout
    assert "A/B experiment: Production v1 against Staging v4" in stdout and "gates of v4: every gate passed" in stdout
    (verdict,) = [line for line in stdout.splitlines() if line.strip().startswith("verdict: ")]
    assert verdict.strip().startswith("verdict: promote"), verdict
    assert "v4 is Production: A/B verdict promote" in stdout
    (loop,) = [line for line in stdout.splitlines() if "bridge traffic: 1200 houses" in line]
    variants = ast.literal_eval(loop.split("variants ")[1])  # the demo prints the dict
    assert set(variants) == {"production", "previous"} and 0 < variants["previous"] < 0.2 * 1200, loop  # v1 keeps its canary share
    assert "v4/production: realised decay" in stdout and "→ candidate v5" in stdout
    registry = Registry(MlflowSettings.from_env(demo_home.env).activate(), "housing-price", StorageSettings.from_env(demo_home.env).open())
    assert registry.version_for(PRODUCTION_ALIAS) == "4"
    if "gates of v5: every gate passed" in stdout:
        (served,) = [ast.literal_eval(line.split("serving ", 1)[1].split(" (")[0])
                     for line in stdout.split("gates of v5")[1].splitlines() if line.strip().startswith("serving {")]  # fmt: skip
        assert (served["production"], served["staging"]) == ("4", "5") and served.get("previous") in (None, "1"), served  # v1: the canary
        assert registry.version_for(STAGING_ALIAS) == "5"
    else:  # blocked: by a gate it names, recorded, and nothing moved
        assert "gates of v5: BLOCKED" in stdout and "v5 stays a candidate; Production v4 keeps serving" in stdout
        failed = [line for line in stdout.split("gates of v5: BLOCKED")[1].splitlines() if line.strip().startswith("FAIL ")]
        assert failed, stdout[-3000:]
        (record,) = [r for r in registry.history() if r.version == "5" and r.action == "gates_failed"]
        assert failed[0].split()[1] in record.reason and registry.version_for(STAGING_ALIAS) != "5"


def run_tags(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    run = instance.get_run_by_id(run_id)
    return dict(run.tags) if run else {}


def test_the_ui_ports_are_settings_and_run_links_follow_the_mlflow_port():
    """`make dev`/`make mlflow` take their ports from BRIDGE_DAGSTER_PORT/BRIDGE_MLFLOW_PORT, and
    the links in run metadata point at the MLflow port chosen."""
    planned = subprocess.run(
        ["make", "-n", "dev", "mlflow", "BRIDGE_DAGSTER_PORT=3123", "BRIDGE_MLFLOW_PORT=5123", "BRIDGE_STACK_DIR=/nonexistent"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "BRIDGE_HOME": "/nonexistent"},
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert "dagster dev -w workspace.yaml --host 127.0.0.1 --port 3123" in planned.stdout
    assert "mlflow ui --backend-store-uri" in planned.stdout and "--port 5123" in planned.stdout
    settings = MlflowSettings.from_env({"BRIDGE_HOME": "/nonexistent", "BRIDGE_MLFLOW_PORT": "5123"})
    assert settings.run_url("1", "abc") == "http://127.0.0.1:5123/#/experiments/1/runs/abc"
    assert MlflowSettings.from_env(settings.to_env()).ui_url == "http://127.0.0.1:5123"  # what the training process gets


def test_the_demo_takes_a_daemon_for_running_only_when_its_heartbeat_advances(monkeypatch):
    """A heartbeat written a moment ago also comes from a daemon just stopped: only one that
    moves on within an interval counts (the demo then waits on it instead of starting its own)."""
    import threading

    from dagster._daemon.types import DaemonHeartbeat

    from bridge_assets import demo_steps

    monkeypatch.setattr(demo_steps, "DAEMON_HEARTBEAT_SECONDS", 1)
    with dg.instance_for_test() as instance:
        monkeypatch.setattr(dg.DagsterInstance, "get", staticmethod(lambda: instance))

        def beat() -> None:
            instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "demo-test", []))

        assert demo_steps.live_daemon(margin=0.5) is False  # never heard from
        beat()
        assert demo_steps.live_daemon(margin=0.5) is False  # recent, but it stopped: no next beat
        ticker = threading.Timer(0.5, beat)
        beat()
        ticker.start()
        assert demo_steps.live_daemon(margin=0.5) is True  # the next beat came
