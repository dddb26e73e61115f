"""The life of this instance's local Ray: start it detached, find its processes, stop only them.

Several bridge instances (a `make serve`, the test suite, a second checkout) share one host, so
nothing here may touch another instance's Ray: `ray stop --force` ends every Ray on the host and
is never used. An instance is identified by its Ray temp dir (`BRIDGE_RAY_TMPDIR`): its
processes are the ones whose command line or open files point into it, whose `RAY_NODE_ID` is
one of the node ids recorded under it, or that run in the process session its `ray start`
opened — and their descendants.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

DEFAULT_RAY_PORT = 6390
DEFAULT_RAY_TEMP_DIR = "/tmp/bridge-ray"


@dataclass(frozen=True)
class ClusterSettings:
    """Where this instance's Ray runs; `address` set means an external cluster we only use."""

    address: str | None
    ray_port: int
    temp_dir: str
    haproxy: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClusterSettings:
        return cls(
            address=env.get("RAY_ADDRESS") or None,
            ray_port=int(env.get("BRIDGE_RAY_PORT", DEFAULT_RAY_PORT)),
            temp_dir=os.path.abspath(env.get("BRIDGE_RAY_TMPDIR", DEFAULT_RAY_TEMP_DIR)),
            haproxy=env.get("BRIDGE_SERVE_HAPROXY", "1") == "1",
        )

    @property
    def local_address(self) -> str:
        return f"127.0.0.1:{self.ray_port}"


def ray_env(settings: ClusterSettings | None = None) -> dict[str, str]:
    """Local single-user cluster: no token auth, no usage stats; optionally Serve's HAProxy
    ingress (`BRIDGE_SERVE_HAPROXY=1`), which must be set when the cluster starts."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0"}
    if settings is not None and settings.haproxy:
        env |= {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return env


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def local_ray_running(settings: ClusterSettings) -> bool:
    done = subprocess.run(
        [_ray_cli(), "status", "--address", settings.local_address], env=ray_env(), capture_output=True, timeout=60
    )
    return done.returncode == 0


def start_local_ray(settings: ClusterSettings) -> str:
    """Start (or find) the detached local Ray head that outlives Dagster runs; its address."""
    if local_ray_running(settings):
        return settings.local_address
    command = [
        _ray_cli(), "start", "--head", "--port", str(settings.ray_port), "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(os.cpu_count() or 2), "--include-dashboard=false", "--disable-usage-stats",
        "--object-store-memory", str(512 * 1024 * 1024), "--temp-dir", settings.temp_dir,
    ]  # fmt: skip
    subprocess.run(command, env=ray_env(settings), check=True, capture_output=True, timeout=180)
    return settings.local_address


def _node_ids(temp_dir: str) -> set[str]:
    """Ids of the Ray nodes started under `temp_dir` (Ray names per-node files `<what>_port_<id>`)."""
    ids = set()
    for session in Path(temp_dir).glob("session_2*"):
        ids |= {path.name.rsplit("_", 1)[1] for path in session.glob("*_port_*")}
    return ids


def _points_into(text: str, temp_dir: str) -> bool:
    return text == temp_dir or f"{temp_dir}/" in text or text.endswith(f"={temp_dir}")


def _is_ours(process: psutil.Process, temp_dir: str, node_ids: set[str]) -> bool:
    """Whether `process` belongs to the Ray under `temp_dir` (see the module docstring)."""
    try:
        if any(_points_into(arg, temp_dir) or any(node in arg for node in node_ids) for arg in process.cmdline()):
            return True
        if process.environ().get("RAY_NODE_ID") in node_ids:
            return True
        return any(_points_into(opened.path, temp_dir) for opened in process.open_files())
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


def terminate(processes: Iterable[psutil.Process], grace_seconds: float = 10.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL what is left after `grace_seconds`; the processes that were alive."""
    alive = []
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
            alive.append(process)
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(alive, timeout=grace_seconds)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=grace_seconds)
    return alive


def stop_local_ray(settings: ClusterSettings) -> list[psutil.Process]:
    """Stop only this instance's Ray processes (never `ray stop --force`); those it stopped."""
    return terminate(instance_processes(settings))
