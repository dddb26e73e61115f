"""Benchmark: bridge's `/predict` against `mlflow models serve` and a hand-written FastAPI app.

    python bench/serve_load.py [--seconds 8] [--rounds 2] [--replicas 1] [--placement ingress] [--python-proxy]

Trains one model version on the real data in a temporary lake and MLflow store, registers it
twice (v1 and v2, the same network) and serves it five ways, all on this machine at once:

- bridge as `make serve` runs it: Ray Serve with the HAProxy ingress, one ingress replica with
  the models inside, interaction logging, router, API schema and metrics on, v1 in Production
  with no experiment;
- bridge during a 50/50 experiment: v1 Production, v2 Staging, every request a new client
  (`X-Client-ID`), so the router splits them half and half;
- `mlflow models serve` with 1 worker (its default) and with 2 (one per core, its fair best);
- a hand-written FastAPI + uvicorn app with 2 workers (`bench/handwritten_app.py`: the same
  model and validation, no logging).

wrk (Debian's `wrk`; C, so the load generator takes little of the two cores) drives every
target the same way: keep-alive connections, closed loop, `-c 1` and `-c 16`, a body and headers
per request from `bench/serve_load.lua`. Rounds alternate between targets (bridge switches
between no experiment and the experiment by a rolling redeploy, outside the timed rounds, each
followed by a warm-up). Only 2xx replies count toward throughput, over each round's measured
duration; the script exits 1 if any request failed or got another status. Every server runs at
niceness 15, as Ray runs its workers (and so bridge's replicas), so that other work on a shared
machine slows them alike; the table's last column, the servers' own CPU time per reply (for
bridge: its ingress replicas and HAProxy; for the others: every worker process), is the figure
that neighbours disturb least.

It prints the spool's cost per record, then a table (req/s, p50, p99 — the mean of the rounds'
own — and CPU ms per reply, per target and concurrency), then, last, the ratio lines against
the goals: at c=16 ≥ 10x `mlflow models serve` with 2 workers and ≥ 1.5x the hand-written app;
at c=1 a p50 no worse than the hand-written app's; during the experiment within 10% of no
experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

BENCH = Path(__file__).resolve().parent
LUA = BENCH / "serve_load.lua"
REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip
BRIDGE, EXPERIMENT = "bridge", "bridge, 50/50 experiment"
MLFLOW_1, MLFLOW_2, HANDWRITTEN = "mlflow models serve, 1 worker", "mlflow models serve, 2 workers", "hand-written FastAPI, 2 workers"
CONCURRENCY = (1, 16)
RAY_WORKER_NICENESS = 15  # Ray's `worker_niceness` default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare() -> tuple[str, str, str]:
    """One version trained on the real data, registered twice; returns (name, v1, v2)."""
    from bridge_assets.core.presets import preset
    from bridge_assets.lake.feature_store import FeatureStore, build_features
    from bridge_assets.lake.landing import land_seed, landed_batches
    from bridge_assets.lake.raw import validate_batch
    from bridge_assets.lake.settings import StorageSettings
    from bridge_assets.ml.registry import promote_to_production
    from bridge_assets.ml.round import run_round
    from bridge_assets.ml.tracking import MlflowSettings, log_round, register_candidate

    store = StorageSettings.from_env().open()
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    version = build_features(store).version
    result = run_round(FeatureStore(store).scan(version).collect(), [preset("default")])
    settings = MlflowSettings.from_env()
    client = settings.activate()
    first = client.get_model_version(settings.model_name, log_round(settings, result, feature_version=version.version).model_version)
    second = register_candidate(client, settings.model_name, first.source, dict(first.tags), store)
    promote_to_production(client, settings.model_name, first.version)
    return settings.model_name, str(first.version), second


def _wait_for(url: str, process: subprocess.Popen, log: Path, what: str, body: bytes | None = None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            reply = (
                requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=2)
                if body is not None
                else requests.get(url, timeout=2)
            )
            if reply.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")


def _as_ray_workers() -> None:
    os.nice(RAY_WORKER_NICENESS)


def start_mlflow_serve(name: str, version: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}  # it execs uvicorn from PATH
    command = [f"{bin_dir}/mlflow", "models", "serve", "-m", f"models:/{name}/{version}", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=_as_ray_workers)
    _wait_for(f"http://127.0.0.1:{port}/ping", process, log, "mlflow models serve")
    return process


def start_handwritten(name: str, version: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "BENCH_MODEL_NAME": name, "BENCH_MODEL_VERSION": version}
    command = [f"{Path(sys.executable).parent}/uvicorn", "handwritten_app:app", "--app-dir", str(BENCH), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "2", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=_as_ray_workers)
    _wait_for(f"http://127.0.0.1:{port}/predict", process, log, "the hand-written app", json.dumps(REQUEST).encode())
    return process


def spool_cost(records: int = 20_000) -> float:
    """Microseconds per `InteractionLogger.log` of one record (the spool append), publishing off."""
    from bridge_assets.lake.storage import LocalStore
    from serving.interactions import InteractionLogger, record

    with tempfile.TemporaryDirectory() as scratch:
        logger = InteractionLogger(lambda: LocalStore(Path(scratch) / "lake"), "bench", spool_dir=Path(scratch) / "spool",
                                   flush_rows=10**9, flush_seconds=3600)  # fmt: skip
        rows = [record(request_id=f"r{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
                       variant="production", latency_ms=1.0, features=REQUEST, prediction=1.0) for i in range(records)]  # fmt: skip
        started = time.perf_counter()
        for row in rows:
            logger.log([row])
        elapsed = time.perf_counter() - started
        logger.close()
    return elapsed / records * 1e6


@dataclass
class Cell:
    """One target at one concurrency, summed over rounds (percentiles: the mean of the rounds' own)."""

    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu_seconds / self.ok * 1000 if self.ok else float("nan")

    @property
    def p50(self) -> float:
        return sum(self.p50_ms) / len(self.p50_ms)

    @property
    def p99(self) -> float:
        return sum(self.p99_ms) / len(self.p99_ms)


def wrk(url: str, path: str, body: bytes, concurrency: int, seconds: float) -> dict:
    """One closed-loop round by wrk; its Lua `done` prints the summary as JSON."""
    env = {**os.environ, "BENCH_PATH": path, "BENCH_BODY": body.decode()}
    command = ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{seconds:.0f}s", "--timeout", "30s",
               "-s", str(LUA), url]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def server_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """A started server and its workers."""
    parent = psutil.Process(process.pid)
    return [parent, *parent.children(recursive=True)]


def bridge_processes(ray_temp_dir: str) -> list[psutil.Process]:
    """This instance's ingress replicas and HAProxy: below its raylet (other instances' too run here)."""
    raylet = next(p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "raylet" and ray_temp_dir in " ".join(p.info["cmdline"] or []))
    return [p for p in raylet.children(recursive=True) if "ServeReplica:bridge:" in p.name() + " ".join(p.cmdline()) or p.name() == "haproxy"]


def measure(cell: Cell, processes: list[psutil.Process], url: str, path: str, body: bytes, concurrency: int, seconds: float) -> None:
    before = _cpu_seconds(processes)
    summary = wrk(url, path, body, concurrency, seconds)
    cell.cpu_seconds += _cpu_seconds(processes) - before
    cell.ok += summary["requests"] - summary["status_errors"]
    cell.failed += summary["status_errors"] + summary["socket_errors"]
    cell.seconds += summary["duration_us"] / 1e6
    cell.p50_ms.append(summary["p50_us"] / 1000)
    cell.p99_ms.append(summary["p99_us"] / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of one round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target and concurrency")
    parser.add_argument("--replicas", type=int, default=1, help="bridge's ingress replicas (BRIDGE_SERVE_REPLICAS)")
    parser.add_argument("--placement", choices=("ingress", "deployment"), default="ingress", help="where bridge runs the models")
    parser.add_argument("--python-proxy", action="store_true", help="Serve's default Python proxy instead of HAProxy")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `apt-get install wrk` (Debian)")

    home = Path(tempfile.mkdtemp(prefix="bridge-serve-bench-"))
    os.environ.update({
        "BRIDGE_HOME": str(home), "BRIDGE_RAY_PORT": str(free_port()), "BRIDGE_SERVE_PORT": str(free_port()),
        "BRIDGE_RAY_TMPDIR": f"/tmp/brb-{os.getpid()}",  # short: HAProxy socket paths under it stay < 97 chars
        "BRIDGE_SERVE_HAPROXY": "0" if args.python_proxy else "1", "BRIDGE_SERVE_REPLICAS": str(args.replicas),
        "BRIDGE_SERVE_MODEL_PLACEMENT": args.placement,
    })  # fmt: skip
    for name in ("MLFLOW_TRACKING_URI", "BRIDGE_S3_BUCKET", "RAY_ADDRESS", "BRIDGE_API_KEYS", "BRIDGE_API_KEYS_FILE"):
        os.environ.pop(name, None)
    from serving.cluster import stop_serving
    from serving.deploy import deploy

    name, version, other = prepare()
    processes: list[subprocess.Popen] = []
    try:
        ports = {target: free_port() for target in (MLFLOW_1, MLFLOW_2, HANDWRITTEN)}
        processes += [start_mlflow_serve(name, version, ports[target], workers, home / f"mlflow-serve-{workers}.log")
                      for target, workers in ((MLFLOW_1, 1), (MLFLOW_2, 2))]  # fmt: skip
        processes.append(start_handwritten(name, version, ports[HANDWRITTEN], home / "handwritten.log"))
        bridge_url = deploy(name, version, "production")
        experiment = {"staging_version": other, "staging_weight": 0.5, "salt": "bench"}
        single, invocation = json.dumps(REQUEST).encode(), json.dumps({"dataframe_records": [REQUEST]}).encode()
        servers_of = {target: server_processes(process) for target, process in zip((MLFLOW_1, MLFLOW_2, HANDWRITTEN), processes, strict=True)}
        targets = {
            BRIDGE: (bridge_url, "/predict", single, {}),
            EXPERIMENT: (bridge_url, "/predict", single, experiment),
            MLFLOW_1: (f"http://127.0.0.1:{ports[MLFLOW_1]}", "/invocations", invocation, None),
            MLFLOW_2: (f"http://127.0.0.1:{ports[MLFLOW_2]}", "/invocations", invocation, None),
            HANDWRITTEN: (f"http://127.0.0.1:{ports[HANDWRITTEN]}", "/predict", single, None),
        }
        cells = {(target, c): Cell() for target in targets for c in CONCURRENCY}
        served: dict = {}  # bridge runs without an experiment first
        for _ in range(args.rounds):
            for target, (url, path, body, bridge_config) in targets.items():
                if bridge_config is not None and bridge_config != served:
                    deploy(name, version, "production", **bridge_config)  # outside the timed rounds
                    served = bridge_config
                wrk(url, path, body, 4, 2)  # warm-up (every uvicorn worker, new replicas)
                measured = servers_of.get(target) or bridge_processes(os.environ["BRIDGE_RAY_TMPDIR"])
                for concurrency in CONCURRENCY:
                    measure(cells[(target, concurrency)], measured, url, path, body, concurrency, args.seconds)
        report(cells, args, name, version, other)
        failed = sum(cell.failed for cell in cells.values())
        if failed:
            print(f"{failed} requests failed or got a non-2xx reply: these figures are not from a clean run", file=sys.stderr)
        return 1 if failed else 0
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        stop_serving()
        shutil.rmtree(home, ignore_errors=True)


def report(cells: dict[tuple[str, int], Cell], args: argparse.Namespace, name: str, version: str, other: str) -> None:
    proxy = "Serve's Python proxy" if args.python_proxy else "HAProxy"
    print(f"interaction spool: {spool_cost():.1f} us per record appended on the request path")
    print(f"model {name} v{version} (v{other} the same network, Staging in the experiment); bridge: {proxy}, "
          f"{args.replicas} ingress replica(s), models placed in the {args.placement}, interaction logging on; "
          f"wrk, {args.rounds} rounds x {args.seconds:.0f} s per cell, alternating; {os.cpu_count()} cores; 2xx replies only")  # fmt: skip
    print(f"{'target':<34} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'CPU ms/reply':>13}")
    for concurrency in CONCURRENCY:
        for target in dict.fromkeys(t for t, _ in cells):
            cell = cells[(target, concurrency)]
            print(f"{target:<34} {concurrency:>3} {cell.rate:>9,.0f} {cell.p50:>8.1f} {cell.p99:>8.1f} {cell.failed:>7} {cell.cpu_ms:>13.2f}")
    bridge, handwritten = cells[(BRIDGE, 16)], cells[(HANDWRITTEN, 16)]
    print(f"c=16 throughput, bridge / {MLFLOW_1}: {bridge.rate / cells[(MLFLOW_1, 16)].rate:.1f}x")
    print(f"c=16 throughput, bridge / {MLFLOW_2}: {bridge.rate / cells[(MLFLOW_2, 16)].rate:.1f}x (goal >= 10x)")
    print(f"c=16 throughput, bridge / {HANDWRITTEN}: {bridge.rate / handwritten.rate:.2f}x (goal >= 1.5x)")
    print(f"c=1 p50, bridge / {HANDWRITTEN}: {cells[(BRIDGE, 1)].p50:.1f} / {cells[(HANDWRITTEN, 1)].p50:.1f} ms = "
          f"{cells[(BRIDGE, 1)].p50 / cells[(HANDWRITTEN, 1)].p50:.2f}x (goal <= 1x)")  # fmt: skip
    print(f"c=16 throughput, 50/50 experiment / no experiment: {cells[(EXPERIMENT, 16)].rate / bridge.rate:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    sys.exit(main())
