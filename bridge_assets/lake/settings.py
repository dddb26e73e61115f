"""Where the lake lives, read from the environment (the README's configuration table).

With nothing set, a local folder under `BRIDGE_HOME`; with `BRIDGE_S3_BUCKET` set, that bucket
on AWS or any S3-compatible endpoint. Dagster's resource (`bridge_assets.defs.resources`) reads
the same variables through `dg.EnvVar`; this module serves processes outside Dagster (CLI,
benchmarks, training subprocesses).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import AliasChoices, Field, NonNegativeFloat, NonNegativeInt

from bridge_assets.lake.storage import LocalStore, ObjectStore, S3Store, polars_s3_options
from bridge_assets.settings import DERIVED, EnvSettings

DEFAULT_REGION = "us-east-1"
DEFAULT_PREFIX = "bridge"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _is_checkout(root: Path) -> bool:
    """True when bridge runs from its source tree (an editable install), not site-packages."""
    return (root / "pyproject.toml").is_file() and (root / "bridge_assets").is_dir()


def bridge_home(env: Mapping[str, str] = os.environ) -> Path:
    """Root of all local state (lake, Dagster home, MLflow store).

    `BRIDGE_HOME` if set; else `.bridge` in the project's checkout, wherever the command is
    run from (a notebook in another folder sees the same lake as `make dev`); else `~/.bridge`.
    """
    if env.get("BRIDGE_HOME"):
        return Path(env["BRIDGE_HOME"]).expanduser().resolve()
    return (PROJECT_ROOT if _is_checkout(PROJECT_ROOT) else Path.home()) / ".bridge"


def env_file(env: Mapping[str, str] = os.environ) -> Path | None:
    """The `.env` every entry point reads: `BRIDGE_ENV_FILE` (empty: none), else the project's."""
    if "BRIDGE_ENV_FILE" in env:
        return Path(env["BRIDGE_ENV_FILE"]).expanduser() if env["BRIDGE_ENV_FILE"] else None
    return PROJECT_ROOT / ".env" if _is_checkout(PROJECT_ROOT) else None


def load_environment() -> dict[str, str]:
    """Apply the `.env` file to this process, then default `DAGSTER_HOME` to `BRIDGE_HOME/dagster`.

    One rule for every entry point (CLI, `make serve`, the demo, `dagster dev` through the
    Makefile): values in `.env` win over the shell, as `dagster dev` applies them. Returns what
    the file set.
    """
    from dotenv import dotenv_values

    path = env_file()
    loaded = {k: v for k, v in dotenv_values(path).items() if v is not None} if path and path.is_file() else {}
    os.environ.update(loaded)
    _refuse_a_late_contract(loaded.get("BRIDGE_CONTRACT"), path)
    ensure_dagster_instance(Path(os.environ.setdefault("DAGSTER_HOME", str(bridge_home() / "dagster"))))
    return loaded


def _refuse_a_late_contract(chosen: str | None, path: Path | None) -> None:
    """The contract is chosen when bridge is imported: one that `.env` names after this process
    loaded another would be ignored, so it is refused, saying what to do (the CLI and `dagster
    dev` read `.env` first; `make serve` and the demo import bridge before)."""
    loaded = sys.modules.get("bridge_assets.core.contract")
    if loaded is None or not chosen or Path(chosen).expanduser().resolve() == loaded.CONTRACT_PATH:
        return
    raise ValueError(
        f"BRIDGE_CONTRACT={chosen} in {path} comes after this process loaded {loaded.CONTRACT_PATH}: "
        "set BRIDGE_CONTRACT in the environment that starts it"
    )


PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def settings_profile(name: str) -> dict[str, str]:
    """A named set of settings (`bridge_assets/profiles/<name>.env`, KEY=value lines), e.g. the
    demo's short cadences, which `make demo` and `make stack --demo-cadences` both apply."""
    from dotenv import dotenv_values

    path = PROFILES / f"{name}.env"
    if not path.is_file():
        raise FileNotFoundError(f"no settings profile {name!r} ({path})")
    return {key: value for key, value in dotenv_values(path).items() if value is not None}


EMBEDDED_INSTANCE = "# bridge's embedded Dagster instance (SQLite under this folder)\ntelemetry:\n  enabled: false\n"


def ensure_dagster_instance(dagster_home: Path) -> None:
    """The embedded instance's `dagster.yaml`: Dagster's defaults, telemetry off (as in the
    stack and the tests). A file someone wrote is left alone; an empty one is filled in."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.is_file() or not config.read_text().strip():
        config.write_text(EMBEDDED_INSTANCE)


class StorageSettings(EnvSettings):
    """Everything needed to open the project's object store, and how hard to try."""

    local_root: str = Field(
        validation_alias="BRIDGE_LAKE_ROOT",
        description="the local lake's folder (default: `$BRIDGE_HOME/lake`)",
        json_schema_extra=DERIVED,
    )
    s3_bucket: str | None = Field(
        None, validation_alias="BRIDGE_S3_BUCKET", description="the lake's bucket; unset: local"
    )
    s3_prefix: str = Field(
        DEFAULT_PREFIX, validation_alias="BRIDGE_S3_PREFIX", description="key prefix inside the bucket"
    )
    endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        description="an S3-compatible endpoint",
    )
    region: str = Field(
        DEFAULT_REGION,
        validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"),
        description="the bucket's region",
    )
    access_key_id: str | None = Field(
        None, validation_alias="AWS_ACCESS_KEY_ID", description="S3 credentials", repr=False
    )
    secret_access_key: str | None = Field(
        None, validation_alias="AWS_SECRET_ACCESS_KEY", description="S3 credentials", repr=False
    )
    session_token: str | None = Field(  # temporary credentials (SSO, assumed roles)
        None, validation_alias="AWS_SESSION_TOKEN", description="S3 credentials", repr=False
    )
    retries: NonNegativeInt = Field(
        3,
        validation_alias="BRIDGE_STORAGE_RETRIES",
        description="Dagster retries of a raw or feature step after a storage failure",
    )
    retry_delay_seconds: NonNegativeFloat = Field(
        2.0,
        validation_alias="BRIDGE_STORAGE_RETRY_DELAY_SECONDS",
        description="the first retry's wait; doubled each time",
    )
    interactions_retention_days: NonNegativeFloat = Field(
        0.0,
        validation_alias="BRIDGE_INTERACTIONS_RETENTION_DAYS",
        description="interaction log hours older than this are deleted; 0 keeps them all",
    )

    @classmethod
    def derive(cls, values: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
        values.setdefault("BRIDGE_LAKE_ROOT", str(bridge_home(env) / "lake"))
        if "BRIDGE_S3_PREFIX" in env and not values.get("BRIDGE_S3_PREFIX"):
            values["BRIDGE_S3_PREFIX"] = ""  # set but empty: the bucket's root
        return values

    def open(self, client: object | None = None) -> ObjectStore:
        """The store these settings describe; `client` is an S3 client to reuse, if any."""
        if not self.s3_bucket:
            return LocalStore(self.local_root)
        if client is None:
            import boto3

            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token,
            )
        options = polars_s3_options(
            self.endpoint_url, self.region, self.access_key_id, self.secret_access_key, self.session_token
        )
        return S3Store(client, self.s3_bucket, self.s3_prefix, options)
