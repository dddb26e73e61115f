"""Training rounds through Dagster Pipes into a real MLflow store and registry.

Covers the embedded default (SQLite + local or S3 artifacts) and an `mlflow server` process
whose artifacts live on moto's S3 server; registered candidates load through `models:/`,
predict like the in-process model, and are reproduced from the tags read back.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from bridge_assets.core.contract import FEATURES, validate
from bridge_assets.core.presets import TrainConfig
from bridge_assets.core.simulator import Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.lake.feature_store import FeatureStore, build_features
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.container import CONTAINER_CREDENTIALS
from bridge_assets.ml.registry import CANDIDATE_ALIAS, Registry
from bridge_assets.ml.round import run_round
from bridge_assets.ml.tracking import MlflowSettings

QUICK_ROUND = {"ops": {"candidate_model": {"config": {"max_epochs": 60}}}}
ODD_CASE_REQUEST = {
    "mainroad": " YES", "guestroom": "No ", "basement": "yes", "hotwaterheating": "NO",
    "airconditioning": "Yes", "prefarea": "no", "furnishingstatus": " Semi-Furnished ",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip


def prepare_features(store: ObjectStore) -> str:
    land_seed(store)
    land_batch(store, "sim-train", Simulator.fit().generate(2000, seed=5, batch_id="sim-train"))
    for batch in landed_batches(store):
        validate_batch(store, batch)
    return build_features(store).version.version


def train_through_dagster(run_config: dict = QUICK_ROUND, tags: dict[str, str] | None = None) -> tuple[dg.ExecuteInProcessResult, dict]:
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("candidate_model")], run_config=run_config, tags=tags
        )
    (event,) = result.get_asset_materialization_events()
    return result, {k: v.value for k, v in event.materialization.metadata.items()}


def reproduce(client: MlflowClient, store: ObjectStore, model_name: str, version: str):
    """Retrain from what MLflow recorded: feature version, split and config (not from memory)."""
    tags = client.get_model_version(model_name, version).tags
    run_id = tags["bridge.run_id"]
    config = TrainConfig.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json"))
    assert config.config_hash() == tags["bridge.config_hash"]
    rows = FeatureStore(store).scan(tags["bridge.feature_version"]).collect()
    return run_round(rows, [config], tags["bridge.split"]).candidates[0], client.get_run(run_id).data.metrics


def test_a_round_through_pipes_registers_a_reproducible_candidate(store: ObjectStore, lake_env):
    feature_version = prepare_features(store)
    result, metadata = train_through_dagster(tags={"dagster/sensor_name": "retrain_sensor"})  # as the retrain policy launches it
    settings = MlflowSettings.from_env()
    client = settings.activate()

    # Pipes reported back what the subprocess did.
    assert metadata["feature_version"] == feature_version
    assert metadata["model_uri"] == f"models:/housing-price/{metadata['model_version']}"
    assert "baseline: log_linear" in metadata["metrics"] and "data:image/png;base64," in metadata["loss_curve"]
    run_link = f"http://127.0.0.1:5000/#/experiments/{client.get_run(metadata['mlflow_run_id']).info.experiment_id}/runs/"
    assert metadata["mlflow_run"] == run_link + metadata["mlflow_run_id"]  # `make mlflow`'s UI, not a sqlite: URI

    # MLflow: one parent run, a nested run per preset, with lineage and per-epoch losses.
    parent = client.get_run(metadata["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["default", "reference"]
    for run in children:
        tags = run.data.tags
        assert tags["bridge.feature_version"] == feature_version and tags["bridge.dagster_run_id"] == result.run_id
        assert len(tags["bridge.git_commit"]) == 40 and tags["bridge.git_dirty"] in ("true", "false")  # full hash
        assert {"val_rmse", "test_r2", "linear_test_r2", "log_linear_val_rmse"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) > 5
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"weights", "config.json"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "weights")] == ["weights/weights.pth"]

    # The registry: a new version marked candidate (stage "None").
    version = client.get_model_version_by_alias("housing-price", CANDIDATE_ALIAS)
    assert str(version.version) == metadata["model_version"] and version.tags["bridge.stage"] == "None"
    assert version.tags["bridge.run_id"] == metadata["mlflow_run_id"]
    (registered,) = Registry(client, "housing-price", store).history(str(version.version))
    assert (registered.action, registered.actor) == ("register", f"dagster run {result.run_id[:8]} (sensor retrain_sensor)")

    # Reproduction from the tags read back gives the same metrics.
    candidate, logged = reproduce(client, store, "housing-price", version.version)
    for name, value in candidate.metrics.items():
        assert value == pytest.approx(logged[name], rel=1e-6)

    # The registered pyfunc predicts as the in-process model, also for oddly-cased categories.
    pyfunc = mlflow.pyfunc.load_model(f"models:/housing-price@{CANDIDATE_ALIAS}")
    sample = FeatureStore(store).scan(feature_version).head(50).collect()
    np.testing.assert_allclose(
        pyfunc.predict(sample.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String)).to_pandas()),
        candidate.model.predict(sample),
        rtol=1e-6,
    )
    odd = pd.DataFrame([ODD_CASE_REQUEST])
    through_contract = candidate.model.predict(validate(pl.DataFrame([ODD_CASE_REQUEST]).with_columns(pl.lit("r").alias("row_id")), require_target=False).valid)
    assert pyfunc.predict(odd) == pytest.approx(through_contract, rel=1e-6)
    canonical = {k: v.strip().lower() if isinstance(v, str) else v for k, v in ODD_CASE_REQUEST.items()}
    assert pyfunc.predict(pd.DataFrame([canonical])) == pytest.approx(through_contract, rel=1e-6)
    no_aircon = {**canonical, "airconditioning": "no"}
    assert pyfunc.predict(pd.DataFrame([no_aircon]))[0] < pyfunc.predict(odd)[0]  # categories count

    if "BRIDGE_S3_BUCKET" in lake_env:  # artifacts went to the lake's bucket, under mlflow/
        assert any(k.endswith("weights.pth") for k in store.list("mlflow/"))


def test_a_loaded_version_rejects_bad_rows_naming_the_field(store: ObjectStore, lake_env):
    prepare_features(store)
    train_through_dagster({"ops": {"candidate_model": {"config": {"max_epochs": 5, "presets": ["reference"]}}}})
    MlflowSettings.from_env().activate()
    pyfunc = mlflow.pyfunc.load_model(f"models:/housing-price@{CANDIDATE_ALIAS}")
    with pytest.raises(Exception, match="bedrooms outside 0-9"):
        pyfunc.predict(pd.DataFrame([{**ODD_CASE_REQUEST, "bedrooms": 10}]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` process: SQLite backend, artifacts proxied to moto's S3."""
    credentials = {"AWS_ACCESS_KEY_ID": "moto-test-key", "AWS_SECRET_ACCESS_KEY": "moto-test-secret", "AWS_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_endpoint, **{
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        "region_name": "us-east-1",
    }).create_bucket(Bucket="mlflow-server-artifacts")
    port = _free_port()
    home = tmp_path_factory.mktemp("mlflow-server")
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", "s3://mlflow-server-artifacts/artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, **credentials, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=(home / "server.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "server.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_a_round_logs_to_an_mlflow_server_with_s3_artifacts(
    mlflow_server: str, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("BRIDGE_S3_BUCKET", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BRIDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    from bridge_assets.lake.settings import StorageSettings

    store = StorageSettings.from_env().open()
    prepare_features(store)
    _, metadata = train_through_dagster({"ops": {"candidate_model": {"config": {"max_epochs": 20}}}})
    assert metadata["mlflow_run"].startswith(f"{mlflow_server}/#/experiments/")
    assert metadata["mlflow_model_version"] == f"{mlflow_server}/#/models/housing-price/versions/{metadata['model_version']}"

    client = MlflowSettings.from_env().activate()
    assert str(client.get_model_version_by_alias("housing-price", CANDIDATE_ALIAS).version) == metadata["model_version"]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="moto-test-key", aws_secret_access_key="moto-test-secret")  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-server-artifacts").get("Contents", [])]
    assert any(k.endswith("weights.pth") for k in keys) and any(k.endswith("MLmodel") for k in keys)
    pyfunc = mlflow.pyfunc.load_model(metadata["model_uri"])  # downloaded through the server's proxy
    assert pyfunc.predict(pd.DataFrame([ODD_CASE_REQUEST]))[0] > 0


class DockerEngineAPI(ThreadingHTTPServer):
    """The Docker Engine's HTTP API as far as a container's creation: it records each create
    request (and what the files it mounts hold at that moment), then refuses it, as an engine
    that cannot start containers would. No container runs in the suite; this checks what bridge
    asks Docker for, through the real docker-py and dagster-docker clients."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.mounted_files: dict[str, str] = {}
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                return

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # version negotiation
                self._reply(200, {"ApiVersion": "1.44", "Version": "fake", "MinAPIVersion": "1.24"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path.split("?")[0].endswith("/containers/create"):
                    engine.created.append(body)
                    for bind in body.get("HostConfig", {}).get("Binds", []):
                        source = bind.split(":")[0]
                        if Path(source).is_file():
                            engine.mounted_files[source] = Path(source).read_text()
                self._reply(500, {"message": "this test's engine does not run containers"})

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_docker_launcher_asks_docker_for_the_image_command_mounts_and_no_secrets(store: ObjectStore, lake_env, monkeypatch):
    """What `BRIDGE_TRAINING_LAUNCHER=docker` sends to the Docker Engine: the configured image
    and the training module, the lake and MLflow locations, local state mounted in place, and
    AWS keys only inside a read-only credentials file that is gone when the round ends."""
    prepare_features(store)
    engine = DockerEngineAPI()
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{engine.server_address[1]}")
    monkeypatch.setenv("BRIDGE_TRAINING_LAUNCHER", "docker")
    monkeypatch.setenv("BRIDGE_TRAINING_IMAGE", "registry.example/bridge:1.2")
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("candidate_model")], raise_on_error=False,
            run_config={"ops": {"candidate_model": {"config": {"presets": ["reference"], "split": "reference"}}}},
        )  # fmt: skip
    engine.shutdown()
    assert not result.success and "does not run containers" in str(result.all_events)
    (created,) = engine.created
    assert created["Image"] == "registry.example/bridge:1.2"
    assert created["Cmd"] == ["python", "-m", "bridge_assets.ml.pipes_train"]
    environment = dict(item.split("=", 1) for item in created["Env"])
    assert {"BRIDGE_LAKE_ROOT", "MLFLOW_TRACKING_URI", "BRIDGE_MODEL_NAME", "DAGSTER_PIPES_CONTEXT"} <= set(environment)
    binds = {bind.split(":")[1]: bind for bind in created["HostConfig"]["Binds"]}
    tracking = environment["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    assert str(Path(tracking).parent) in binds  # the embedded MLflow store, at the same path inside
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if "BRIDGE_S3_BUCKET" in os.environ:
        assert environment["BRIDGE_S3_BUCKET"] == os.environ["BRIDGE_S3_BUCKET"]
        assert secret and secret not in json.dumps(created) and "AWS_ACCESS_KEY_ID" not in environment
        assert environment["AWS_SHARED_CREDENTIALS_FILE"] == CONTAINER_CREDENTIALS
        source, _, mode = binds[CONTAINER_CREDENTIALS].split(":")
        assert mode == "ro" and f"aws_secret_access_key = {secret}" in engine.mounted_files[source]
        assert not Path(source).exists()  # removed when the round ended
    else:
        assert str(Path(environment["BRIDGE_LAKE_ROOT"]).resolve()) in binds  # the local lake, in place
        assert CONTAINER_CREDENTIALS not in binds


