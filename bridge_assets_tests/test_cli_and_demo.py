"""The `bridge` CLI and `make demo`'s job, run as the user runs them: in subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl

from bridge_assets.lake.settings import StorageSettings


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


def test_cli_rejects_bad_drift_with_a_message(lake_env):
    result = bridge(lake_env, "simulate", "--rows", "10", "--shift", "garden=1", "--quiet")
    assert result.returncode == 2 and "unknown feature" in result.stderr


def test_demo_materializes_through_dagster_into_the_ui_instance(tmp_path: Path, monkeypatch):
    home = tmp_path / "bridge"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "AWS_"))}
    env.update(BRIDGE_HOME=str(home), DAGSTER_HOME=str(dagster_home), BRIDGE_RAY_TMPDIR=f"/tmp/bridge-ray-{os.getpid()}")
    for name in ("BRIDGE_RAY_PORT", "BRIDGE_SERVE_PORT"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env[name] = str(sock.getsockname()[1])
    demo = subprocess.run([sys.executable, "-m", "bridge_assets.demo"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "reference split of the real data (DuckDB): {'train': 348, 'test': 109, 'validation': 88}" in demo.stdout

    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    with dg.DagsterInstance.get() as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("raw_housing")) == {"housing-seed", "demo-sim-s7"}
        event = instance.get_latest_materialization_event(dg.AssetKey("housing_features"))
        assert event is not None
        version = event.asset_materialization.metadata["version"].value
    assert f"latest: {version}" in demo.stdout
    quarantine = pl.read_parquet(home / "lake" / "raw" / "quarantine" / "demo-sim-s7" / "rows.parquet")
    assert f"quarantined from demo-sim-s7: {quarantine.height} rows" in demo.stdout

    rerun = subprocess.run([sys.executable, "-m", "bridge_assets.demo"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert rerun.returncode == 0 and "landed" not in rerun.stdout.split("feature table")[0]
    assert f"latest: {version}" in rerun.stdout  # unchanged inputs, same version
    assert "candidate model: models:/housing-price/1 " in demo.stdout
    assert "candidate model: models:/housing-price/2 " in rerun.stdout  # every run trains a round
    assert "baseline: log-linear" in demo.stdout
    assert "an invalid request (bedrooms 10) → 422: invalid input: bedrooms" in demo.stdout
    assert "stopped Serve and the local Ray; 6 interaction records" in demo.stdout
