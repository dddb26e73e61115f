"""Benchmark: bridge's Ray Serve `/predict` against `mlflow models serve` of the same version.

    python bench/serve_load.py [--seconds 8] [--rounds 2] [--python-proxy] [--ab]

Trains and registers one model version in a temporary lake and MLflow store, deploys it into
Ray Serve (interaction logging on, as in production) and serves the same version with
`mlflow models serve` twice: with its default single worker and with one uvicorn worker per
core (its fair best on this machine). One closed-loop load generator (the same client for all,
keep-alive HTTP connections, one thread per concurrent client) then alternates rounds between
them at concurrency 1 and 16. Only 2xx replies count toward throughput, each round's real
duration (until its last reply) is the denominator, and the script exits 1 if any request
failed. It prints req/s, p50 and p99 for each, and the throughput ratios at concurrency 16
last. Goal: at least 5x `mlflow models serve` at concurrency 16, and p50 under 5 ms at
concurrency 1.

Every request crosses the ingress (records, router) and one hop to the model's deployment;
`--ab` serves the same version as a staging variant too, half the clients each, to price the
experiment. The first line prints the write-ahead spool's cost per record on the request path
(one JSON line appended to the replica's local file), measured in this process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(home: Path) -> tuple[str, str]:
    """A registered version trained on the real data; returns (model name, version)."""
    from bridge_assets.core.training import preset
    from bridge_assets.lake.feature_store import FeatureStore, build_features
    from bridge_assets.lake.landing import land_seed, landed_batches
    from bridge_assets.lake.raw import validate_batch
    from bridge_assets.lake.settings import StorageSettings
    from bridge_assets.ml.round import run_round
    from bridge_assets.ml.registry import promote_to_production
    from bridge_assets.ml.tracking import MlflowSettings, log_round

    store = StorageSettings.from_env().open()
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    version = build_features(store).version
    result = run_round(FeatureStore(store).scan(version).collect(), [preset("default")])
    settings = MlflowSettings.from_env()
    record = log_round(settings, result, feature_version=version.version)
    promote_to_production(settings.activate(), settings.model_name, record.model_version)
    return settings.model_name, record.model_version


def start_mlflow_serve(name: str, version: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}  # it execs uvicorn from PATH
    command = [f"{bin_dir}/mlflow", "models", "serve", "-m", f"models:/{name}/{version}", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"mlflow models serve did not start: {log.read_text()[-2000:]}")


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


def load(port: int, path: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    """Closed loop: each client sends its next request when the previous answers. Returns the
    latencies of 2xx replies, the number of failed requests, and the round's real duration."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json", "X-Client-ID": f"bench-client-{index}"}  # sticky under --ab
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                connection.request("POST", path, body, headers)
                reply = connection.getresponse()
                reply.read()
                ok = 200 <= reply.status < 300
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            if ok:
                latencies[index].append(time.perf_counter() - started)
            else:
                errors[index] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for per_client in latencies for x in per_client], sum(errors), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of one round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target and concurrency")
    parser.add_argument("--python-proxy", action="store_true", help="Serve's default Python proxy instead of HAProxy")
    parser.add_argument("--ab", action="store_true", help="also a staging variant (same version), weight 0.5")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bridge-serve-bench-"))
    os.environ.update({
        "BRIDGE_HOME": str(home), "BRIDGE_RAY_PORT": str(free_port()), "BRIDGE_SERVE_PORT": str(free_port()),
        "BRIDGE_RAY_TMPDIR": f"/tmp/brb-{os.getpid()}",  # short: HAProxy socket paths under it stay < 97 chars
        "BRIDGE_SERVE_HAPROXY": "0" if args.python_proxy else "1",
    })  # fmt: skip
    for name in ("MLFLOW_TRACKING_URI", "BRIDGE_S3_BUCKET", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    from serving.deploy import ServingSettings, deploy, stop_serving

    name, version = prepare(home)
    serve_port = ServingSettings.from_env().port
    cores = os.cpu_count() or 1
    invocation = json.dumps({"dataframe_records": [REQUEST]}).encode()
    servers = [(free_port(), workers) for workers in sorted({1, cores})]
    processes = [start_mlflow_serve(name, version, port, workers, home / f"mlflow-serve-{workers}.log") for port, workers in servers]
    try:
        deploy(name, version, "production", **({"staging_version": version, "staging_weight": 0.5} if args.ab else {}))
        targets = {"ray serve /predict": (serve_port, "/predict", json.dumps(REQUEST).encode())} | {
            f"mlflow models serve, {workers} worker{'s' if workers > 1 else ''}": (port, "/invocations", invocation)
            for port, workers in servers
        }
        for port, path, body in targets.values():  # warm up every server (and each uvicorn worker)
            load(port, path, body, 4, 1.0)
        results: dict[tuple[str, int], list] = {}
        for _ in range(args.rounds):
            for concurrency in (1, 16):
                for target, (port, path, body) in targets.items():
                    latencies, errors, seconds = load(port, path, body, concurrency, args.seconds)
                    totals = results.setdefault((target, concurrency), [[], 0, 0.0])
                    totals[0].extend(latencies)
                    totals[1] += errors
                    totals[2] += seconds
        proxy = "default Python proxy" if args.python_proxy else "HAProxy ingress"
        experiment = "; A/B: production and staging, half the clients each" if args.ab else ""
        print(f"interaction spool: {spool_cost():.1f} us per record appended on the request path")
        print(f"model {name} v{version}; Ray Serve with the {proxy}, interaction logging on{experiment}; "
              f"{args.rounds} rounds x {args.seconds:.0f} s per cell, alternating; {cores} cores; 2xx replies only")
        throughput = {}
        for (target, concurrency), (latencies, errors, seconds) in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            throughput[(target, concurrency)] = len(latencies) / seconds
            p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99]) if latencies else (float("nan"), float("nan"))
            print(f"{target:<36} c={concurrency:<3} {len(latencies) / seconds:>8,.0f} req/s   p50 {p50:6.1f} ms   p99 {p99:7.1f} ms   errors {errors}")
        ours = throughput[("ray serve /predict", 16)]
        for target in targets:
            if target.startswith("mlflow"):
                print(f"throughput ratio at concurrency 16, ray serve / {target}: {ours / throughput[(target, 16)]:.1f}x")
        failed = sum(errors for _, errors, _ in results.values())
        if failed:
            print(f"{failed} requests failed: these figures are not from a clean run", file=sys.stderr)
        return 1 if failed else 0
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        stop_serving()


if __name__ == "__main__":
    sys.exit(main())
