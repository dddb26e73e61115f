"""Ray's life and deploying a model version into Serve (step 7).

A Dagster run's process ends with the run, and a Ray started inside it dies with it; so the
service lives in a long-lived local Ray head started detached (`ray start --head`, dashboard
off, small object store), found again by its address file, or in the cluster `RAY_ADDRESS`
names. Serve listens on 127.0.0.1 by default.

Deploying first loads and probes the version outside Serve (refusing a bad one with the
reason), then rolls Serve over: `max_surge_percent=100` starts new replicas beside the old
ones, which serve until the new ones are healthy. A version whose replicas then fail to start
leaves the old ones serving.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import load_seed_data
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.tracking import PRODUCTION_ALIAS, MlflowSettings
from serving.cluster import ClusterSettings, local_ray_running, ray_env, start_local_ray, stop_local_ray
from serving.model import ServedModel, version_for_alias

APP_NAME = "bridge"
DEFAULT_HTTP_PORT = 8000
DEFAULT_RAY_PORT = 6390


@dataclass(frozen=True)
class ServingSettings:
    """Where the service runs; see the README's configuration table."""

    ray_address: str | None
    ray_port: int
    host: str
    port: int
    replicas: int
    ray_temp_dir: str
    unit: str = "GBP(£)"
    max_batch_records: int = 10_000
    max_body_bytes: int = 4 * 1_048_576  # 10,000 records (the batch limit) fit; see serving.app
    log_flush_seconds: float = 10.0
    haproxy: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingSettings:
        return cls(
            ray_address=env.get("RAY_ADDRESS") or None,
            ray_port=int(env.get("BRIDGE_RAY_PORT", DEFAULT_RAY_PORT)),
            host=env.get("BRIDGE_SERVE_HOST", "127.0.0.1"),
            port=int(env.get("BRIDGE_SERVE_PORT", DEFAULT_HTTP_PORT)),
            replicas=int(env.get("BRIDGE_SERVE_REPLICAS", "1")),
            ray_temp_dir=env.get("BRIDGE_RAY_TMPDIR", "/tmp/bridge-ray"),
            unit=env.get("BRIDGE_PRICE_UNIT", "GBP(£)"),
            max_batch_records=int(env.get("BRIDGE_SERVE_MAX_BATCH", "10000")),
            max_body_bytes=int(env.get("BRIDGE_SERVE_MAX_BODY", str(4 * 1_048_576))),
            log_flush_seconds=float(env.get("BRIDGE_SERVE_LOG_FLUSH_SECONDS", "10")),
            haproxy=env.get("BRIDGE_SERVE_HAPROXY", "1") == "1",
        )

    def to_env(self) -> dict[str, str]:
        env = {
            "BRIDGE_RAY_PORT": str(self.ray_port),
            "BRIDGE_SERVE_HOST": self.host,
            "BRIDGE_SERVE_PORT": str(self.port),
            "BRIDGE_SERVE_REPLICAS": str(self.replicas),
            "BRIDGE_RAY_TMPDIR": self.ray_temp_dir,
            "BRIDGE_PRICE_UNIT": self.unit,
            "BRIDGE_SERVE_MAX_BATCH": str(self.max_batch_records),
            "BRIDGE_SERVE_MAX_BODY": str(self.max_body_bytes),
            "BRIDGE_SERVE_LOG_FLUSH_SECONDS": str(self.log_flush_seconds),
            "BRIDGE_SERVE_HAPROXY": "1" if self.haproxy else "0",
        }
        return env | ({"RAY_ADDRESS": self.ray_address} if self.ray_address else {})

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


def stop_serving(env: Mapping[str, str] = os.environ) -> None:
    """Shut Serve down gracefully (replicas flush their interaction logs), then the local Ray."""
    settings = ServingSettings.from_env(env)
    cluster = ClusterSettings.from_env(env)
    running_locally = not settings.ray_address and local_ray_running(cluster)
    if settings.ray_address or running_locally:
        import ray
        from ray import serve

        connect(settings)
        serve.shutdown()
        ray.shutdown()  # disconnect before the cluster goes, so its logs don't reach this process
    if not settings.ray_address:
        stop_local_ray(cluster)


def connect(settings: ServingSettings) -> None:
    """Connect this process to the serving cluster, starting the local one if needed."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
    address = settings.ray_address or start_local_ray(ClusterSettings.from_env(settings.to_env()))
    ray.init(address=address, log_to_driver=False, namespace="bridge")


@dataclass(frozen=True)
class Probe:
    """A version loaded and exercised outside Serve."""

    model: ServedModel
    rows: int
    latency_ms: float


def probe(client: object, model_name: str, version: str, alias: str | None) -> Probe:
    """Load a version and predict the real rows; raise ValueError saying why it is unfit."""
    try:
        served = ServedModel.load(client, model_name, version, alias)  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - any load failure refuses the version
        raise ValueError(f"version {version} of {model_name} does not load: {type(error).__name__}: {error}") from error
    rows = load_seed_data().select(FEATURES)
    started = time.perf_counter()
    predictions = served.predict(rows.head(1))
    latency_ms = (time.perf_counter() - started) * 1000
    predictions = served.predict(rows)
    if not np.all(np.isfinite(predictions)) or np.any(predictions <= 0):
        raise ValueError(f"version {version} predicts non-finite or non-positive prices on the real data")
    return Probe(served, rows.height, latency_ms)


def deploy(model_name: str, version: str, alias: str | None = None, *, env: Mapping[str, str] = os.environ) -> str:
    """Roll Serve over to `version` (old replicas serve until new ones are healthy); its URL."""
    from ray import serve

    from serving.app import ServiceSettings, application

    settings = ServingSettings.from_env(env)
    connect(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    service = ServiceSettings(
        model_name=model_name,
        model_version=version,
        alias=alias,
        environment={**StorageSettings.from_env(env).to_env(), **MlflowSettings.from_env(env).to_env()},
        unit=settings.unit,
        max_batch_records=settings.max_batch_records,
        max_body_bytes=settings.max_body_bytes,
        log_flush_seconds=settings.log_flush_seconds,
    )
    serve.run(application(service, settings.replicas), name=APP_NAME, route_prefix="/", blocking=False)
    wait_until_serving(settings.url, version)
    return settings.url


def wait_until_serving(url: str, version: str, timeout: float = 180.0) -> None:
    """Block until `url` answers with `version` (raise TimeoutError otherwise)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/model", timeout=5) as reply:
                served = json.load(reply)["response"]["model_version"]
            if served == version:
                return
            last = f"still serving version {served}"
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not serve version {version} within {timeout:.0f} s ({last})")


def production_version(env: Mapping[str, str] = os.environ) -> tuple[object, str, str]:
    """The MLflow client, model name and the version the `production` alias points at."""
    mlflow_settings = MlflowSettings.from_env(env)
    client = mlflow_settings.activate()
    return client, mlflow_settings.model_name, version_for_alias(client, mlflow_settings.model_name, PRODUCTION_ALIAS)


def main() -> None:
    """`python -m serving.deploy [stop]`: deploy the Production version (or stop Ray)."""
    if sys.argv[1:] == ["stop"]:
        stop_serving()
        print("stopped Serve (interaction logs flushed) and the local Ray")
        return
    client, name, version = production_version()
    checked = probe(client, name, version, PRODUCTION_ALIAS)
    print(f"probed {name} v{version}: {checked.rows} real rows, one-row latency {checked.latency_ms:.1f} ms")
    url = deploy(name, version, PRODUCTION_ALIAS)
    print(f"serving {name} v{version} at {url} (docs: {url}/docs); stop with `make stop`")


if __name__ == "__main__":
    main()
