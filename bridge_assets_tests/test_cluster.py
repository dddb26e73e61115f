"""Two bridge instances side by side on one host: own ports, detached from their starter, a
refused port change, and a stop that leaves nothing behind — also after a half-kill.

One module, two small Ray heads (1 CPU, 80 MB object store) started in parallel once: the tests
below run in file order on them and end by stopping both. A second node on one host (its own
block of ports) is exercised by `make stack`'s test, which starts one through `start_local_node`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from bridge_assets_tests.serving_support import pick_free_ports
from serving.cluster import start_local_ray, stop_serving
from serving.cluster_settings import ClusterError, ClusterSettings, NodePorts
from serving.instance import instance_ports, instance_processes

# Connects to the instance named by the environment exactly as `deploy()` does (the path a
# `production_deployment` run under `make dev` takes), serves a tiny app, then waits.
STARTER = textwrap.dedent(
    """
    import os, sys, time
    from ray import serve
    from serving.cluster import connect, start_serve
    from serving.cluster_settings import ClusterSettings

    settings = ClusterSettings.from_env()
    connect(settings)
    start_serve(settings)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Name:
        async def __call__(self, request):
            return os.environ["TEST_INSTANCE"]

    serve.run(Name.bind(), name="name", route_prefix="/", blocking=False)
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _instance_env(name: str) -> dict[str, str]:
    ray_port, serve_port = pick_free_ports()
    tag = uuid.uuid4().hex[:6]
    return {
        "BRIDGE_RAY_PORT": str(ray_port),
        "BRIDGE_SERVE_PORT": str(serve_port),
        "BRIDGE_RAY_TMPDIR": f"/tmp/bridge-cluster-test-{tag}",  # as long as the serving fixture's
        "BRIDGE_HOME": f"/tmp/bridge-cluster-test-{tag}-home",  # the spools `make stop` sweeps
        "BRIDGE_RAY_NUM_CPUS": "1",
        "BRIDGE_RAY_OBJECT_STORE_MB": "80",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",  # a graceful stop here needs no 30 s drain
        "TEST_INSTANCE": name,
    }


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def _listeners(pids: set[int]) -> list[psutil._common.sconn]:
    return [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _pids(instance: SimpleNamespace) -> set[int]:
    """The instance's processes now (HAProxy reloads replace its process), without the code under
    test; each call also remembers them, for the check that a stop left none."""
    now = set().union(*(_session_processes(sid) for sid in instance.sids))
    instance.pids = getattr(instance, "pids", set()) | now
    return now


def _session_processes(sid: int) -> set[int]:
    """Processes in a session, found without the code under test."""
    found = set()
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.add(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return found


@pytest.fixture(scope="module")
def instances() -> Iterator[dict[str, SimpleNamespace]]:
    made = {}
    for name in ("alpha", "beta"):
        env = {**os.environ, **_instance_env(name)}
        starter = subprocess.Popen(
            [sys.executable, "-c", STARTER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,  # its own group, so the test can signal that group alone
        )  # fmt: skip
        made[name] = SimpleNamespace(name=name, env=env, starter=starter, settings=ClusterSettings.from_env(env))
    try:
        for instance in made.values():
            line = instance.starter.stdout.readline()
            assert line.strip() == "ready", instance.starter.stderr.read()[-3000:] + _ray_logs(instance.settings)
            instance.url = f"http://127.0.0.1:{instance.settings.serve_port}"
            instance.state = instance.settings.state()
            instance.sids = [node["sid"] for node in instance.state["nodes"]]
            _pids(instance)
            session = Path(instance.settings.temp_dir) / "session_latest"
            instance.node_ids = {path.name.rsplit("_", 1)[1] for path in session.glob("*_port_*")} or {"?"}
        yield made
    finally:
        for instance in made.values():
            if instance.starter.poll() is None:
                os.killpg(instance.starter.pid, signal.SIGKILL)
            stop_serving(instance.env)
            for pid in getattr(instance, "pids", ()):  # only what this test started
                try:
                    psutil.Process(pid).kill()
                except psutil.NoSuchProcess:
                    continue
            shutil.rmtree(instance.settings.temp_dir, ignore_errors=True)
            shutil.rmtree(instance.env["BRIDGE_HOME"], ignore_errors=True)


def _ray_logs(settings: ClusterSettings) -> str:
    """The end of the instance's GCS and raylet logs, to tell a load-starved node from a bug."""
    logs = sorted(Path(settings.temp_dir).glob("session_2*/logs/*.out"))
    wanted = [log for log in logs if log.name.startswith(("gcs_server", "raylet"))]
    return "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]) for log in wanted)


def test_ports_are_derived_per_instance_and_node() -> None:
    default = NodePorts.derive(6390, 8000, env={})
    assert (default.serve_http, default.haproxy_stats, default.haproxy_metrics, default.fallback_proxy) == (8000, 8404, 9101, 8500)
    second = NodePorts.derive(6590 + 200, 8100, env={})
    assert not set(default.all(head=True)) & set(second.all(head=True))
    worker = NodePorts.derive(6390, 8000, 1, env={})
    assert not set(default.all(head=True)) & set(worker.all(head=False))
    assert worker.serve_env(head=False)["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] == "8010"
    assert "RAY_SERVE_WORKER_PROXY_HTTP_PORT" not in default.serve_env(head=True)


def test_serve_ports_inside_the_ray_block_are_refused_naming_both_variables(tmp_path: Path) -> None:
    clash = ClusterSettings(ray_port=21000, serve_port=21100, temp_dir=str(tmp_path / "ray"))
    with pytest.raises(ClusterError, match=r"BRIDGE_SERVE_PORT=21100.*BRIDGE_RAY_PORT=21000"):
        start_local_ray(clash)
    assert not instance_processes(clash)


def test_two_instances_serve_side_by_side_on_their_own_ports(instances: dict[str, SimpleNamespace]) -> None:
    alpha, beta = instances["alpha"], instances["beta"]
    assert _get(alpha.url) == "alpha" and _get(beta.url) == "beta"
    for this, other in ((alpha, beta), (beta, alpha)):
        listening = {c.laddr.port for c in _listeners(_pids(this))}
        ports = this.settings.ports()
        key = {this.settings.ray_port, ports.serve_http, ports.haproxy_stats, ports.haproxy_metrics, ports.fallback_proxy}
        assert key <= listening, f"{this.name}: {sorted(key - listening)} not held by its processes"
        assert not listening & set(instance_ports(other.settings)), f"{this.name} listens on {other.name}'s ports"
        assert this.state["nodes"][0]["ports"] == asdict(ports)  # recorded for `make stop` and people


def test_bridge_listeners_bind_loopback(instances: dict[str, SimpleNamespace]) -> None:
    for instance in instances.values():
        serve_http = [c for c in _listeners(_pids(instance)) if c.laddr.port == instance.settings.serve_port]
        assert serve_http and {c.laddr.ip for c in serve_http} == {"127.0.0.1"}, serve_http


def test_signal_to_the_starting_group_does_not_reach_ray(instances: dict[str, SimpleNamespace]) -> None:
    core = {pid for instance in instances.values() for pid in _pids(instance) if _name(pid) in ("gcs_server", "raylet")}
    assert len(core) == 4
    for instance in instances.values():
        group = os.getpgid(instance.starter.pid)
        os.killpg(group, signal.SIGTERM)  # what Ctrl-C / a service manager / a harness does
        instance.starter.wait(timeout=30)
        assert not [pid for pid in _pids(instance) if _pgid(pid) == group]
    for instance in instances.values():
        assert _get(instance.url) == instance.name
        assert {_name(pid) for pid in _pids(instance)} >= {"gcs_server", "raylet", "haproxy"}
    assert all(psutil.pid_exists(pid) for pid in core)  # the same GCS and raylets: nothing restarted


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except psutil.NoSuchProcess:
        return None


def test_changing_the_serve_port_while_running_is_refused_up_front(instances: dict[str, SimpleNamespace]) -> None:
    alpha = instances["alpha"]
    new_port = alpha.settings.serve_port + 7
    done = subprocess.run(
        [sys.executable, "-m", "serving.deploy"], env={**alpha.env, "BRIDGE_SERVE_PORT": str(new_port)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"already runs Serve on 127.0.0.1:{alpha.settings.serve_port}" in done.stderr, done.stderr
    assert "make stop" in done.stderr and "Traceback" not in done.stderr
    assert _get(alpha.url) == "alpha" and _free(new_port)


def _stop(instance: SimpleNamespace) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cluster", "stop"], env=instance.env, capture_output=True, text=True, timeout=300
    )


def _assert_nothing_left(instance: SimpleNamespace) -> None:
    assert not _pids(instance)
    assert not [pid for pid in instance.pids if _name(pid) is not None and psutil.Process(pid).status() != "zombie"]
    ports = set(instance_ports(instance.settings))
    # closed connections may linger in TIME_WAIT (the kernel's, no process's): anything else is a leak
    held = [c for c in psutil.net_connections(kind="inet") if c.laddr.port in ports and c.status != psutil.CONN_TIME_WAIT]
    assert not held, f"{instance.name}: ports still held: {held}"
    assert not Path(instance.settings.temp_dir).exists()
    assert not instance.settings.haproxy_dir.exists()  # HAProxy's config, sockets and server state
    assert not [node for node in instance.node_ids if (Path("/tmp/haproxy-serve") / node).exists()]


def test_stop_after_a_half_kill_leaves_nothing(instances: dict[str, SimpleNamespace]) -> None:
    beta = instances["beta"]
    (raylet,) = [p for p in instance_processes(beta.settings) if p.name() == "raylet"]
    assert "haproxy" in {_name(pid) for pid in _pids(beta)}
    raylet.kill()
    raylet.wait(timeout=30)
    done = _stop(beta)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("stopped the local Ray") and "was unreachable" in done.stdout
    _assert_nothing_left(beta)


def test_stop_is_graceful_then_complete_and_says_so(instances: dict[str, SimpleNamespace]) -> None:
    alpha = instances["alpha"]
    log = next(Path(alpha.settings.temp_dir).glob("session_2*/logs/raylet.out"))
    bystanders = [  # not Ray's: a shell of this instance, someone reading its log
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=alpha.env),
        subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL),
    ]
    try:
        done = _stop(alpha)
        assert [b.poll() for b in bystanders] == [None, None]
    finally:
        for bystander in bystanders:
            bystander.kill()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Serve shut down gracefully" in done.stdout and "records of dead replicas published" in done.stdout, done.stdout
    _assert_nothing_left(alpha)
    again = _stop(alpha)
    assert again.returncode == 0 and again.stdout.startswith("nothing was running"), again.stdout
