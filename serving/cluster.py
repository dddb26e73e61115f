"""The life of this instance's local Ray: start it detached on its own ports, stop only it.

Several bridge instances (a `make serve`, the test suite, a second checkout) share one host, so
nothing here may touch another instance's Ray: `ray stop --force` ends every Ray on the host and
is never used. An instance is identified by its Ray temp dir (`BRIDGE_RAY_TMPDIR`); its
processes are the ones that inherited `BRIDGE_RAY_INSTANCE=<temp dir>` from its `ray start`,
run a node started under it (`RAY_NODE_ID`), name the temp dir in a `--option=` or write into
it — and their descendants. That finds them too after Ray was half-killed (orphaned workers,
GCS, HAProxy), and also the processes of an instance started before the marker existed.

`ray start` runs in its own process session, so signals to whoever started it miss Ray. Every
port is derived per instance and per node from two base ports (see `NodePorts`), checked free
before Ray starts, and recorded with the session ids in `<temp dir>/bridge-instance.json`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from bridge_assets.retrying import retried
from serving.processes import alive, listening, port_holders, session_members, terminate, write_atomically

DEFAULT_RAY_PORT = 6390
DEFAULT_SERVE_PORT = 8000
DEFAULT_RAY_TEMP_DIR = "/tmp/bridge-ray"
STATE_FILE = "bridge-instance.json"
INSTANCE_MARKER = "BRIDGE_RAY_INSTANCE"  # in the environment of every process our `ray start` begets
RAY_PORTS_PER_NODE = 200  # see NodePorts
# On a starved machine (2 cores, several Rays) Ray's startup deadlines fail: a raylet must
# register with the GCS within 30 s, a Serve proxy answer its ready check within 5 s, or it is
# killed. The local Ray gets more patience (unless the environment sets these), and a `ray
# start` that still times out is cleaned up and retried.
PATIENCE = {"RAY_raylet_start_wait_time_s": "120", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """The local Ray cannot be started or used as asked; the message says what to do."""


@dataclass(frozen=True)
class NodePorts:
    """Every port one Ray node of an instance listens on (node 0 is the head).

    Ray's ports are a block of 200 from `BRIDGE_RAY_PORT` (node i starts at base + 200 i): the
    GCS at +0, Ray's named ports at +1..+8, Serve's direct-ingress replica ports at +10..+49
    (HTTP) and +50..+89 (gRPC), the autoscaler's and dashboard's metrics at +90 and +91,
    worker ports at +100..+199. Serve's ingress ports follow
    `BRIDGE_SERVE_PORT` S: HTTP S, HAProxy stats S+404, HAProxy metrics S+1101, fallback proxy
    S+500 — Ray's defaults (8000, 8404, 9101, 8500) for the default instance — +10 per node.
    """

    ray_base: int
    serve_http: int
    haproxy_stats: int
    haproxy_metrics: int
    fallback_proxy: int

    @classmethod
    def derive(cls, ray_port: int, serve_port: int, index: int = 0, env: Mapping[str, str] = os.environ) -> NodePorts:
        offset = 10 * index
        return cls(
            ray_base=ray_port + RAY_PORTS_PER_NODE * index,
            serve_http=serve_port + offset,
            haproxy_stats=int(env.get("RAY_SERVE_HAPROXY_STATS_PORT") or serve_port + 404) + offset,
            haproxy_metrics=int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT") or serve_port + 1101) + offset,
            fallback_proxy=serve_port + 500 + offset,
        )

    def ray_named(self, head: bool) -> dict[str, int]:
        """`ray start` options naming a port (the GCS, client server and dashboard only on the head)."""
        named = {
            "--object-manager-port": self.ray_base + 1,
            "--node-manager-port": self.ray_base + 2,
            "--metrics-export-port": self.ray_base + 3,
            "--dashboard-agent-grpc-port": self.ray_base + 4,
            "--dashboard-agent-listen-port": self.ray_base + 5,
            "--runtime-env-agent-port": self.ray_base + 6,
        }
        if head:
            named |= {
                "--port": self.ray_base,
                "--ray-client-server-port": self.ray_base + 7,
                "--dashboard-port": self.ray_base + 8,
            }
        return named

    def ray_env(self, head: bool) -> dict[str, str]:
        """Ray's ports that only its environment sets (head-only daemons' metrics)."""
        return (
            {"AUTOSCALER_METRIC_PORT": str(self.ray_base + 90), "DASHBOARD_METRIC_PORT": str(self.ray_base + 91)}
            if head
            else {}
        )

    @property
    def worker_range(self) -> range:
        return range(self.ray_base + 100, self.ray_base + RAY_PORTS_PER_NODE)

    @property
    def ingress_http_range(self) -> range:
        return range(self.ray_base + 10, self.ray_base + 50)

    @property
    def ingress_grpc_range(self) -> range:
        return range(self.ray_base + 50, self.ray_base + 90)

    def serve_env(self, head: bool) -> dict[str, str]:
        """Serve reads these in its actors on the node: they go into `ray start`'s environment."""
        env = {
            "RAY_SERVE_HAPROXY_STATS_PORT": self.haproxy_stats,
            "RAY_SERVE_HAPROXY_METRICS_PORT": self.haproxy_metrics,
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": self.fallback_proxy,
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": self.ingress_http_range.start,
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": self.ingress_http_range.stop - 1,
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": self.ingress_grpc_range.start,
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": self.ingress_grpc_range.stop - 1,
        } | ({} if head else {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": self.serve_http})
        return {name: str(port) for name, port in env.items()}

    def serve_ports(self) -> list[int]:
        return [self.serve_http, self.haproxy_stats, self.haproxy_metrics, self.fallback_proxy]

    def all(self, head: bool) -> list[int]:
        ray = [
            *self.ray_named(head).values(),
            *map(int, self.ray_env(head).values()),
            *self.worker_range,
            *self.ingress_http_range,
            *self.ingress_grpc_range,
        ]
        return sorted({*ray, *self.serve_ports()})


@dataclass(frozen=True)
class ClusterSettings:
    """This instance's Ray; `address` set means an external cluster that we use but never stop."""

    address: str | None = None
    ray_port: int = DEFAULT_RAY_PORT
    temp_dir: str = DEFAULT_RAY_TEMP_DIR
    serve_host: str = "127.0.0.1"
    serve_port: int = DEFAULT_SERVE_PORT
    haproxy: bool = True
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 2)
    object_store_mb: int = 512

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClusterSettings:
        return cls(
            address=env.get("RAY_ADDRESS") or None,
            ray_port=int(env.get("BRIDGE_RAY_PORT", DEFAULT_RAY_PORT)),
            temp_dir=os.path.abspath(env.get("BRIDGE_RAY_TMPDIR", DEFAULT_RAY_TEMP_DIR)),
            serve_host=env.get("BRIDGE_SERVE_HOST", "127.0.0.1"),
            serve_port=int(env.get("BRIDGE_SERVE_PORT", DEFAULT_SERVE_PORT)),
            haproxy=env.get("BRIDGE_SERVE_HAPROXY", "1") == "1",
            num_cpus=int(env.get("BRIDGE_RAY_NUM_CPUS") or os.cpu_count() or 2),
            object_store_mb=int(env.get("BRIDGE_RAY_OBJECT_STORE_MB", "512")),
        )

    @property
    def local_address(self) -> str:
        return f"127.0.0.1:{self.ray_port}"

    def ports(self, index: int = 0) -> NodePorts:
        return NodePorts.derive(self.ray_port, self.serve_port, index)

    @property
    def haproxy_dir(self) -> Path:
        """HAProxy's config, sockets and server state, one folder per node inside. Not in the temp
        dir: HAProxy refuses socket paths over 97 characters, and the node id alone takes 56."""
        return Path("/tmp") / f"bridge-hap-{hashlib.sha256(self.temp_dir.encode()).hexdigest()[:8]}"  # 94 at most

    @property
    def state_file(self) -> Path:
        return Path(self.temp_dir) / STATE_FILE

    def state(self) -> dict | None:
        """What `start_local_ray` recorded about the running instance, if anything."""
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None


# A replaced ingress replica stays reachable this long before it refuses new connections, so that
# HAProxy, reloaded by Serve when the replica set changes, stops sending to it (no request failed
# through repeated rollouts under keep-alive load with 5 s on a 2-core machine); past it HAProxy
# retries refused connections elsewhere. Serve's default, 30 s, is sized for external load
# balancers and made every rollout wait half a minute for the old replicas to go.
HAPROXY_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "10"}


def ray_env(settings: ClusterSettings | None = None) -> dict[str, str]:
    """Local single-user cluster: no token auth, no usage stats; optionally Serve's HAProxy
    ingress (`BRIDGE_SERVE_HAPROXY=1`), which must be set when the cluster starts."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
    if settings is not None and settings.haproxy:
        env |= {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **HAPROXY_DRAIN}
    return env


def _node_env(settings: ClusterSettings, index: int) -> dict[str, str]:
    """`ray start`'s environment for node `index`: its Serve ports, HAProxy's files in our folder."""
    haproxy = settings.haproxy_dir
    files = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": haproxy / "haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": haproxy / "admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": haproxy,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": haproxy / "server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": haproxy / "metrics.sock",
    }
    ports = settings.ports(index)
    own = {INSTANCE_MARKER: settings.temp_dir} | {k: str(v) for k, v in files.items()}
    return PATIENCE | ray_env(settings) | ports.ray_env(index == 0) | ports.serve_env(index == 0) | own


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _node_ids(temp_dir: str) -> set[str]:
    """Ids of the Ray nodes started under `temp_dir` (Ray names per-node files `<what>_port_<id>`)."""
    ids = set()
    for session in Path(temp_dir).glob("session_2*"):
        ids |= {path.name.rsplit("_", 1)[1] for path in session.glob("*_port_*")}
    return ids


def _points_into(text: str, temp_dir: str) -> bool:
    return text == temp_dir or text.startswith(f"{temp_dir}/")


def _is_ours(process: psutil.Process, temp_dir: str, node_ids: set[str]) -> bool:
    """Whether `process` belongs to the Ray under `temp_dir` (see the module docstring).

    Narrow on purpose: a shell with `BRIDGE_RAY_TMPDIR` set, a `tail -f` of a Ray log or a
    notebook connected as a driver must survive `make stop`.
    """
    try:
        environ = process.environ()
        if environ.get(INSTANCE_MARKER) == temp_dir or environ.get("RAY_NODE_ID") in node_ids:
            return True
        for arg in process.cmdline():  # Ray's daemons name their folders as --option=value
            option, _, value = arg.partition("=")
            if (option.startswith("--") and _points_into(value, temp_dir)) or any(node in arg for node in node_ids):
                return True
        return any(
            opened.mode != "r"
            and _points_into(opened.path, temp_dir)
            and not Path(opened.path).name.startswith("python-core-driver")  # a driver's own log
            for opened in process.open_files()
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def instance_processes(settings: ClusterSettings) -> list[psutil.Process]:
    """Every live process of this instance's Ray, including orphans of a half-killed one."""
    node_ids = _node_ids(settings.temp_dir)
    spared = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        if process.pid not in spared and _is_ours(process, settings.temp_dir, node_ids):
            found[process.pid] = process
    for process in list(found.values()):
        try:
            found |= {child.pid: child for child in process.children(recursive=True) if child.pid not in spared}
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _healthy(ray_port: int, processes: list[psutil.Process]) -> bool:
    """The GCS answers on `ray_port` and a raylet of ours lives (else the remains are debris)."""
    names = set()
    for process in processes:
        try:
            names.add(process.name())
        except psutil.NoSuchProcess:
            continue
    return {"gcs_server", "raylet"} <= names and listening(ray_port)


def check_compatible(settings: ClusterSettings) -> None:
    """Refuse settings the running instance cannot take without a restart (never apply half).

    Ray fixes its ports, temp dir and Serve's ingress mode when it starts, and Serve keeps its
    HTTP port while it runs: changing them means `make stop` first.
    """
    state = settings.state()
    if state is None or not _healthy(state["ray_port"], instance_processes(settings)):
        return
    running = {
        "BRIDGE_RAY_PORT": state["ray_port"],
        "BRIDGE_SERVE_PORT": state["serve_port"],
        "BRIDGE_SERVE_HOST": state["serve_host"],
        "BRIDGE_SERVE_HAPROXY": "1" if state["haproxy"] else "0",
    }
    asked = {
        "BRIDGE_RAY_PORT": settings.ray_port,
        "BRIDGE_SERVE_PORT": settings.serve_port,
        "BRIDGE_SERVE_HOST": settings.serve_host,
        "BRIDGE_SERVE_HAPROXY": "1" if settings.haproxy else "0",
    }
    changed = [f"{name}={asked[name]} (running: {running[name]})" for name in running if running[name] != asked[name]]
    if changed:
        raise ClusterError(
            f"the bridge instance in {settings.temp_dir} already runs Serve on "
            f"{state['serve_host']}:{state['serve_port']} (Ray on 127.0.0.1:{state['ray_port']}); it cannot change "
            f"{', '.join(changed)} while running. Run `make stop` first, then start again with the new settings "
            f"(or use another BRIDGE_RAY_TMPDIR, BRIDGE_RAY_PORT and BRIDGE_SERVE_PORT for a second instance)."
        )


def start_local_ray(settings: ClusterSettings) -> str:
    """Start (or find) this instance's detached local Ray head; its address.

    `ray start` runs in a new process session (setsid), so its daemons are in no caller's
    process group: Ctrl-C on `make serve` / `make dev`, or a signal to a Dagster run or a test
    harness, does not reach them. Remains of a half-killed instance are stopped first.
    """
    Path(settings.temp_dir).mkdir(parents=True, exist_ok=True)
    with _start_lock(settings):  # two deployments at once start one Ray
        return _start_head(settings)


@contextmanager
def _start_lock(settings: ClusterSettings) -> Iterator[None]:
    # read-only: a process waiting here writes nothing into the temp dir, so it is not taken for Ray's
    lock = os.open(Path(settings.temp_dir) / "start.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _start_head(settings: ClusterSettings) -> str:
    check_compatible(settings)
    processes = instance_processes(settings)
    if _healthy(settings.ray_port, processes):
        return settings.local_address
    if processes:
        _clean_up(settings, processes)
    head = settings.ports(0)
    inside = [port for port in head.serve_ports() if head.ray_base <= port < head.ray_base + RAY_PORTS_PER_NODE]
    if inside:
        raise ClusterError(
            f"BRIDGE_SERVE_PORT={settings.serve_port} puts Serve's ports {inside} inside Ray's block "
            f"{head.ray_base}..{head.ray_base + RAY_PORTS_PER_NODE - 1} (BRIDGE_RAY_PORT={settings.ray_port}): move one of them"
        )
    busy = port_holders(head.all(head=True))
    if busy:
        raise ClusterError(
            f"cannot start Ray for {settings.temp_dir}: port(s) in use: "
            + ", ".join(f"{port} by {who}" for port, who in sorted(busy.items()))
            + ". Pick other BRIDGE_RAY_PORT (a block of 200 ports) / BRIDGE_SERVE_PORT, or stop what holds them."
        )
    sid, started_at = _ray_start(settings, 0, ["--head", "--include-dashboard=false"])
    record = {k: v for k, v in asdict(settings).items() if k != "address"} | {
        "haproxy_dir": str(settings.haproxy_dir),
        "nodes": [_node_record(settings, 0, sid, started_at)],
    }
    _write_state(settings, record)
    return settings.local_address


def start_local_node(settings: ClusterSettings, index: int, num_cpus: int = 1) -> None:
    """Add worker node `index` (≥ 1) on this host to the instance's head, on its own ports."""
    busy = port_holders(settings.ports(index).all(head=False))
    if busy:
        raise ClusterError(f"cannot start Ray node {index}: port(s) in use: {sorted(busy)}")
    sid, started_at = _ray_start(settings, index, ["--address", settings.local_address], num_cpus=num_cpus)
    record = settings.state() or {}
    _write_state(
        settings, record | {"nodes": [*record.get("nodes", []), _node_record(settings, index, sid, started_at)]}
    )


def _ray_start(
    settings: ClusterSettings, index: int, role: list[str], num_cpus: int | None = None
) -> tuple[int, float]:
    ports = settings.ports(index)
    named = [str(arg) for option, port in ports.ray_named(head=index == 0).items() for arg in (option, port)]
    command = [
        _ray_cli(),
        "start",
        *role,
        *named,
        "--node-ip-address",
        "127.0.0.1",
        "--disable-usage-stats",
        "--min-worker-port",
        str(ports.worker_range.start),
        "--max-worker-port",
        str(ports.worker_range.stop - 1),
        "--num-cpus",
        str(num_cpus or settings.num_cpus),
        "--object-store-memory",
        str(settings.object_store_mb * 1024 * 1024),
        "--temp-dir",
        settings.temp_dir,
    ]

    def start() -> tuple[int, float]:
        started_at = time.time()
        starter = subprocess.Popen(
            command,
            env=_node_env(settings, index),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = starter.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            starter.kill()
            output = b"`ray start` did not return within 300 s"
        if starter.returncode == 0:
            return starter.pid, started_at
        # this attempt's debris: its session id stays ours while any member of it lives
        terminate(session_members(starter.pid))
        failed = _StartTimedOut if b"timed out during startup" in output else ClusterError
        raise failed(f"`ray start` failed for {settings.temp_dir}:\n{output.decode(errors='replace')[-3000:]}")

    # a raylet that registers later than Ray's fixed startup timeout fails `ray start`: again
    return retried(start, START_ATTEMPTS, retry_on=_StartTimedOut)


class _StartTimedOut(ClusterError):
    """`ray start` gave up waiting for its raylet to register: worth another try."""


def _node_record(settings: ClusterSettings, index: int, sid: int, started_at: float) -> dict:
    ports = settings.ports(index)
    return {
        "index": index,
        "sid": sid,
        "started_at": started_at,
        "ports": asdict(ports),
        "ray_ports": ports.ray_named(head=index == 0),
        "worker_ports": [ports.worker_range.start, ports.worker_range.stop - 1],
        "serve_env": ports.serve_env(index == 0),
    }


def _write_state(settings: ClusterSettings, record: dict) -> None:
    write_atomically(settings.state_file, json.dumps(record, indent=2))


def instance_ports(settings: ClusterSettings) -> list[int]:
    """Every port this instance's nodes were given (from the state file, else derived for the head)."""
    state = settings.state() or {}
    indexes = [node["index"] for node in state.get("nodes", [])] or [0]
    return sorted({port for index in indexes for port in settings.ports(index).all(head=index == 0)})


def _clean_up(settings: ClusterSettings, processes: list[psutil.Process]) -> list[psutil.Process]:
    """End `processes` and whatever of ours appears meanwhile, then remove our folders."""
    node_ids = _node_ids(settings.temp_dir)
    stopped = terminate(processes)
    for _ in range(3):  # a dying raylet may still have forked a worker
        late = instance_processes(settings)
        if not late:
            break
        stopped += terminate(late, grace_seconds=2.0)
    for node_id in node_ids:  # HAProxy's default folders, used by instances started before ours moved them
        shutil.rmtree(Path("/tmp/haproxy-serve") / node_id, ignore_errors=True)
    shutil.rmtree(settings.haproxy_dir, ignore_errors=True)
    shutil.rmtree(settings.temp_dir, ignore_errors=True)
    return stopped


@dataclass(frozen=True)
class StopReport:
    """What `stop_serving` did, said truthfully."""

    stopped_pids: list[int]
    left_pids: list[int]
    busy_ports: dict[int, str]
    serve: str
    sweep: str
    external_address: str | None = None

    @property
    def clean(self) -> bool:
        return not self.left_pids and not self.busy_ports

    def message(self, settings: ClusterSettings) -> str:
        if not self.clean:
            return (
                f"NOT fully stopped ({settings.temp_dir}): still running pids {self.left_pids}; "
                f"ports still in use: {self.busy_ports}"
            )
        if self.external_address:
            return f"Serve on the cluster at {self.external_address} {self.serve}; spools: {self.sweep}; the cluster is not ours and keeps running"
        if not self.stopped_pids:
            return f"nothing was running for {settings.temp_dir} (Ray port {settings.ray_port}); spools: {self.sweep}"
        return (
            f"stopped the local Ray of {settings.temp_dir}: Serve {self.serve}; spools: {self.sweep}; "
            f"{len(self.stopped_pids)} processes ended, its ports are free and its temporary folders removed"
        )


def connect(settings: ClusterSettings) -> None:
    """Connect this process to the serving cluster, starting the local one if needed."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
    address = settings.address or start_local_ray(settings)
    ray.init(address=address, log_to_driver=False, namespace="bridge")


def start_serve(settings: ClusterSettings) -> None:
    """Start Serve's HTTP ingress on the configured host and port (connect first).

    Serve ignores new HTTP options while it runs (it only logs a warning), so a running Serve
    on another address is refused instead of being redeployed behind the old port.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        running = (client.http_config.host, client.http_config.port)
        if running != (settings.serve_host, settings.serve_port):
            raise ClusterError(
                f"Serve already runs on {running[0]}:{running[1]}; it cannot move to "
                f"{settings.serve_host}:{settings.serve_port} (BRIDGE_SERVE_HOST/BRIDGE_SERVE_PORT) while running. "
                "Run `make stop` first, then start again with the new port."
            )
        return
    serve.start(http_options={"host": settings.serve_host, "port": settings.serve_port})
    state = settings.state()
    if state is not None and not settings.address:
        _write_state(settings, state | {"serve_host": settings.serve_host, "serve_port": settings.serve_port})


SERVE_NOT_RUNNING = 3  # exit code of `python -m serving.cluster shutdown-serve` when there was no Serve


def shutdown_serve(settings: ClusterSettings, timeout: float = 120.0) -> str:
    """Shut Serve down gracefully so replicas flush; what happened, for the stop report.

    Done in a child process unless this one is already connected to this cluster: a driver
    that connects to a half-dead GCS can hang, and Ray then ends the whole process.
    """
    import ray

    address = settings.address or settings.local_address
    if ray.is_initialized() and ray.get_runtime_context().gcs_address.endswith(":" + address.rsplit(":", 1)[-1]):
        try:
            return _shutdown_connected_serve()
        finally:
            ray.shutdown()  # disconnect before the cluster goes, or Ray ends this process with it
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serving.cluster", "shutdown-serve", address],
            env=ray_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"did not shut down within {timeout:.0f} s (replicas were killed without a flush)"
    if done.returncode == 0:
        return "shut down gracefully (replicas flushed)"
    if done.returncode == SERVE_NOT_RUNNING:
        return "was not running"
    return f"failed to shut down gracefully: {done.stderr.decode(errors='replace').strip().splitlines()[-1:]}"


def _shutdown_connected_serve() -> str:
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        return "was not running"
    serve.shutdown()
    return "shut down gracefully (replicas flushed)"


def _sweep_spools(env: Mapping[str, str]) -> str:
    """Publish the spooled interaction records of dead replicas to the lake (idempotent); what it did."""
    try:
        from serving.interactions import sweep
    except ImportError:  # the write-ahead spool has not landed in this checkout
        return "no spool sweep available"
    from bridge_assets.lake.settings import StorageSettings

    try:
        published = sweep(StorageSettings.from_env(env).open(), env)
    except Exception as error:  # noqa: BLE001 - the stop goes on; the spools stay for the next sweep
        return f"sweep failed, the spools stay for the next sweep ({type(error).__name__}: {error})"
    return f"{published.records} records of dead replicas published"


def stop_serving(env: Mapping[str, str] = os.environ) -> StopReport:
    """Stop what this instance started: Serve gracefully, then its processes, then the spool
    sweep — a replica that did not shut down in time (Serve's controller gives up after 30 s)
    leaves its spool locked until its process is gone, so sweeping earlier would miss it.

    Never `ray stop --force`. Works on a half-killed Ray too (processes found by session, temp
    dir and node ids). An external cluster (`RAY_ADDRESS`) only has Serve shut down.
    """
    settings = ClusterSettings.from_env(env)
    if settings.address:
        return StopReport([], [], {}, shutdown_serve(settings), _sweep_spools(env), external_address=settings.address)
    state = settings.state()
    if state is not None:  # the instance in this temp dir, whatever the ports in the environment say now
        settings = replace(settings, ray_port=state["ray_port"], serve_port=state["serve_port"])
    processes = instance_processes(settings)
    if not processes:  # still publish what replicas of a crashed instance left behind
        shutil.rmtree(settings.haproxy_dir, ignore_errors=True)
        shutil.rmtree(settings.temp_dir, ignore_errors=True)
        return StopReport([], [], {}, "was not running", _sweep_spools(env))
    serve = (
        shutdown_serve(settings)
        if _healthy(settings.ray_port, processes)
        else "was unreachable (Ray half-dead; no graceful flush)"
    )
    ports = instance_ports(settings)
    stopped = _clean_up(settings, instance_processes(settings) or processes)
    left = [process.pid for process in stopped if alive(process)]
    return StopReport(sorted(p.pid for p in stopped), left, port_holders(ports), serve, _sweep_spools(env))


def _stop(_: argparse.Namespace) -> int:
    from bridge_assets.lake.settings import load_environment

    load_environment()  # the same `.env` as every other entry point
    report = stop_serving()
    print(report.message(ClusterSettings.from_env()))
    return 0 if report.clean else 1


def _shutdown_serve(args: argparse.Namespace) -> int:
    import ray

    ray.init(address=args.address, log_to_driver=False, namespace="bridge")
    outcome = _shutdown_connected_serve()
    ray.shutdown()
    return 0 if outcome.startswith("shut down") else SERVE_NOT_RUNNING


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.cluster", description="This checkout's local Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "stop", help="stop Serve gracefully, then this instance's Ray (what `make stop` runs)"
    ).set_defaults(run=_stop)
    shutdown = commands.add_parser("shutdown-serve", help="shut Serve down on the cluster at ADDRESS (used by `stop`)")
    shutdown.add_argument("address", help="the cluster's GCS address, host:port")
    shutdown.set_defaults(run=_shutdown_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.cluster stop` (imports nothing heavy)."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
