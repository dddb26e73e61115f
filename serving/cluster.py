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
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bridge_assets.retrying import retried
from serving.cluster_settings import (
    INSTANCE_MARKER,
    RAY_PORTS_PER_NODE,
    ClusterError,
    ClusterSettings,
    ray_env,
)
from serving.instance import clean_up, healthy, instance_ports, instance_processes
from serving.processes import alive, port_holders, session_members, terminate, write_atomically

# On a starved machine (2 cores, several Rays) Ray's startup deadlines fail: a raylet must
# register with the GCS within 30 s, a Serve proxy answer its ready check within 5 s, or it is
# killed. The local Ray gets more patience (unless the environment sets these), and a `ray
# start` that still times out is cleaned up and retried.
PATIENCE = {"RAY_raylet_start_wait_time_s": "120", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
START_ATTEMPTS = 3


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


def check_compatible(settings: ClusterSettings) -> None:
    """Refuse settings the running instance cannot take without a restart (never apply half).

    Ray fixes its ports, temp dir and Serve's ingress mode when it starts, and Serve keeps its
    HTTP port while it runs: changing them means `make stop` first.
    """
    state = settings.state()
    if state is None or not healthy(state["ray_port"], instance_processes(settings)):
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
    if healthy(settings.ray_port, processes):
        return settings.local_address
    if processes:
        clean_up(settings, processes)
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
    record = settings.model_dump(exclude={"address"}) | {
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

    # Serve's public API does not say where a running Serve listens (`serve.status()` omits
    # the HTTP options, and probing the port cannot tell a remote cluster's Serve from none), so
    # this asks the controller's client, as `serve.status()` itself does.
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

    status = serve.status()  # public; empty when no Serve controller runs
    if not (status.proxies or status.applications):
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
        settings = settings.model_copy(update={"ray_port": state["ray_port"], "serve_port": state["serve_port"]})
    processes = instance_processes(settings)
    if not processes:  # still publish what replicas of a crashed instance left behind
        shutil.rmtree(settings.haproxy_dir, ignore_errors=True)
        shutil.rmtree(settings.temp_dir, ignore_errors=True)
        return StopReport([], [], {}, "was not running", _sweep_spools(env))
    serve = (
        shutdown_serve(settings)
        if healthy(settings.ray_port, processes)
        else "was unreachable (Ray half-dead; no graceful flush)"
    )
    ports = instance_ports(settings)
    stopped = clean_up(settings, instance_processes(settings) or processes)
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
