"""Helpers shared by the tests that talk to the prediction service over HTTP."""

import fcntl
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psutil

from bridge_assets.core.presets import preset
from bridge_assets.core.simulator import Simulator
from bridge_assets.definitions import build_defs
from bridge_assets.lake.feature_store import FeatureStore, build_features
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.round import RoundResult, run_round
from bridge_assets.ml.tracking import MlflowSettings, log_round
from serving.cluster_settings import RAY_PORTS_PER_NODE, ClusterSettings
from serving.processes import port_holders

REFERENCE_REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip
MAX_BATCH = 50
MAX_BODY = 262_144  # small: over-limit bodies stay cheap to send


def call(url: str, path: str, body: object = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, JSON body, headers) of one HTTP request; 4xx/5xx are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"{url}{path}", data=data, method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply), reply.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), error.headers


def deploy_through_dagster() -> dg.ExecuteInProcessResult:
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        return job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("production_deployment")], raise_on_error=False
        )


@dataclass
class Load:
    """What a continuous client saw: failed replies and refused connections, and every version
    that answered."""

    failures: list[object] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)


@contextmanager
def continuous_load(url: str, body: dict = REFERENCE_REQUEST, *, new_client_each_time: bool = False) -> Iterator[Load]:
    """One client sending `/predict` back to back until the block ends (redeploys, rollbacks
    and weight changes must fail none of it); with `new_client_each_time`, every request has its
    own `X-Client-ID`, so the A/B router spreads them over the variants."""
    load, stop = Load(), threading.Event()

    def client() -> None:
        sent = 0
        while not stop.is_set():
            headers = {"X-Client-ID": f"load-{sent}"} if new_client_each_time else None
            sent += 1
            try:
                status, reply, _ = call(url, "/predict", body, headers)
            except Exception as error:  # noqa: BLE001 - a refused connection is a failure too
                load.failures.append(error)
                continue
            if status == 200:
                load.versions.add(reply["response"]["model_version"])
            else:
                load.failures.append((status, reply))

    sender = threading.Thread(target=client)
    sender.start()
    try:
        yield load
    finally:
        stop.set()
        sender.join()


@dataclass
class RegisteredVersions:
    """A lake holding the real data and one simulated batch, and two versions trained on it."""

    store: ObjectStore
    settings: MlflowSettings
    rounds: list[RoundResult]
    versions: list[str]


def two_registered_versions(batch_id: str, rows: int, seed: int, max_epochs: int) -> RegisteredVersions:
    """Land, validate and build features in the lake the environment names, then train and
    register the reference network twice (seeds 1 and 2: two versions that predict differently)."""
    store = StorageSettings.from_env().open()
    land_seed(store)
    land_batch(store, batch_id, Simulator.fit().generate(rows, seed=seed, batch_id=batch_id))
    for batch in landed_batches(store):
        validate_batch(store, batch)
    version = build_features(store).version
    features = FeatureStore(store).scan(version).collect()
    settings = MlflowSettings.from_env()
    settings.activate()
    rounds = [run_round(features, [preset("reference", max_epochs=max_epochs, seed=s)]) for s in (1, 2)]
    versions = [log_round(settings, r, feature_version=version.version).model_version for r in rounds]
    return RegisteredVersions(store, settings, rounds, versions)


@contextmanager
def cpu_hog(processes: int = 2) -> Iterator[None]:
    """Processes that burn every core beside the service, as a training run would."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


PORT_RESERVATIONS = Path(tempfile.gettempdir()) / "bridge-test-ports"


def _reserved_ports() -> set[int]:
    """Ports that a live test process picked for a Ray instance: checking "free now" is not
    enough when two pytest processes (`make test` runs two) each pick before the other starts."""
    reserved: set[int] = set()
    for file in PORT_RESERVATIONS.glob("*.json"):
        if psutil.pid_exists(int(file.stem.split("-")[0])):
            reserved |= set(json.loads(file.read_text()))
        else:
            file.unlink(missing_ok=True)
    return reserved


def pick_free_ports(nodes: int = 1) -> tuple[int, int]:
    """A `BRIDGE_RAY_PORT` and `BRIDGE_SERVE_PORT` whose derived ports (for `nodes` nodes) are
    free now and reserved by no live test process (the pick is reserved for this one's life):
    each test instance of Ray its own ports. Below 30000, clear of Ray's default worker range
    (10002-19999), Serve's default replica ranges (30000-31000, 40000-41000) and the kernel's
    ephemeral ports (32768+)."""
    PORT_RESERVATIONS.mkdir(exist_ok=True)
    with open(PORT_RESERVATIONS / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reserved = _reserved_ports()
        while True:
            ray_port, serve_port = (
                20_000 + RAY_PORTS_PER_NODE * random.randrange(26 - nodes),
                random.randrange(25_000, 26_400),
            )
            settings = ClusterSettings(ray_port=ray_port, serve_port=serve_port)
            ports = [port for index in range(nodes) for port in settings.ports(index).all(head=index == 0)]
            if len(set(ports)) == len(ports) and not set(ports) & reserved and not port_holders(ports):
                reservation = PORT_RESERVATIONS / f"{os.getpid()}-{uuid.uuid4().hex}.json"
                reservation.write_text(json.dumps(ports))
                return ray_port, serve_port
