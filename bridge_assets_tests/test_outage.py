"""Storage outages: the line to the S3 endpoint (moto's server, behind a TCP forwarder) is cut
while a feature run writes parts, and while the service logs interactions; restored later."""

import threading
import time

import boto3
import dagster as dg

from bridge_assets.core.simulator import Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.lake.settings import StorageSettings
from bridge_assets_tests.conftest import LAKE_VARIABLES, s3_environment
from bridge_assets_tests.netfault import CuttableProxy
from serving.interactions import InteractionLogger, record

BATCHES = 40


def _outage_when_parts_appear(
    moto_endpoint: str, env: dict, proxy: CuttableProxy, instance: dg.DagsterInstance, cut: threading.Event
) -> None:
    """Cut the line as soon as the run has written its first part; restore it once Dagster has
    recorded the step's failure (Polars' reader retries on its own first, which can bridge a
    short cut)."""
    client = boto3.client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if client.list_objects_v2(Bucket=env["BRIDGE_S3_BUCKET"], Prefix="lake/features/housing/parts/").get("KeyCount"):
            break
        time.sleep(0.01)
    proxy.cut()
    cut.set()
    while time.monotonic() < deadline and not _retry_recorded(instance):
        time.sleep(0.2)
    proxy.restore()


def _retry_recorded(instance: dg.DagsterInstance) -> bool:
    """Whether the (only) run has recorded its step's retry request."""
    runs = instance.get_run_ids(limit=1)
    retry = dg.DagsterEventType.STEP_UP_FOR_RETRY
    return bool(runs) and bool(instance.get_records_for_run(runs[0], of_type=retry, limit=1).records)


def test_features_survive_an_s3_outage_mid_run(moto_endpoint, tmp_path, monkeypatch):
    host, port = moto_endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    for name in LAKE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = s3_environment(proxy.url, tmp_path / "home")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore gives up fast; Dagster's retry policy takes over
    store = StorageSettings.from_env().open()
    land_seed(store)
    simulator = Simulator.fit()
    for index in range(BATCHES):  # many parts, so the run is still writing when the line is cut
        batch_id = f"sim-{index:02d}"
        land_batch(store, batch_id, simulator.generate(3000, seed=index, batch_id=batch_id))
    for batch in landed_batches(store):
        validate_batch(store, batch)

    cut = threading.Event()
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        outage = threading.Thread(target=_outage_when_parts_appear, args=(moto_endpoint, env, proxy, instance, cut))
        outage.start()
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("housing_features")], raise_on_error=False
        )
        outage.join()
    print(f"run with outage and retry: {time.monotonic() - started:.1f} s")
    assert cut.is_set()
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retries, "the outage did not hit the run"
    error, chain = retries[0].event_specific_data.error, []
    while error is not None:  # the retry request, caused by the storage error
        chain.append(error.message)
        error = error.cause
    assert any(proxy.url.removeprefix("http://") in m for m in chain), chain  # names the endpoint
    assert result.success

    features = FeatureStore(store)
    (version,) = features.versions()  # the failed attempt left no version behind
    assert features.latest().version == version
    pinned = features.load(version)
    assert len(pinned.parts) == BATCHES + 1 and all(store.exists(p.key) for p in pinned.parts)
    assert features.scan(pinned).collect().height == pinned.rows


def _requests(tag: str, count: int) -> list[list[dict]]:
    """One record per request, as the service logs them."""
    return [[record(request_id=f"{tag}-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
                    variant="production", latency_ms=1.0, prediction=float(i))] for i in range(count)]  # fmt: skip


def test_interaction_logging_goes_on_through_an_s3_outage_and_drains_when_it_returns(moto_endpoint, tmp_path, monkeypatch):
    host, port = moto_endpoint.removeprefix("http://").split(":")
    proxy = CuttableProxy(host, int(port))
    for name in LAKE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_environment(proxy.url, tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = StorageSettings.from_env().open()
    logger = InteractionLogger(lambda: StorageSettings.from_env().open(), "replica-o", spool_dir=tmp_path / "spool", flush_seconds=3600)
    for request in _requests("before", 100):
        logger.log(request)
    assert logger.flush() == 100

    proxy.cut()
    for request in _requests("during", 200):  # the request path appends locally: nothing raises or waits on S3
        logger.log(request)
    assert logger.flush() == 0 and logger.stats["flush_errors"] == 1  # kept in the spool, counted
    assert logger.alive

    proxy.restore()
    assert logger.flush() == 200  # the spool drains once storage is back
    assert logger.close()["dropped"] == 0
    logged = read_interactions(store)["request_id"]
    assert logged.len() == logged.n_unique() == 300  # every record once, none twice
