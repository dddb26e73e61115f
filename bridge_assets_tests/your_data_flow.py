"""The whole loop on a team's own data set, run in a process whose environment names it
(`BRIDGE_CONTRACT`, `BRIDGE_TRAINER`): what `docs/your-data.md` tells a team to do, as real
Dagster materializations, a real MLflow registry and a real Ray Serve over HTTP.

`python -m bridge_assets_tests.your_data_flow OUT.json` writes one JSON object of what each
step produced; `test_your_data.py` runs it and judges it. It is a separate process because the
contract is chosen when bridge is imported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from bridge_assets.core.contract import CONTRACT_VARIABLE, FEATURES, SPEC, TARGET
from bridge_assets.definitions import build_defs
from bridge_assets.defs.monitoring import (
    drift_report,
    interaction_logs_sensor,
    labelled_traffic,
    model_versions,
    monitor_windows_sensor,
    window_profiles,
)
from bridge_assets.defs.raw import landed_batches_sensor
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.landing import Simulation, land_seed, land_simulated
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import promote_to_production
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets_tests.serving_support import call
from serving.cluster import stop_serving

BATCH = "sim-own"
SENT = 4  # records of the requests below: one /predict, two /invocations rows, one refused


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    plain = (str, int, float, bool, dict, list, type(None))  # not tables, nor Dagster's records
    return {name: v.value for name, v in event.materialization.metadata.items() if isinstance(v.value, plain)}


def _records(store: ObjectStore, count: int, timeout: float = 120.0) -> pl.DataFrame:
    """The interaction records once the replicas have flushed `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_interactions(store)
        if records.height >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def run() -> dict[str, Any]:
    defs = build_defs()
    job = defs.resolve_implicit_global_asset_job_def()
    store = StorageSettings.from_env().open()
    facts: dict[str, Any] = {"contract": SPEC.name, "columns": list(FEATURES), "target": TARGET}

    def materialize(instance: dg.DagsterInstance, key: str, **options: Any) -> dg.ExecuteInProcessResult:
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(key)], **options)
        assert result.success, f"{key} failed"
        return result

    def tick(instance: dg.DagsterInstance, sensor: Any, cursor: str | None = None) -> dg.SensorResult:
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
        ) as context:
            result = sensor(context)
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result

    with dg.instance_for_test() as instance:
        # land → raw (validated, quarantined with reasons) → a feature version
        land_seed(store)
        land_simulated(store, Simulation(3000, seed=5, corrupt_fraction=0.03), BATCH)
        landed = tick(instance, landed_batches_sensor)
        facts["raw"] = {
            request.partition_key: _metadata(
                materialize(instance, "raw_housing", partition_key=request.partition_key), "raw_housing"
            )
            for request in landed.run_requests
        }
        facts["feature_version"] = _metadata(materialize(instance, "housing_features"), "housing_features")

        # a training round by the configured trainer → gates → Staging
        config = {"ops": {"candidate_model": {"config": {"presets": ["reference"], "seed": 3}}}}
        facts["candidate"] = _metadata(materialize(instance, "candidate_model", run_config=config), "candidate_model")
        staged = materialize(instance, "staged_model")
        facts["staged"] = _metadata(staged, "staged_model")
        facts["gates"] = {e.check_name: e.passed for e in staged.get_asset_check_evaluations()}

        # Staging → Production → Ray Serve; one request of each API, one refused
        mlflow = MlflowSettings.from_env()
        client = mlflow.activate()
        version = str(client.get_model_version_by_alias(mlflow.model_name, "staging").version)
        promote_to_production(client, mlflow.model_name, version)
        # Ray starts without the variable (as a cluster started before the contract was chosen):
        # its replicas get the contract from the deployer alone.
        os.environ.pop(CONTRACT_VARIABLE)
        deployed = _metadata(materialize(instance, "production_deployment"), "production_deployment")
        url = str(deployed["endpoint"]).removesuffix("/predict")
        row = dict(SPEC.example)
        facts["predict"] = call(url, "/predict", row)[:2]
        facts["invocations"] = call(url, "/invocations", {"dataframe_records": [row, row]})[:2]
        first_number = next(name for name in FEATURES if isinstance(row[name], int | float))
        facts["served_trainer"] = call(url, "/model")[1]["response"]["config"].get("trainer")
        facts["refused"] = call(url, "/predict", {**row, first_number: -1})[:2]
        facts["openapi_fields"] = sorted(
            call(url, "/openapi.json")[1]["components"]["schemas"]["HouseFeatures"]["properties"]
        )

        # interaction records → profiles → the drift report
        facts["interaction_records"] = _records(store, SENT).select("endpoint", "status", *FEATURES).to_dicts()
        time.sleep(2 * float(os.environ["BRIDGE_MONITOR_WINDOW_SECONDS"]))  # the requests' window has closed
        logs = tick(instance, interaction_logs_sensor)
        for request in logs.run_requests:
            materialize(instance, "interaction_profiles", run_config=request.run_config)
        instance.add_dynamic_partitions(model_versions.name, [version])
        materialize(instance, "model_reference", partition_key=version)
        windows = tick(instance, monitor_windows_sensor)
        facts["drift_reports"] = {}
        for request in windows.run_requests:
            window = dg.materialize(
                [window_profiles, labelled_traffic, drift_report],
                instance=instance,
                resources=defs.resources,
                partition_key=request.partition_key,
            )
            assert window.success, f"window {request.partition_key} failed"
            facts["drift_reports"][request.partition_key] = {
                key: _metadata(window, key) for key in ("window_profiles", "drift_report")
            }
    return _json_safe(facts)


def main(out: Path) -> None:
    try:
        out.write_text(json.dumps(run()))
    finally:
        stop_serving()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
