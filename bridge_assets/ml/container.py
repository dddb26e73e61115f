"""What a training container is given (the Docker launcher, step 13), decided without Docker.

A container's configuration is readable by anyone who can run `docker inspect`, so secrets stay
out of its environment: AWS keys travel in a credentials file (owner-only, mounted read-only,
removed when the round ends) that `AWS_SHARED_CREDENTIALS_FILE` names. Local state the round
reads and writes — a local lake, the embedded MLflow store and its artifacts — is mounted at the
same path inside, so the paths in its variables mean the same thing in the container.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from bridge_assets.core.model_api import ENTRY_POINT
from bridge_assets.settings import EnvSettings


class TrainingSettings(EnvSettings):
    """Where a training round runs (step 13), and what trains its models."""

    launcher: Literal["subprocess", "docker"] = Field(
        "subprocess",
        validation_alias="BRIDGE_TRAINING_LAUNCHER",
        description="`subprocess` or `docker` (Pipes client for training)",
    )
    image: str = Field(
        "bridge:latest", validation_alias="BRIDGE_TRAINING_IMAGE", description="image for the Docker launcher"
    )
    trainer: str | None = Field(
        None,
        validation_alias="BRIDGE_TRAINER",
        pattern=ENTRY_POINT.pattern,
        description="a Python entry point `package.module:function` that trains every configuration of a round "
        "(default: each preset's own; `bridge_assets.core.boosting:train_boosting` is the built-in scikit-learn one)",
    )


AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CONTAINER_CREDENTIALS = "/run/secrets/bridge-aws-credentials"


@dataclass(frozen=True)
class ContainerSpec:
    """The environment and the bind mounts (docker-py's `volumes` form) of a training container."""

    environment: dict[str, str]
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)


def local_state_paths(env: Mapping[str, str]) -> list[str]:
    """Host folders the round uses: the local lake (no bucket), the SQLite store's folder, and
    file artifacts."""
    paths = []
    if not env.get("BRIDGE_S3_BUCKET") and env.get("BRIDGE_LAKE_ROOT"):
        paths.append(env["BRIDGE_LAKE_ROOT"])
    tracking = env.get("MLFLOW_TRACKING_URI", "")
    if tracking.startswith("sqlite:///"):
        paths.append(str(Path(tracking.removeprefix("sqlite:///")).parent))
    artifacts = env.get("BRIDGE_MLFLOW_ARTIFACTS", "")
    if artifacts.startswith("file:"):
        paths.append(urlparse(artifacts).path)
    return sorted({str(Path(p).resolve()) for p in paths})


@contextmanager
def container_spec(env: Mapping[str, str]) -> Iterator[ContainerSpec]:
    """The container's environment without AWS keys, with the keys (if any) in a credentials
    file mounted read-only for as long as the block runs, and local state mounted in place."""
    environment = {name: value for name, value in env.items() if name not in AWS_SECRETS}
    volumes = {path: {"bind": path, "mode": "rw"} for path in local_state_paths(env)}
    keys = {name: env[name] for name in AWS_SECRETS if env.get(name)}
    if not keys:
        yield ContainerSpec(environment, volumes)
        return
    # The image runs as its own user (uid 1000), which must read the file: world-readable, in a
    # folder that others may pass through but not list, under a name nobody can guess.
    folder = Path(tempfile.mkdtemp(prefix="bridge-secrets-"))
    credentials = folder / f"aws-credentials-{secrets.token_hex(16)}"
    try:
        folder.chmod(0o711)
        credentials.touch(mode=0o644)
        credentials.write_text("[default]\n" + "".join(f"{name.lower()} = {value}\n" for name, value in keys.items()))
        environment |= {"AWS_SHARED_CREDENTIALS_FILE": CONTAINER_CREDENTIALS}
        yield ContainerSpec(environment, volumes | {str(credentials): {"bind": CONTAINER_CREDENTIALS, "mode": "ro"}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
