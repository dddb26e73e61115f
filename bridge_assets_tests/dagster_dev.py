"""A real `dagster dev` for end-to-end and browser tests: webserver and daemon as processes.

`DagsterDev.start` runs `dagster dev -w workspace.yaml` on a free port with its own
DAGSTER_HOME and BRIDGE_HOME, in its own process group, and waits until `/server_info`
answers; `stop` ends the whole group (webserver, daemon, code servers and the runs they
launched). Tests talk to it only as a user's tools would: `DagsterGraphQLClient` to launch
runs, plain GraphQL queries to read what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dagster_graphql import DagsterGraphQLClient

from bridge_assets.lake.landing import Simulation, land_seed, land_simulated
from bridge_assets.lake.settings import PROJECT_ROOT, StorageSettings

T = TypeVar("T")
TERMINAL_RUN_STATUSES = {"SUCCESS", "FAILURE", "CANCELED"}
# A small instance: a few runs at a time on 2 cores, threads for sensors, no telemetry.
INSTANCE_YAML = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 3
    dequeue_interval_seconds: 1
sensors:
  use_threads: true
  num_workers: 4
schedules:
  use_threads: true
  num_workers: 2
"""


class DagsterDevError(RuntimeError):
    """`dagster dev` did not start, or a wait ran out: carries the tail of its log."""


@dataclass
class DagsterDev:
    """A running `dagster dev` and what a test needs to talk to it."""

    root: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen
    log_path: Path
    client: DagsterGraphQLClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, root: Path, port: int, env: Mapping[str, str], timeout: float = 240.0) -> DagsterDev:
        """Start `dagster dev` with `env` (plus DAGSTER_HOME under `root`) and wait until it answers.

        The working directory is `root`, not the checkout: `dagster dev` loads a `.env` from its
        working directory, and a developer's `.env` must not reach the tests.
        """
        dagster_home = root / "dagster"
        dagster_home.mkdir(parents=True, exist_ok=True)
        (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
        full_env = {**env, "DAGSTER_HOME": str(dagster_home)}
        log_path = root / "dagster-dev.log"
        command = [
            str(Path(sys.executable).with_name("dagster")), "dev",
            "-w", str(PROJECT_ROOT / "workspace.yaml"),
            "-h", "127.0.0.1", "-p", str(port),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        dev = cls(root=root, port=port, env=full_env, process=process, log_path=log_path)
        try:
            dev.wait_until(dev._answers, timeout, "dagster dev to answer /server_info")
        except BaseException:
            dev.stop()
            raise
        return dev

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise DagsterDevError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, grace_seconds: float = 15.0) -> None:
        """SIGTERM to the whole process group (dagster dev shuts its children down), then SIGKILL."""
        if self.process.poll() is not None and not _group_alive(self.process.pid):
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and _group_alive(self.process.pid):
            self.process.poll()  # reap the leader, else its zombie keeps the group "alive"
            time.sleep(0.5)
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One GraphQL query against `/graphql`; raises on GraphQL errors."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.load(reply)
        if answer.get("errors"):
            raise DagsterDevError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def wait_until(self, probe: Callable[[], T | None], timeout: float, what: str, every: float = 1.0) -> T:
        """Poll `probe` until it returns something truthy; a timeout says what it waited for."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise DagsterDevError(f"gave up after {timeout:.0f} s waiting for {what}\n{self.log_tail()}")
            time.sleep(every)

    def wait_for_run(self, run_id: str, timeout: float = 300.0) -> str:
        """The run's final status (SUCCESS, FAILURE or CANCELED)."""

        def finished() -> str | None:
            status = self.client.get_run_status(run_id).value
            return status if status in TERMINAL_RUN_STATUSES else None

        return self.wait_until(finished, timeout, f"run {run_id} to finish", every=2.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def artifacts_dir() -> Path:
    """Where tests leave screenshots and logs for a person: `$BRIDGE_TEST_ARTIFACTS`, else
    `test-artifacts/` in the checkout (ignored by git)."""
    path = Path(os.environ.get("BRIDGE_TEST_ARTIFACTS") or PROJECT_ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def keep_artifact(path: Path) -> Path | None:
    """Copy `path` into the artifacts folder (if it exists); returns the copy."""
    if not path.exists():
        return None
    target = artifacts_dir() / path.name
    target.write_bytes(path.read_bytes())
    return target


# --- The first round of the loop, driven as a user drives it -------------------------------

SEED_BATCH = "housing-seed"
SIM_BATCH = "e2e-sim"
SIM_ROWS = 2000
SIM_SEED = 11
CORRUPT_FRACTION = 0.01
TRAINING_CONFIG = {"presets": ["reference"], "max_epochs": 5, "seed": 3}

METADATA_FIELDS = """
  label
  __typename
  ... on IntMetadataEntry { intValue }
  ... on FloatMetadataEntry { floatValue }
  ... on BoolMetadataEntry { boolValue }
  ... on TextMetadataEntry { text }
  ... on JsonMetadataEntry { jsonString }
  ... on MarkdownMetadataEntry { mdStr }
  ... on PathMetadataEntry { path }
  ... on UrlMetadataEntry { url }
"""
MATERIALIZATIONS = (
    "query($key: AssetKeyInput!, $limit: Int) { assetOrError(assetKey: $key) { ... on Asset {"
    " assetMaterializations(limit: $limit) { partition runId timestamp metadataEntries {" + METADATA_FIELDS + "} } } } }"
)
RUN = "query($id: ID!) { runOrError(runId: $id) { ... on Run { runId status jobName tags { key value } } } }"


@dataclass(frozen=True)
class Materialization:
    """One materialization event as GraphQL reports it, metadata decoded to Python values."""

    asset: str
    partition: str | None
    run_id: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class FirstRound:
    """What the loop's first round produced, as read back through GraphQL."""

    batches: list[str]
    raw: dict[str, Materialization]  # the first materialization of each raw partition
    features: Materialization  # the first feature version holding every landed batch
    training_run_id: str
    training_status: str
    candidate: Materialization | None


def _metadata_value(entry: Mapping[str, Any]) -> Any:
    kind = entry["__typename"]
    if kind == "JsonMetadataEntry":
        return json.loads(entry["jsonString"])
    for name in ("intValue", "floatValue", "boolValue", "text", "mdStr", "path", "url"):
        if name in entry:
            return entry[name]
    return None


def materializations(dev: DagsterDev, asset: str, limit: int = 50) -> list[Materialization]:
    """Newest first, as the asset's event log holds them."""
    data = dev.graphql(MATERIALIZATIONS, {"key": {"path": [asset]}, "limit": limit})["assetOrError"]
    return [
        Materialization(
            asset=asset,
            partition=event["partition"],
            run_id=event["runId"],
            metadata={e["label"]: _metadata_value(e) for e in event["metadataEntries"]},
        )
        for event in (data or {}).get("assetMaterializations", [])
    ]


def run_tags(dev: DagsterDev, run_id: str) -> dict[str, str]:
    run = dev.graphql(RUN, {"id": run_id})["runOrError"]
    return {tag["key"]: tag["value"] for tag in run["tags"]}


def run_first_round(dev: DagsterDev, timeout: float = 600.0) -> FirstRound:
    """Land the real data and a simulated batch (the functions behind `bridge land-seed` and
    `bridge simulate`), wait for the real sensors to validate them and build a feature version,
    then launch a training round through GraphQL."""
    store = StorageSettings.from_env(dev.env).open()
    land_seed(store)
    land_simulated(store, Simulation(SIM_ROWS, seed=SIM_SEED, corrupt_fraction=CORRUPT_FRACTION), SIM_BATCH)
    batches = [SEED_BATCH, SIM_BATCH]

    def raw_partitions() -> dict[str, Materialization] | None:
        found = {m.partition: m for m in reversed(materializations(dev, "raw_housing")) if m.partition}
        return found if set(batches) <= set(found) else None

    raw = dev.wait_until(raw_partitions, timeout, f"raw_housing partitions {batches}", every=3.0)

    def feature_version() -> Materialization | None:
        complete = [m for m in materializations(dev, "housing_features") if set(batches) <= set(m.metadata["batches"])]
        return complete[-1] if complete else None

    features = dev.wait_until(feature_version, timeout, "a feature version holding every batch", every=3.0)
    run_id = dev.client.submit_job_execution(
        "__ASSET_JOB",
        asset_selection=["candidate_model"],
        run_config={"ops": {"candidate_model": {"config": TRAINING_CONFIG}}},
        tags={"bridge/test": "e2e"},
    )
    status = dev.wait_for_run(run_id, timeout)
    candidate = next((m for m in materializations(dev, "candidate_model") if m.run_id == run_id), None)
    return FirstRound(batches, raw, features, run_id, status, candidate)
