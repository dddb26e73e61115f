"""Processes and ports, for the two supervisors that start servers on this machine: the local
Ray (`serving.cluster`) and the production-shaped stack (`deploy.stack`).

Both start servers in sessions of their own, find them again by session id (checked against
the start time, so a recycled id matches nothing), end them with SIGTERM then SIGKILL, ask
who holds a port, and write their state files atomically.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path

import psutil


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def port_free(port: int) -> bool:
    """Whether `port` can be bound on every interface (Ray and HAProxy bind some ports there)."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_holders(ports: Iterable[int]) -> dict[int, str]:
    """Ports of `ports` that something listens on, with who if this user may see it."""
    wanted = set(ports)
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:  # macOS without root: ask the ports themselves
        return {port: "another process" for port in sorted(wanted) if listening(port)}
    holders = {}
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port in wanted:
            try:
                who = (
                    f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
                    if connection.pid
                    else "another user"
                )
            except psutil.NoSuchProcess:
                who = "a process that just ended"
            holders[connection.laddr.port] = who
    return holders


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def session_members(sid: int, started_at: float | None = None, descendants: bool = False) -> list[psutil.Process]:
    """The processes of session `sid` (started no earlier than `started_at`, when given: a
    recycled session id then matches nothing), and with `descendants` their children, which
    may have opened sessions of their own (PostgreSQL's do)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and (started_at is None or process.create_time() >= started_at - 1):
                found[process.pid] = process
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    for process in list(found.values()) if descendants else []:
        try:
            found |= {child.pid: child for child in process.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def terminate(processes: Iterable[psutil.Process], grace_seconds: float = 5.0) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL what is left after `grace_seconds`; the processes that were alive."""
    running = []
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
            running.append(process)
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(running, timeout=grace_seconds)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=grace_seconds)
    return running


def write_atomically(path: Path, text: str, private: bool = False) -> None:
    """Replace `path` with `text` in one rename (readers never see half a file); `private`
    makes it readable by this user only (it may hold credentials)."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    if private:
        partial.chmod(0o600)
    partial.replace(path)
