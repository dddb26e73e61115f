"""An instance's processes: found by its marker, temp dir and node ids (also after Ray was
half-killed), checked for health, and ended — never another instance's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil

from serving.cluster_settings import INSTANCE_MARKER, ClusterSettings
from serving.processes import listening, terminate


def _node_ids(temp_dir: str) -> set[str]:
    """Ids of the Ray nodes started under `temp_dir` (Ray names per-node files `<what>_port_<id>`)."""
    ids = set()
    for session in Path(temp_dir).glob("session_2*"):
        ids |= {path.name.rsplit("_", 1)[1] for path in session.glob("*_port_*")}
    return ids


def _points_into(text: str, temp_dir: str) -> bool:
    return text == temp_dir or text.startswith(f"{temp_dir}/")


def _is_ours(process: psutil.Process, temp_dir: str, node_ids: set[str]) -> bool:
    """Whether `process` belongs to the Ray under `temp_dir` (see `serving.cluster`'s docstring).

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


def healthy(ray_port: int, processes: list[psutil.Process]) -> bool:
    """The GCS answers on `ray_port` and a raylet of ours lives (else the remains are debris)."""
    names = set()
    for process in processes:
        try:
            names.add(process.name())
        except psutil.NoSuchProcess:
            continue
    return {"gcs_server", "raylet"} <= names and listening(ray_port)


def instance_ports(settings: ClusterSettings) -> list[int]:
    """Every port this instance's nodes were given (from the state file, else derived for the head)."""
    state = settings.state() or {}
    indexes = [node["index"] for node in state.get("nodes", [])] or [0]
    return sorted({port for index in indexes for port in settings.ports(index).all(head=index == 0)})


def clean_up(settings: ClusterSettings, processes: list[psutil.Process]) -> list[psutil.Process]:
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
