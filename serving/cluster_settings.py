"""What a local Ray instance is: its settings from the environment, the ports it derives per
node from two base ports, and the environment Ray and Serve start with. Read by the
supervisor (`serving.cluster`), the stack and the tests; starts nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, PositiveInt

from bridge_assets.settings import EnvSettings

DEFAULT_RAY_PORT = 6390
DEFAULT_SERVE_PORT = 8000
DEFAULT_RAY_TEMP_DIR = "/tmp/bridge-ray"
STATE_FILE = "bridge-instance.json"
INSTANCE_MARKER = "BRIDGE_RAY_INSTANCE"  # in the environment of every process our `ray start` begets
RAY_PORTS_PER_NODE = 200  # see NodePorts


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


def _cpus() -> int:
    return os.cpu_count() or 2


class ClusterSettings(EnvSettings):
    """This instance's Ray; `address` set means an external cluster that we use but never stop."""

    address: str | None = Field(
        None, validation_alias="RAY_ADDRESS", description="Ray cluster for Serve; unset: a detached local Ray head"
    )
    ray_port: PositiveInt = Field(
        DEFAULT_RAY_PORT,
        validation_alias="BRIDGE_RAY_PORT",
        description="the local head's base port (the rest derive from it)",
    )
    temp_dir: Annotated[str, AfterValidator(os.path.abspath)] = Field(
        DEFAULT_RAY_TEMP_DIR, validation_alias="BRIDGE_RAY_TMPDIR", description="the local Ray's session and log folder"
    )
    serve_host: str = Field("127.0.0.1", validation_alias="BRIDGE_SERVE_HOST", description="Serve's HTTP host")
    serve_port: PositiveInt = Field(
        DEFAULT_SERVE_PORT, validation_alias="BRIDGE_SERVE_PORT", description="Serve's HTTP port"
    )
    haproxy: bool = Field(
        True, validation_alias="BRIDGE_SERVE_HAPROXY", description="Serve's HAProxy ingress (set at start)"
    )
    num_cpus: PositiveInt = Field(
        default_factory=_cpus, validation_alias="BRIDGE_RAY_NUM_CPUS", description="CPUs the local head offers"
    )
    object_store_mb: PositiveInt = Field(
        512, validation_alias="BRIDGE_RAY_OBJECT_STORE_MB", description="the local head's object store"
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
