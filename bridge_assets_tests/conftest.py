"""Shared fixtures: a real S3 endpoint (moto's server over HTTP) and a lake per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from bridge_assets.lake.settings import StorageSettings
from bridge_assets.lake.storage import ObjectStore

LAKE_VARIABLES = (
    "BRIDGE_HOME",
    "BRIDGE_S3_BUCKET",
    "BRIDGE_S3_PREFIX",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    # MLflow's set_tracking_uri exports this, so one test's store would leak into the next.
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "BRIDGE_MLFLOW_ARTIFACTS",
)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, reachable from subprocesses too."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """Variables that point bridge at a fresh bucket on `endpoint` (moto accepts any keys)."""
    bucket = f"bridge-test-{uuid.uuid4().hex[:10]}"
    env = {
        "BRIDGE_HOME": str(home),
        "BRIDGE_S3_BUCKET": bucket,
        "BRIDGE_S3_PREFIX": "lake",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "moto-test-key",
        "AWS_SECRET_ACCESS_KEY": "moto-test-secret",
        "AWS_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)
    return env


@pytest.fixture(params=["local", "s3"])
def lake_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The process environment for one lake: the local default, or a bucket on moto's server."""
    for name in LAKE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    if request.param == "local":
        env = {"BRIDGE_HOME": str(home)}
    else:
        env = s3_environment(request.getfixturevalue("moto_endpoint"), home)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def store(lake_env: dict[str, str]) -> ObjectStore:
    return StorageSettings.from_env(lake_env).open()
