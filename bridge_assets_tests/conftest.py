"""Shared fixtures: a real S3 endpoint (moto's server over HTTP), a lake per test, and one real
Ray Serve prediction service for the session."""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import boto3
import pytest
from moto.server import ThreadedMotoServer

from bridge_assets.lake.settings import StorageSettings
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import promote_to_production
from bridge_assets_tests.dagster_dev import DagsterDev, FirstRound, keep_artifact, run_first_round
from bridge_assets_tests.serving_support import (
    MAX_BATCH,
    MAX_BODY,
    deploy_through_dagster,
    pick_free_ports,
    two_registered_versions,
)
from bridge_assets_tests.webhook import AlertSink, alert_sink
from serving.cluster import stop_serving
from serving.processes import free_port

# Tests never read a developer's `.env` (it could point them at a real lake or bucket).
os.environ["BRIDGE_ENV_FILE"] = ""

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


# `make test` runs two pytest processes side by side: the tests that bring up their own Ray and
# Dagster (the demo in a subprocess, the production-shaped stack, your own data), marked `apart` here, and
# everything that shares the session's Ray Serve, `dagster dev` and moto. Each process starts
# what its tests need once, and the demo's and the stack's waits overlap the rest.
APART = (
    "test_cli_and_demo.py::test_demo_",
    "test_cli_and_demo.py::test_the_demo_run_again",
    "test_stack.py::",
    "test_your_data.py::",
)


CRASH_LOG = pytest.StashKey[TextIO]()


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin, which writes to stderr
def pytest_configure(config: pytest.Config) -> None:
    """A native crash's stacks, every thread's, go whole to `BRIDGE_TEST_CRASH_LOG` when set:
    on stderr they drown in the run's output and CI keeps only its head and tail. `make test`
    sets it and prints the crashed thread's stack from it."""
    crash_log = os.environ.get("BRIDGE_TEST_CRASH_LOG")
    if crash_log:
        Path(crash_log).parent.mkdir(parents=True, exist_ok=True)
        config.stash[CRASH_LOG] = open(crash_log, "w")  # noqa: SIM115  open for the whole session
        faulthandler.enable(file=config.stash[CRASH_LOG], all_threads=True)


def pytest_itemcollected(item: pytest.Item) -> None:
    if any(marker in item.nodeid for marker in APART):
        item.add_marker(pytest.mark.apart)


def _uses_dagster_dev(item: pytest.Item | None) -> bool:
    return item is not None and "dagster_dev" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the shared `dagster dev` run first, one after another, so that it stops
    after the last of them (below) instead of ticking its sensors through the rest of the
    session on a machine whose two cores the other tests need."""
    items.sort(key=lambda item: not _uses_dagster_dev(item))  # stable: their own order kept


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _uses_dagster_dev(item) and not _uses_dagster_dev(nextitem):
        dev = getattr(item, "funcargs", {}).get("dagster_dev")
        if dev is not None:
            dev.stop()  # the session fixture's own teardown then finds it stopped and keeps its log


@pytest.fixture(autouse=True)
def _isolated_environment() -> Iterator[None]:
    """Each test ends with the process environment it started with. MLflow's set_tracking_uri
    and `activate()` export variables that monkeypatch never saw, and a store one test left
    behind would otherwise be the next test's (or its subprocesses') store."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _no_ray_driver_between_tests() -> Iterator[None]:
    """A test that deploys makes this process a Ray driver (a C++ core worker and its gRPC
    threads); it disconnects after the test (the cluster and Serve keep running). Twice this
    process crashed in sqlite3's close inside Dagster's SQLite storage while a driver had been
    attached for the rest of the session; now the tests of Dagster's storage, DuckDB and torch
    run beside no driver. The next deploy connects again."""
    yield
    _disconnect_ray()


def _disconnect_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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


@pytest.fixture(scope="session")
def serving_session(moto_endpoint: str) -> Iterator[SimpleNamespace]:
    """Two registered versions, v1 Production and live in Ray Serve on free ports.

    One Ray for the whole test session (it takes ~30 s to start here). Its environment is
    applied only while a test uses it (the `service` fixture), so other tests never see it;
    tests that move the `production` alias or redeploy put the service back as they found it.
    """
    home = Path(tempfile.mkdtemp(prefix="bridge-serve-test-"))
    ray_port, serve_port = pick_free_ports()  # every port Ray and Serve derive from these is free
    env = {
        "BRIDGE_HOME": str(home / "home"),
        "BRIDGE_RAY_PORT": str(ray_port),
        "BRIDGE_SERVE_PORT": str(serve_port),
        "BRIDGE_RAY_TMPDIR": f"/tmp/bridge-ray-{uuid.uuid4().hex[:6]}",  # short: Ray's socket paths
        "BRIDGE_SERVE_MAX_BATCH": str(MAX_BATCH),
        "BRIDGE_SERVE_MAX_BODY": str(MAX_BODY),
        "BRIDGE_SERVE_LOG_FLUSH_SECONDS": "1",
        # Tests move Production back and forth: without this, each move would start a watch that
        # keeps the version moved from on a tenth of clients. The guardrail's tests turn it on.
        "BRIDGE_GUARDRAIL_SECONDS": "0",
    }
    with _environment(env):
        try:
            lake = two_registered_versions("sim-serve", rows=2000, seed=8, max_epochs=15)
            store, settings, rounds, versions = lake.store, lake.settings, lake.rounds, lake.versions
            client = settings.activate()
            promote_to_production(client, settings.model_name, versions[0])
            deployed = deploy_through_dagster()
            _disconnect_ray()
            assert deployed.success, deployed.all_events
            (event,) = deployed.get_asset_materialization_events()
            metadata = {k: v.value for k, v in event.materialization.metadata.items()}
        except BaseException:  # no teardown follows a failed setup: leave no Ray behind
            stop_serving()
            raise
    yield SimpleNamespace(
        url=metadata["endpoint"].removesuffix("/predict"), env=env, store=store, client=client, settings=settings,
        versions=versions, rounds=rounds, metadata=metadata, moto=moto_endpoint,
    )  # fmt: skip
    with _environment(env):
        stop_serving()
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(env["BRIDGE_RAY_TMPDIR"], ignore_errors=True)


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process (and no lake variable of the caller's) inside the block; afterwards
    the environment as it was, including whatever MLflow exported inside."""
    saved = dict(os.environ)
    for name in LAKE_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def service(serving_session: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The session's prediction service with its environment applied for this test (`patch`
    sets more variables, undone after the test)."""
    for name in LAKE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in serving_session.env.items():
        monkeypatch.setenv(name, value)
    serving_session.settings.activate()  # MLflow's process-wide tracking URI, for mlflow.* calls
    return SimpleNamespace(**vars(serving_session), patch=monkeypatch)


@pytest.fixture(scope="session")
def dagster_dev() -> Iterator[DagsterDev]:
    """One real `dagster dev` (webserver + daemon) for the session, on its own local lake and
    instance; the landing, feature, candidates and registry sensors tick every 5 s
    (`BRIDGE_SENSOR_INTERVAL_<NAME>`)."""
    root = Path(tempfile.mkdtemp(prefix="bridge-dagster-dev-"))
    ray_port, serve_port = pick_free_ports()  # its own, reserved: a test serves from this instance
    env = {name: value for name, value in os.environ.items() if name not in LAKE_VARIABLES} | {
        "BRIDGE_HOME": str(root / "home"),
        "BRIDGE_ENV_FILE": "",
        "BRIDGE_SENSOR_INTERVAL_LANDED_BATCHES_SENSOR": "5",
        "BRIDGE_SENSOR_INTERVAL_FEATURE_BACKLOG_SENSOR": "5",
        "BRIDGE_SENSOR_INTERVAL_CANDIDATES_SENSOR": "5",
        "BRIDGE_SENSOR_INTERVAL_REGISTRY_SENSOR": "5",
        "BRIDGE_RAY_PORT": str(ray_port),  # never a developer's ports, nor the session service's
        "BRIDGE_SERVE_PORT": str(serve_port),
        "BRIDGE_RAY_TMPDIR": f"/tmp/bridge-ray-{uuid.uuid4().hex[:6]}",
        "WHYLOGS_NO_ANALYTICS": "True",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    dev = DagsterDev.start(root, free_port(), env)
    yield dev
    dev.stop()
    keep_artifact(dev.log_path)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def first_round(dagster_dev: DagsterDev) -> FirstRound:
    """Data landed as a user lands it, raw partitions and features made by the real sensors,
    then a training round launched through GraphQL: what the e2e and browser tests inspect."""
    return run_first_round(dagster_dev)


@pytest.fixture
def alerts(monkeypatch: pytest.MonkeyPatch) -> Iterator[AlertSink]:
    """A real HTTP receiver named by BRIDGE_ALERT_WEBHOOK for this test (set before build_defs())."""
    with alert_sink() as sink:
        monkeypatch.setenv("BRIDGE_ALERT_WEBHOOK", sink.url)
        yield sink
