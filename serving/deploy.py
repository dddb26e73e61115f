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

import argparse
import concurrent.futures
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import requests
from pydantic import Field, PositiveFloat, PositiveInt

from bridge_assets.core.contract import FEATURES
from bridge_assets.core.simulator import load_seed_data
from bridge_assets.lake.settings import StorageSettings, bridge_home, load_environment
from bridge_assets.ml.registry import PRODUCTION_ALIAS
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.retrying import poll
from serving.cluster import check_compatible, connect, start_serve
from serving.cluster import main as cluster_main
from serving.cluster_settings import ClusterError, ClusterSettings
from serving.guards import ApiKeys, load_api_keys
from serving.model import INGRESS, Placement, ServedModel, version_for_alias
from serving.spool import spool_directory

APP_NAME = "bridge"


class ServingSettings(ClusterSettings):
    """Where the service runs (the cluster's settings) and how it serves; see the README's
    configuration table."""

    replicas: PositiveInt = Field(1, validation_alias="BRIDGE_SERVE_REPLICAS", description="ingress replicas")
    unit: str = Field("GBP(£)", validation_alias="BRIDGE_PRICE_UNIT", description="`unit` in `/predict` replies")
    max_batch_records: PositiveInt = Field(
        10_000, validation_alias="BRIDGE_SERVE_MAX_BATCH", description="records a `/predict/batch` request may carry"
    )
    max_body_bytes: PositiveInt = Field(  # 10,000 records (the batch limit) fit; see serving.app
        4 * 1_048_576, validation_alias="BRIDGE_SERVE_MAX_BODY", description="largest request body"
    )
    log_flush_seconds: PositiveFloat = Field(
        10.0,
        validation_alias="BRIDGE_SERVE_LOG_FLUSH_SECONDS",
        description="interaction logs published at least this often",
    )
    model_placement: Placement = Field(
        INGRESS,
        validation_alias="BRIDGE_SERVE_MODEL_PLACEMENT",
        description="models inside the ingress replicas or apart",
    )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.serve_host in ("0.0.0.0", "") else self.serve_host
        return f"http://{host}:{self.serve_port}"


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
    except Exception as error:
        raise ValueError(f"version {version} of {model_name} does not load: {type(error).__name__}: {error}") from error
    rows = load_seed_data().select(FEATURES)
    started = time.perf_counter()
    predictions = served.predict(rows.head(1))
    latency_ms = (time.perf_counter() - started) * 1000
    predictions = served.predict(rows)
    if not np.all(np.isfinite(predictions)) or np.any(predictions <= 0):
        raise ValueError(f"version {version} predicts non-finite or non-positive prices on the real data")
    return Probe(served, rows.height, latency_ms)


SECRET_VARIABLES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "BRIDGE_API_KEYS"})
CREDENTIAL_FILE_VARIABLES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_PROFILE")


def replica_environment(env: Mapping[str, str]) -> dict[str, str]:
    """What replicas receive in their init arguments, which Ray stores: locations, never secrets.
    Credentials reach replicas from the Ray node's environment (inherited from `ray start`) or
    from the credentials file named here."""
    variables = {**StorageSettings.from_env(env).to_env(), **MlflowSettings.from_env(env).to_env()}
    variables |= {name: env[name] for name in CREDENTIAL_FILE_VARIABLES if env.get(name)}
    return {name: value for name, value in variables.items() if name not in SECRET_VARIABLES}


def deploy(
    model_name: str,
    version: str,
    alias: str | None = None,
    *,
    env: Mapping[str, str] = os.environ,
    staging_version: str | None = None,
    staging_weight: float = 0.0,
    previous_version: str | None = None,
    previous_weight: float = 0.0,
    salt: str = "bridge",
) -> str:
    """Roll Serve over to `version` (old replicas serve until new ones are healthy), with
    `staging_version` beside it for `staging_weight` of clients if given, and the previous
    Production version for `previous_weight` of them during a post-deploy watch; its URL.

    A new weight or salt reaches the running replicas in place (`reconfigure`, about a second);
    a new version, the start or end of an experiment, or new settings is a rolling redeploy of
    the replicas concerned: no request fails, new replicas load their models before they take
    traffic. With placement `deployment`, model deployments the new application drops (staging's
    at the end of an experiment) stay bound, unused, until the new ingress replicas have replaced
    the old ones, and only then go, so no ingress replica still routing to one outlives it.
    """
    from ray import serve

    from serving.app import ServiceSettings, application
    from serving.router import ExperimentConfig

    settings = ServingSettings.from_env(env)
    cluster = ClusterSettings.from_env({**os.environ, **env})  # BRIDGE_RAY_NUM_CPUS & co. reach Dagster runs too
    connect(cluster)
    start_serve(cluster)
    everywhere = {**os.environ, **env}  # the spool and key file: also when `env` holds only the resources' variables
    versions = {"production": version} | ({"staging": staging_version} if staging_version else {})
    versions |= {"previous": previous_version} if previous_version and previous_weight > 0 else {}
    service = ServiceSettings(
        model_name=model_name,
        versions=versions,
        alias=alias,
        environment=replica_environment(env),
        spool_dir=str(spool_directory(everywhere)),
        api_keys=ApiKeys.of(
            load_api_keys(everywhere), "BRIDGE_API_KEYS/BRIDGE_API_KEYS_FILE at deploy", api_key_salt(everywhere)
        ),
        unit=settings.unit,
        max_batch_records=settings.max_batch_records,
        max_body_bytes=settings.max_body_bytes,
        log_flush_seconds=settings.log_flush_seconds,
        model_placement=settings.model_placement,
    )
    experiment = ExperimentConfig(
        salt, staging_weight if staging_version else 0.0, previous_weight if "previous" in versions else 0.0
    )
    kept = set() if settings.model_placement == INGRESS else set(versions)
    retiring = {variant: served for variant, served in _served_remotely().items() if variant not in kept}
    if retiring:
        serve.run(
            application(service, experiment, settings.replicas, retiring),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
    serve.run(application(service, experiment, settings.replicas), name=APP_NAME, route_prefix="/", blocking=False)
    wait_until_serving(settings.url, version, headers=_api_key_header(everywhere))
    return settings.url


def api_key_salt(env: Mapping[str, str]) -> str:
    """This installation's salt for the keys' digests, drawn once and kept: a salt drawn per
    deploy would change the ingress's init arguments, and so restart its replicas, on every
    deploy, where a weight change should only reconfigure them."""
    path = bridge_home(env) / "serving" / "api-key-salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{os.getpid()}")
        staged.write_text(secrets.token_hex(16))
        os.replace(staged, path)  # never half-written; of two first deploys at once, the last one's stays
    return path.read_text().strip()


def _served_remotely() -> dict[str, str]:
    """The running application's variants whose version runs in its own model deployment, with
    that version (from the ingress's `served_versions`; {} when none runs)."""
    from ray import serve

    from serving.app import model_deployment_name

    try:
        served = _ingress_says("served_versions")
        deployments = serve.status().applications[APP_NAME].deployments
    except Exception:  # noqa: BLE001 - no application yet
        return {}
    return {variant: version for variant, version in served.items() if model_deployment_name(variant) in deployments}


def api_key_status() -> str:
    """What the running ingress says about API keys (one line): read from Serve, not assumed."""
    return _ingress_says("api_key_status")


def _ingress_says(method: str) -> Any:
    """The running ingress's answer to `method`, through a Serve handle. A blocking handle call
    refuses to run in a thread with a running asyncio loop (a caller inside Playwright's or
    Jupyter's loop), so the call runs in a thread of its own."""
    from ray import serve

    def ask() -> Any:
        return getattr(serve.get_app_handle(APP_NAME), method).remote().result(timeout_s=30)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(ask).result()


def _api_key_header(env: Mapping[str, str]) -> dict[str, str]:
    keys = load_api_keys(env)
    return {"X-API-Key": keys[0].decode()} if keys else {}


@dataclass(frozen=True)
class ServiceState:
    """What the service says it serves (its `/model`), or why it could not say: `serving`
    (versions known), `empty` (Serve answers without bridge's application), `down` (nothing
    answers), `unreadable` (it answers, but not with its versions: a refused key, a bad reply)."""

    url: str
    status: Literal["serving", "empty", "down", "unreadable"]
    versions: dict[str, str] = field(
        default_factory=dict
    )  # variant -> version; "staging", "previous" only while they take clients
    problem: str = ""


def service_state(env: Mapping[str, str] = os.environ, timeout: float = 5.0) -> ServiceState:
    """Ask the running service what it serves, over HTTP as a client would: the truth that
    deployment decisions compare with the registry."""
    url = ServingSettings.from_env(env).url
    try:
        reply = requests.get(f"{url}/model", headers=_api_key_header(env), timeout=timeout)
        if reply.status_code in (404, 503):  # Serve's proxy with no application behind it
            return ServiceState(
                url,
                "empty",
                problem=f"Serve answers at {url} but serves no bridge application (HTTP {reply.status_code})",
            )
        if reply.status_code != 200:
            return ServiceState(url, "unreadable", problem=f"{url}/model answered HTTP {reply.status_code}")
        response = reply.json()["response"]
        experiment = response.get("experiment") or {}
        versions = {
            variant: str(v)
            for variant, v in (experiment.get("versions") or {"production": response["model_version"]}).items()
        }
        weights = {variant: float(experiment.get(f"{variant}_weight") or 0.0) for variant in ("staging", "previous")}
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # requests' JSON error is a ValueError
        return ServiceState(url, "unreadable", problem=f"{url}/model gave no versions: {error}")
    except requests.RequestException as error:  # refused, timed out
        return ServiceState(url, "down", problem=f"nothing answers at {url}: {error}")
    for variant, weight in weights.items():
        if weight <= 0:
            versions.pop(variant, None)  # deployed beside Production, but serving no client
    return ServiceState(url, "serving", versions)


def wait_until_serving(
    url: str, version: str, timeout: float = 180.0, headers: Mapping[str, str] | None = None
) -> None:
    """Block until `url` answers with `version` (raise TimeoutError otherwise)."""
    last = "no answer"

    def serves_it() -> bool:
        nonlocal last
        try:
            reply = requests.get(f"{url}/model", headers=dict(headers or {}), timeout=5)
        except requests.RequestException as error:
            last = str(error)
            return False
        if reply.status_code != 200:
            last = f"HTTP {reply.status_code}"
            return False
        served = reply.json()["response"]["model_version"]
        last = f"still serving version {served}"
        return bool(served == version)

    if not poll(serves_it, timeout):
        raise TimeoutError(f"{url} did not serve version {version} within {timeout:.0f} s ({last})")


def production_version(env: Mapping[str, str] = os.environ) -> tuple[object, str, str]:
    """The MLflow client, model name and the version the `production` alias points at."""
    mlflow_settings = MlflowSettings.from_env(env)
    client = mlflow_settings.activate()
    return client, mlflow_settings.model_name, version_for_alias(client, mlflow_settings.model_name, PRODUCTION_ALIAS)


def _serve(_: argparse.Namespace) -> int:
    try:
        check_compatible(ClusterSettings.from_env())  # before loading anything: a running instance may refuse these
        client, name, version = production_version()
        checked = probe(client, name, version, PRODUCTION_ALIAS)
        print(f"probed {name} v{version}: {checked.rows} real rows, one-row latency {checked.latency_ms:.1f} ms")
        url = deploy(name, version, PRODUCTION_ALIAS)
        keys = api_key_status()
    except (ClusterError, ValueError) as error:
        print(f"refused: {error}", file=sys.stderr)
        return 1
    print(f"serving {name} v{version} at {url} (docs: {url}/docs); stop with `make stop`\n{keys}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.deploy",
        description="Deploy the registry's Production version into this checkout's Ray Serve (what `make serve` runs).",
    )
    parser.set_defaults(run=_serve)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("stop", help="stop this instance (as `make stop`)").set_defaults(
        run=lambda _: cluster_main(["stop"])
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.deploy [stop]`: deploy the Production version (or stop this instance)."""
    load_environment()
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
