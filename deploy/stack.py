"""A production-shaped stack on this machine, each part the real server (`make stack`).

PostgreSQL (Debian's package) holds two databases: the Dagster instance (`dagster-postgres`)
and MLflow's tracking store and registry. An MLflow tracking server keeps artifacts in S3;
s3rver (npm, wrapped by `deploy/s3/server.js`) stands in for S3/MinIO and keeps objects as
files, so `make stack-stop` then `make stack` finds them again; Ray runs as a cluster of two nodes on this host (a head
and a worker, through `serving.cluster`, each node on its own ports); the Dagster webserver
and daemon run against the Postgres instance. Every process starts detached (its own session),
and its pid, session and port go into `state.json`, so `make stack-stop` ends exactly what the
stack started. The environment the rest of bridge needs to use the stack is written to
`stack.env` (plain KEY=value lines), which `make demo`/`make serve`/`make stop` apply through
`BRIDGE_ENV_FILE`. The code reads only those variables: nothing branches on "the stack".

Settings (all optional): `BRIDGE_STACK_DIR` (default `$BRIDGE_HOME/stack`), ports
`BRIDGE_STACK_PG_PORT`, `BRIDGE_STACK_S3_PORT`, `BRIDGE_STACK_MLFLOW_PORT`,
`BRIDGE_STACK_DAGSTER_PORT` (0 or unset: a free port), `BRIDGE_RAY_PORT`/`BRIDGE_SERVE_PORT`
(unset: a free block), `BRIDGE_RAY_TMPDIR`, `BRIDGE_S3_BUCKET`/`BRIDGE_S3_PREFIX`,
`BRIDGE_SERVE_REPLICAS` (default 2: one per node).

Usage: `python -m deploy.stack start [--restore DIR] [--only postgres,s3,...]`, `stop`, `status`,
`backup DIR`, `restart dagster`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
import yaml
from pydantic import Field

from bridge_assets.lake.settings import PROJECT_ROOT, bridge_home
from bridge_assets.retrying import poll, retried
from bridge_assets.settings import DERIVED, EnvSettings
from serving.processes import free_port, listening, port_free, session_members, terminate, write_atomically

COMPONENTS = ("postgres", "s3", "mlflow", "ray", "dagster")
# Each process (group) the stack starts, and the deploy/compose.yaml services that run it as
# containers; a test holds the two together.
COMPOSE_COUNTERPARTS = {
    "postgres": ("postgres",),
    "s3": ("minio", "minio-init"),
    "mlflow": ("mlflow",),
    "ray": ("ray-head", "ray-worker"),
    "dagster-code": ("dagster-code",),
    "dagster-webserver": ("dagster-webserver",),
    "dagster-daemon": ("dagster-daemon",),
}
PG_USER = "bridge"
DATABASES = ("dagster", "mlflow")
STATE_FILE = "state.json"
ENV_FILE = "stack.env"
REGION = "us-east-1"
BIN = Path(sys.executable).parent
_SAVING = threading.RLock()  # the stack's dicts change from two threads while parts start


class StackError(RuntimeError):
    """The stack cannot do what was asked; the message says what to do."""


class StackSettings(EnvSettings):
    """Where the stack lives and which ports it asks for (0: any free port). The lake's bucket
    and prefix and the replica count are the stack's own defaults for variables the lake and
    serving also read."""

    directory: Path = Field(
        validation_alias="BRIDGE_STACK_DIR",
        description="where `make stack` keeps its state (default: `$BRIDGE_HOME/stack`)",
        json_schema_extra=DERIVED,
    )
    components: tuple[str, ...] = COMPONENTS  # chosen on the command line
    pg_port: int = Field(0, ge=0, validation_alias="BRIDGE_STACK_PG_PORT", description="Postgres's port")
    s3_port: int = Field(0, ge=0, validation_alias="BRIDGE_STACK_S3_PORT", description="the S3 server's port")
    mlflow_port: int = Field(0, ge=0, validation_alias="BRIDGE_STACK_MLFLOW_PORT", description="MLflow's port")
    dagster_port: int = Field(0, ge=0, validation_alias="BRIDGE_STACK_DAGSTER_PORT", description="the Dagster UI's port")
    ray_port: int = Field(0, ge=0, validation_alias="BRIDGE_RAY_PORT", description="the Ray head's port")
    serve_port: int = Field(0, ge=0, validation_alias="BRIDGE_SERVE_PORT", description="Serve's HTTP port")
    ray_temp_dir: str = Field(
        validation_alias="BRIDGE_RAY_TMPDIR", description="Ray's session folder", json_schema_extra=DERIVED
    )
    bucket: str = Field("bridge", validation_alias="BRIDGE_S3_BUCKET", description="the lake's bucket")
    prefix: str = Field("lake", validation_alias="BRIDGE_S3_PREFIX", description="key prefix inside the bucket")
    replicas: int = Field(2, ge=1, validation_alias="BRIDGE_SERVE_REPLICAS", description="model replicas")

    @classmethod
    def derive(cls, values: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
        directory = Path(values.get("BRIDGE_STACK_DIR") or bridge_home(env) / "stack").resolve()
        values["BRIDGE_STACK_DIR"] = str(directory)
        # short: Ray's unix socket paths must stay under ~107 characters
        values.setdefault("BRIDGE_RAY_TMPDIR", f"/tmp/bridge-stack-{hashlib.sha256(str(directory).encode()).hexdigest()[:8]}")
        if "BRIDGE_S3_PREFIX" in env and not values.get("BRIDGE_S3_PREFIX"):
            values["BRIDGE_S3_PREFIX"] = ""  # set but empty: the bucket's root
        return values

    @classmethod
    def for_components(cls, env: Mapping[str, str], components: Iterable[str] = COMPONENTS) -> StackSettings:
        """The settings `env` holds, for the named parts of the stack (in their start order)."""
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise StackError(f"unknown stack components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
        chosen = tuple(c for c in COMPONENTS if c in set(components))
        return cls.from_env(env).model_copy(update={"components": chosen})

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def env_file(self) -> Path:
        return self.directory / ENV_FILE


@dataclass
class Stack:
    """A running stack as recorded in its state file: processes, ports, environment."""

    settings: StackSettings
    processes: dict[str, dict] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: StackSettings) -> Stack | None:
        try:
            state = json.loads(settings.state_file.read_text())
        except (OSError, ValueError):
            return None
        return cls(settings, state["processes"], state["env"], state.get("secrets", {}))

    def save(self) -> None:
        """State (mode 0600: it holds the stack's generated credentials) and stack.env."""
        with _SAVING:  # parts start concurrently
            self.settings.directory.mkdir(parents=True, exist_ok=True)
            state = {"processes": self.processes, "env": self.env, "secrets": self.secrets}
            write_atomically(self.settings.state_file, json.dumps(state, indent=2), private=True)
            write_atomically(
                self.settings.env_file, "".join(f"{k}={v}\n" for k, v in sorted(self.env.items())), private=True
            )

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """A stack process's environment: the caller's, the stack's variables over it."""
        return {**base, **self.env, "BRIDGE_ENV_FILE": ""}


# ---------------------------------------------------------------- processes and ports


def _wait(what: str, ready, timeout: float, log: Path | None = None, pid: int | None = None) -> None:
    """Poll `ready()` until it holds; fail naming `what` and the log's tail."""

    def up() -> bool:
        if ready():
            return True
        if pid is not None and not _running(pid):
            raise StackError(f"{what} exited while starting\n{_tail(log)}")
        return False

    if not poll(up, timeout, every=0.25):
        raise StackError(f"{what} did not become ready within {timeout:.0f} s\n{_tail(log)}")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""


def _spawn(
    stack: Stack, name: str, command: list[str], env: Mapping[str, str], port: int | None, cwd: Path | None = None
) -> dict:
    """Start `command` detached (its own session) with output to `logs/<name>.log`; record it."""
    logs = stack.settings.directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=cwd,
        )  # fmt: skip
    record = {"pid": process.pid, "sid": process.pid, "started_at": psutil.Process(process.pid).create_time(),
              "port": port, "log": str(log), "command": command[:2]}  # fmt: skip
    with _SAVING:
        stack.processes[name] = record
        stack.save()
    return record


def _stop_recorded(stack: Stack, name: str) -> None:
    record = stack.processes.pop(name, None)
    if record is not None:
        terminate(session_members(record["sid"], record["started_at"], descendants=True), grace_seconds=10)
        stack.save()


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """Debian's PostgreSQL server binaries (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise StackError("PostgreSQL is not installed: run `apt-get install -y postgresql` (what `make stack` does)")
    return Path(found[-1]).parent


def ensure_postgres_installed() -> Path:
    """Install Debian's `postgresql` if it is missing (as root), then its bin folder."""
    try:
        return postgres_bin()
    except StackError:
        if os.geteuid() != 0:
            raise
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env)
    return postgres_bin()


def _as_postgres(command: list[str]) -> list[str]:
    """`initdb` and the server refuse to run as root: as root, run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _give_to_postgres(path: Path) -> None:
    """Make `path` the postgres user's, and check it can reach it (every parent traversable)."""
    if os.geteuid() != 0:
        return
    import pwd

    user = pwd.getpwnam("postgres")
    os.chown(path, user.pw_uid, user.pw_gid)
    for parent in path.parents:
        if parent.stat().st_uid != user.pw_uid and not parent.stat().st_mode & 0o001:
            raise StackError(
                f"the postgres user cannot enter {parent} (mode {oct(parent.stat().st_mode & 0o777)}): "
                "put BRIDGE_STACK_DIR under a folder others may traverse"
            )


def _pg_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": stack.secrets["pg_password"], "PGHOST": "127.0.0.1",
            "PGPORT": str(stack.processes["postgres"]["port"]), "PGUSER": PG_USER}  # fmt: skip


def start_postgres(stack: Stack) -> None:
    """initdb (first time) and start the server on 127.0.0.1 only, password auth, no unix socket."""
    binaries = ensure_postgres_installed()
    root = stack.settings.directory / "postgres"
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    _give_to_postgres(root)
    password = stack.secrets.setdefault("pg_password", secrets.token_hex(16))
    if not (data / "PG_VERSION").exists():
        pwfile = root / "initdb.pw"
        pwfile.write_text(password + "\n")
        _give_to_postgres(pwfile)
        try:
            subprocess.run(
                _as_postgres([str(binaries / "initdb"), "-D", str(data), "-U", PG_USER, "--pwfile", str(pwfile),
                              "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C.UTF-8"]),
                check=True, capture_output=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as error:
            raise StackError(f"initdb failed: {error.stderr.decode(errors='replace')[-2000:]}") from error
        finally:
            pwfile.unlink(missing_ok=True)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# bridge stack\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
    port = stack.settings.pg_port or free_port()
    log = root / "server.log"
    if not log.exists():
        log.touch()
        _give_to_postgres(log)
    # `postgres` itself (not pg_ctl) in its own session: its pid is the postmaster's
    record = _spawn(stack, "postgres", _as_postgres([str(binaries / "postgres"), "-D", str(data), "-p", str(port)]),
                    os.environ, port)  # fmt: skip
    _wait(f"PostgreSQL on 127.0.0.1:{port}", lambda: _pg_ready(binaries, port), 60, Path(record["log"]), record["pid"])
    for database in DATABASES:
        exists = subprocess.run(
            [str(binaries / "psql"), "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
            env=_pg_env(stack), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not exists:
            subprocess.run([str(binaries / "createdb"), database], env=_pg_env(stack), check=True)


def stop_postgres(stack: Stack) -> None:
    """A fast shutdown (SIGTERM would wait for every client to disconnect), then the session."""
    data = stack.settings.directory / "postgres" / "data"
    subprocess.run(_as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                   capture_output=True)  # fmt: skip
    _stop_recorded(stack, "postgres")


def _pg_ready(binaries: Path, port: int) -> bool:
    return subprocess.run([str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0


# ---------------------------------------------------------------- S3 (s3rver, objects on disk)

S3_SERVER = PROJECT_ROOT / "deploy" / "s3" / "server.js"


def s3_client(stack: Stack):
    import boto3

    return boto3.client(
        "s3", endpoint_url=stack.env["AWS_ENDPOINT_URL_S3"], region_name=REGION,
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def start_s3(stack: Stack) -> None:
    """The stack's S3 (`deploy/s3/server.js`: s3rver with conditional creation and our keys):
    objects are files under `<stack>/s3`, so a stopped stack starts again with every object.
    The bucket is created on the first start only."""
    if not (S3_SERVER.parent / "node_modules" / "s3rver").is_dir():
        raise StackError("the stack's S3 server is not installed: `make stack` installs it (npm ci in deploy/s3)")
    node = shutil.which("node") or "node"
    port = stack.settings.s3_port or free_port()
    keys = {
        "AWS_ACCESS_KEY_ID": stack.secrets.setdefault("s3_key", "bridge-" + secrets.token_hex(6)),
        "AWS_SECRET_ACCESS_KEY": stack.secrets.setdefault("s3_secret", secrets.token_hex(20)),
    }
    data = stack.settings.directory / "s3"
    data.mkdir(parents=True, exist_ok=True)
    server_env = {
        **os.environ,
        "S3_ACCESS_KEY_ID": keys["AWS_ACCESS_KEY_ID"],
        "S3_SECRET_ACCESS_KEY": keys["AWS_SECRET_ACCESS_KEY"],
    }
    record = _spawn(stack, "s3", [node, str(S3_SERVER), str(data), str(port)], server_env, port)
    _wait(f"the S3 server on 127.0.0.1:{port}", lambda: listening(port), 60, Path(record["log"]), record["pid"])
    stack.env |= {
        "BRIDGE_S3_BUCKET": stack.settings.bucket,
        "BRIDGE_S3_PREFIX": stack.settings.prefix,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        **keys,
        "AWS_REGION": REGION,
    }
    client = s3_client(stack)
    if stack.settings.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=stack.settings.bucket)
    stack.save()


# ---------------------------------------------------------------- MLflow server


def start_mlflow(stack: Stack, base_env: Mapping[str, str] = os.environ) -> None:
    """`mlflow server`: tracking store and registry in Postgres, artifacts proxied to S3.

    The database password reaches it as PGPASSWORD (libpq), never in a URI or a command line.
    """
    port = stack.settings.mlflow_port or free_port()
    pg_port = stack.processes["postgres"]["port"]
    env = stack.child_env(base_env) | {
        "PGPASSWORD": stack.secrets["pg_password"],
        "MLFLOW_S3_ENDPOINT_URL": stack.env["AWS_ENDPOINT_URL_S3"],
        # MLflow 3's GenAI job runner: seven more worker processes bridge never uses
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"postgresql://{PG_USER}@127.0.0.1:{pg_port}/mlflow",
        "--artifacts-destination", f"s3://{stack.settings.bucket}/mlflow",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
    ]  # fmt: skip
    record = _spawn(stack, "mlflow", command, env, port)
    url = f"http://127.0.0.1:{port}"
    _wait(f"MLflow server at {url}", lambda: _http_ok(f"{url}/health"), 400, Path(record["log"]), record["pid"])
    with _SAVING:
        stack.env |= {"MLFLOW_TRACKING_URI": url}
        stack.save()


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=3).status_code == 200
    except requests.RequestException:
        return False


# ---------------------------------------------------------------- Ray: two nodes on this host


def _ray_block_free(ray_port: int, serve_port: int, nodes: int) -> bool:
    from serving.cluster_settings import NodePorts

    return all(port_free(p) for i in range(nodes) for p in NodePorts.derive(ray_port, serve_port, i, {}).all(i == 0))


def _ray_ports(settings: StackSettings, nodes: int = 2) -> tuple[int, int]:
    """Base ports for Ray (a block of 200 per node) and Serve whose every derived port is free.

    Both below Linux's ephemeral range (32768+), where any client's socket may take a port.
    """
    if settings.ray_port and settings.serve_port:
        return settings.ray_port, settings.serve_port
    for _ in range(200):
        ray_port = settings.ray_port or 10000 + 400 * secrets.randbelow(30)
        serve_port = settings.serve_port or 22000 + 20 * secrets.randbelow(400)
        if _ray_block_free(ray_port, serve_port, nodes):
            return ray_port, serve_port
    raise StackError("found no free block of ports for Ray: set BRIDGE_RAY_PORT and BRIDGE_SERVE_PORT")


def ray_cluster_env(stack: Stack) -> dict[str, str]:
    """The variables `serving.cluster` reads for the stack's own (local) Ray instance, and the
    lake's credentials: replicas receive locations in their init arguments (which Ray stores)
    but credentials only from their node's environment, as compose's Ray services do."""
    keep = ("BRIDGE_RAY_PORT", "BRIDGE_SERVE_PORT", "BRIDGE_RAY_TMPDIR", "BRIDGE_SERVE_HOST", "BRIDGE_SERVE_HAPROXY")
    keep += ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3")
    # Patience for a busy 2-core host: Serve's controller kills a proxy that misses 3 health
    # checks of 10 s (a starting HAProxy proxy can, and `serve.start` then fails).
    patience = {
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": os.environ.get("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    }
    return {**os.environ, **{k: v for k, v in stack.env.items() if k in keep}, "BRIDGE_RAY_NUM_CPUS": "1"} | patience


def start_ray(stack: Stack) -> None:
    """A head and one worker node (1 CPU each) on their own ports, through `serving.cluster`."""
    from serving.cluster import start_local_node, start_local_ray, stop_serving
    from serving.cluster_settings import ClusterError, ClusterSettings

    ray_port, serve_port = _ray_ports(stack.settings)
    with _SAVING:
        stack.env |= {
            "BRIDGE_RAY_PORT": str(ray_port),
            "BRIDGE_SERVE_PORT": str(serve_port),
            "BRIDGE_SERVE_HOST": "127.0.0.1",
            "BRIDGE_RAY_TMPDIR": stack.settings.ray_temp_dir,
            "BRIDGE_SERVE_REPLICAS": str(stack.settings.replicas),
        }
        stack.save()
    env = ray_cluster_env(stack)
    cluster = ClusterSettings.from_env(env)
    saved = dict(os.environ)
    os.environ.update(env)  # cluster.py reads a few of Ray's variables from the process environment
    try:

        def start_nodes() -> None:
            try:
                start_local_ray(cluster)
                start_local_node(cluster, 1, num_cpus=1)
            except ClusterError:
                stop_serving(env)  # a half-started cluster goes, whether or not another try follows
                raise

        # a raylet registering later than Ray's fixed 30 s fails `ray start`: again
        retried(start_nodes, 3, retry_on=ClusterError)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with _SAVING:
        stack.processes["ray"] = {"port": ray_port, "serve_port": serve_port, "temp_dir": cluster.temp_dir,
                                  "nodes": (cluster.state() or {}).get("nodes", [])}  # fmt: skip
        # users of the stack reach it as an external cluster: `make stop`/demo never end the stack's Ray
        stack.env |= {"RAY_ADDRESS": cluster.local_address}
        stack.save()


def start_cluster_serve(stack: Stack, attempts: int = 3) -> None:
    """Start Serve's controller and proxies on the cluster now, in a child driver (retried):
    deploys then find Serve running. On a busy host the controller can kill a slow-starting
    proxy, which fails `serve.start` for whoever calls it first."""
    env = ray_cluster_env(stack) | {"RAY_ADDRESS": stack.env["RAY_ADDRESS"]}
    script = "from serving.cluster import connect, start_serve; from serving.cluster_settings import ClusterSettings; s = ClusterSettings.from_env(); connect(s); start_serve(s)"

    def start() -> None:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
        if done.returncode != 0:
            raise StackError(f"Serve did not start on the stack's cluster:\n{done.stderr[-3000:]}")

    retried(start, attempts, retry_on=StackError)


def stop_ray(stack: Stack) -> str:
    from serving.cluster import stop_serving
    from serving.cluster_settings import ClusterSettings

    if "ray" not in stack.processes:
        return "not running"
    env = ray_cluster_env(stack)
    report = stop_serving(env)
    stack.processes.pop("ray")
    stack.save()
    return report.message(ClusterSettings.from_env(env))


# ---------------------------------------------------------------- Dagster webserver and daemon

def dagster_instance_yaml() -> str:
    """The compose deployment's Dagster instance (deploy/dagster.yaml: Postgres storage, queued
    runs, run monitoring) for processes on one host: runs start as processes of the code
    location instead of Docker containers, two at a time on the machine the stack shares."""
    instance = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text())
    del instance["run_launcher"]
    instance["run_coordinator"]["config"]["max_concurrent_runs"] = 2
    return "# Written by deploy/stack.py from deploy/dagster.yaml.\n" + yaml.safe_dump(instance, sort_keys=False)


WORKSPACE_YAML = """\
# Written by deploy/stack.py: the code location runs as its own gRPC server (as in compose and
# Kubernetes), so restarting the webserver or the daemon ends no run.
load_from:
  - grpc_server:
      host: 127.0.0.1
      port: {port}
      location_name: bridge
"""


def _dagster_env(stack: Stack) -> None:
    home = stack.settings.directory / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(dagster_instance_yaml())
    stack.env |= {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(stack.processes["postgres"]["port"]),
        "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": stack.secrets["pg_password"],
        "DAGSTER_PG_DB": "dagster",
    }
    stack.save()


def start_code_location(stack: Stack, base_env: Mapping[str, str] = os.environ) -> None:
    """bridge's code location as a gRPC server; runs are launched from it (DefaultRunLauncher)."""
    _dagster_env(stack)
    port = free_port()
    command = [str(BIN / "dagster"), "api", "grpc", "-m", "bridge_assets.definitions", "-a", "defs",
               "-h", "127.0.0.1", "-p", str(port), "--location-name", "bridge"]  # fmt: skip
    record = _spawn(stack, "dagster-code", command, stack.child_env(base_env), port, PROJECT_ROOT)
    (stack.settings.directory / "dagster" / "workspace.yaml").write_text(WORKSPACE_YAML.format(port=port))
    _wait(
        f"the code location's gRPC server on 127.0.0.1:{port}",
        lambda: listening(port),
        400,
        Path(record["log"]),
        record["pid"],
    )


def start_dagster(stack: Stack, base_env: Mapping[str, str] = os.environ) -> None:
    """The webserver and the daemon on the Postgres instance, reaching the code location's server.

    Both start before either is awaited (~10 s each here).
    """
    port = stack.processes.get("dagster-webserver", {}).get("port") or stack.settings.dagster_port or free_port()
    env = stack.child_env(base_env)
    workspace = str(stack.settings.directory / "dagster" / "workspace.yaml")
    web = _spawn(stack, "dagster-webserver",
                 [str(BIN / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(port)], env, port, PROJECT_ROOT)  # fmt: skip
    daemon = _spawn(
        stack, "dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w", workspace], env, None, PROJECT_ROOT
    )
    url = f"http://127.0.0.1:{port}"
    _wait(f"Dagster webserver at {url}", lambda: _http_ok(f"{url}/server_info"), 400, Path(web["log"]), web["pid"])
    _wait("Dagster daemon", lambda: _daemon_ready(stack), 400, Path(daemon["log"]), daemon["pid"])
    stack.env |= {"BRIDGE_DAGSTER_URL": url}
    stack.save()


def _daemon_ready(stack: Stack) -> bool:
    """The daemon has loaded the code location and heartbeats (its sensor daemon said so)."""
    log = Path(stack.processes["dagster-daemon"]["log"])
    return log.exists() and "SensorDaemon" in log.read_text(errors="replace")


def stop_dagster(stack: Stack) -> None:
    """Stop the webserver and the daemon (SIGTERM, as an orchestrator would); the code location
    and the runs it launched go on."""
    for name in ("dagster-daemon", "dagster-webserver"):
        record = stack.processes.get(name)
        if record:
            terminate(session_members(record["sid"], record["started_at"], descendants=True), grace_seconds=20)
    Path(stack.processes["dagster-daemon"]["log"]).unlink(missing_ok=True)


def restart_dagster(stack: Stack, base_env: Mapping[str, str] = os.environ) -> None:
    stop_dagster(stack)
    start_dagster(stack, base_env)


# ---------------------------------------------------------------- the whole stack


def start(
    settings: StackSettings,
    restore_from: Path | None = None,
    base_env: Mapping[str, str] = os.environ,
    settings_env: Mapping[str, str] | None = None,
) -> Stack:
    """Start the chosen components (all by default); with `restore_from`, load a backup into the
    fresh databases and bucket before any server uses them. `settings_env` (documented
    variables, e.g. the demo's loop cadences) goes to every process and into stack.env."""
    existing = Stack.load(settings)
    if existing is not None and any(_alive(r) for r in existing.processes.values() if "sid" in r):
        raise StackError(f"a stack already runs from {settings.directory}: `make stack-stop` first")
    if restore_from is not None and (settings.directory / "postgres" / "data").exists():
        raise StackError(f"restore needs a fresh stack: {settings.directory} already has a database")
    stack = Stack(settings, env=dict(settings_env or {}), secrets=existing.secrets if existing else {})
    stack.save()
    try:
        start_postgres(stack)
        start_s3(stack)
        if restore_from is not None:
            restore(stack, restore_from)
        with ThreadPoolExecutor(1) as pool:  # the MLflow server starts while Ray does (both ~10-20 s)
            mlflow = pool.submit(start_mlflow, stack, dict(os.environ)) if "mlflow" in settings.components else None
            if "ray" in settings.components:
                start_ray(stack)
                start_cluster_serve(stack)
            if mlflow is not None:
                mlflow.result()
        if "dagster" in settings.components:
            start_code_location(stack, base_env)
            start_dagster(stack, base_env)
    except BaseException:
        stop(settings)
        raise
    return stack


def _alive(record: dict) -> bool:
    return bool(session_members(record["sid"], record["started_at"], descendants=True))


def stop(settings: StackSettings) -> list[str]:
    """Stop exactly what the stack started, newest first; what was stopped."""
    stack = Stack.load(settings)
    if stack is None:
        return []
    said = []
    for name in ("dagster-daemon", "dagster-webserver", "dagster-code"):
        if name in stack.processes:
            _stop_recorded(stack, name)
            said.append(name)
    if "ray" in stack.processes:
        said.append(f"ray: {stop_ray(stack)}")
    for name in ("mlflow", "s3"):
        if name in stack.processes:
            _stop_recorded(stack, name)
            said.append(name)
    if "postgres" in stack.processes:
        stop_postgres(stack)
        said.append("postgres")
    settings.env_file.unlink(missing_ok=True)
    return said


def status(settings: StackSettings) -> dict[str, str]:
    stack = Stack.load(settings)
    if stack is None:
        return {}
    out = {}
    for name, record in stack.processes.items():
        if "sid" in record:
            out[name] = f"{'up' if _alive(record) else 'DOWN'} (pid {record['pid']}, port {record['port']})"
        else:
            out[name] = f"ray {record['port']}, serve {record['serve_port']}, nodes {len(record['nodes'])}"
    return out


# ---------------------------------------------------------------- backup and restore


def backup(stack: Stack, destination: Path) -> Path:
    """`pg_dump` of both databases (custom format) and a copy of every object in the bucket
    (the lake and MLflow's artifacts) into `destination`."""
    binaries = postgres_bin()
    destination.mkdir(parents=True, exist_ok=True)
    for database in DATABASES:
        subprocess.run([str(binaries / "pg_dump"), "-Fc", "-f", str(destination / f"{database}.dump"), database],
                       env=_pg_env(stack), check=True)  # fmt: skip
    client = s3_client(stack)
    bucket_copy = destination / "bucket"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack.settings.bucket):
        for item in page.get("Contents", []):
            path = bucket_copy / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(stack.settings.bucket, item["Key"], str(path))
    return destination


def restore(stack: Stack, source: Path) -> None:
    """Load a backup into the stack's (fresh) databases and bucket."""
    binaries = postgres_bin()
    for database in DATABASES:
        subprocess.run([str(binaries / "pg_restore"), "--no-owner", "--exit-on-error", "-d", database,
                        str(source / f"{database}.dump")], env=_pg_env(stack), check=True)  # fmt: skip
    client = s3_client(stack)
    bucket_copy = source / "bucket"
    for path in sorted(p for p in bucket_copy.rglob("*") if p.is_file()):
        client.upload_file(str(path), stack.settings.bucket, path.relative_to(bucket_copy).as_posix())


def _start(settings: StackSettings, args: argparse.Namespace) -> None:
    from bridge_assets.lake.settings import settings_profile

    stack = start(settings, args.restore, settings_env=settings_profile("demo") if args.demo_cadences else None)
    print(f"stack up in {settings.directory}; environment in {settings.env_file}")
    for name, line in status(settings).items():
        print(f"  {name}: {line}")
    print(f"  Dagster UI: {stack.env.get('BRIDGE_DAGSTER_URL', '-')}   MLflow: {stack.env.get('MLFLOW_TRACKING_URI', '-')}")


def _stop(settings: StackSettings, _: argparse.Namespace) -> None:
    stopped = stop(settings)
    print("stopped: " + ("; ".join(stopped) if stopped else f"nothing (no stack in {settings.directory})"))


def _status(settings: StackSettings, _: argparse.Namespace) -> None:
    for name, line in (status(settings) or {"stack": "not running"}).items():
        print(f"{name}: {line}")


def _loaded(settings: StackSettings) -> Stack:
    stack = Stack.load(settings)
    if stack is None:
        raise StackError(f"no stack runs from {settings.directory}: `make stack` first")
    return stack


def _backup(settings: StackSettings, args: argparse.Namespace) -> None:
    print(f"backup in {backup(_loaded(settings), args.destination)}")


def _restart(settings: StackSettings, _: argparse.Namespace) -> None:
    restart_dagster(_loaded(settings))
    print("restarted the Dagster webserver and daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("start", help="start the stack and write stack.env")
    up.add_argument("--restore", type=Path, help="a backup folder to load into the fresh stack")
    up.add_argument("--only", help=f"comma-separated components (postgres and s3 always): {','.join(COMPONENTS)}")
    up.add_argument("--demo-cadences", action="store_true",
                    help="run the loop at `make demo`'s cadences (2-minute monitoring windows, automatic retraining), so the demo closes it on the stack in minutes")  # fmt: skip
    up.set_defaults(run=_start)
    commands.add_parser("stop", help="stop what the stack started").set_defaults(run=_stop)
    commands.add_parser("status", help="what runs").set_defaults(run=_status)
    save = commands.add_parser("backup", help="pg_dump both databases and copy the bucket")
    save.add_argument("destination", type=Path)
    save.set_defaults(run=_backup)
    again = commands.add_parser("restart", help="restart the Dagster webserver and daemon")
    again.add_argument("what", choices=["dagster"])
    again.set_defaults(run=_restart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    components = {"postgres", "s3", *args.only.split(",")} if getattr(args, "only", None) else COMPONENTS
    try:
        args.run(StackSettings.for_components(os.environ, components), args)
    except StackError as error:
        print(f"stack: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
