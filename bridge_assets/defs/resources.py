"""The project's resources, configured in one place from the environment.

Secrets reach Dagster only as `dg.EnvVar`, so they never appear in run config, the UI or logs.
"""

import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_docker import PipesDockerClient
from pydantic import Field

from bridge_assets.defs.pipes_messages import WholeLineMessageReader
from bridge_assets.lake.settings import DEFAULT_PREFIX, DEFAULT_REGION, StorageSettings
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.container import container_spec
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.tracking import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, PROJECT_ROOT, MlflowSettings
from bridge_assets.monitoring.alerts import LoopEvent, send_alert
from serving.deploy import ServingSettings


class LakeStorage(dg.ConfigurableResource):
    """The object store: a local folder by default, an S3 bucket when `s3_bucket` is set."""

    local_root: str
    s3_bucket: str | None = None
    s3_prefix: str = DEFAULT_PREFIX
    endpoint_url: str | None = None
    region_name: str = DEFAULT_REGION
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    retries: int = Field(
        default=3, ge=0, description="Dagster retries of a raw or feature step after a storage failure"
    )
    retry_delay_seconds: float = Field(default=2.0, ge=0, description="the first retry's wait; doubled each time")
    interactions_retention_days: float = Field(
        default=0.0, ge=0, description="interaction log hours older than this are deleted; 0 keeps them all"
    )

    def settings(self) -> StorageSettings:
        return StorageSettings(
            local_root=self.local_root,
            s3_bucket=self.s3_bucket,
            s3_prefix=self.s3_prefix,
            endpoint_url=self.endpoint_url,
            region=self.region_name,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
            session_token=self.aws_session_token,
        )

    def open(self) -> ObjectStore:
        client = None
        if self.s3_bucket:
            client = S3Resource(
                endpoint_url=self.endpoint_url,
                region_name=self.region_name,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
                aws_session_token=self.aws_session_token,
            ).get_client()
        return self.settings().open(client)


def _env_or_none(env: Mapping[str, str], *names: str) -> dg.EnvVar | None:
    """The first of `names` that is set, as an EnvVar (resolved at run time, never stored)."""
    for name in names:
        if env.get(name):
            return dg.EnvVar(name)
    return None


def lake_storage(env: Mapping[str, str] = os.environ) -> LakeStorage:
    """LakeStorage wired to the variables of the README's configuration table."""
    settings = StorageSettings.from_env(env)
    return LakeStorage(
        local_root=settings.local_root,
        s3_bucket=_env_or_none(env, "BRIDGE_S3_BUCKET"),
        s3_prefix=settings.s3_prefix,
        endpoint_url=_env_or_none(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        region_name=settings.region,
        aws_access_key_id=_env_or_none(env, "AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=_env_or_none(env, "AWS_SECRET_ACCESS_KEY"),
        aws_session_token=_env_or_none(env, "AWS_SESSION_TOKEN"),
        retries=int(env.get("BRIDGE_STORAGE_RETRIES") or 3),
        retry_delay_seconds=float(env.get("BRIDGE_STORAGE_RETRY_DELAY_SECONDS") or 2),
        interactions_retention_days=float(env.get("BRIDGE_INTERACTIONS_RETENTION_DAYS") or 0),
    )


class MlflowTracking(dg.ConfigurableResource):
    """Where training runs and registered models go (the embedded SQLite store by default)."""

    tracking_uri: str
    artifact_location: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str = DEFAULT_MODEL_NAME
    s3_endpoint_url: str | None = None
    browser_url: str | None = None

    def settings(self) -> MlflowSettings:
        return MlflowSettings(
            tracking_uri=self.tracking_uri,
            artifact_location=self.artifact_location,
            experiment=self.experiment,
            model_name=self.model_name,
            s3_endpoint_url=self.s3_endpoint_url,
            browser_url=self.browser_url,
        )


def mlflow_tracking(env: Mapping[str, str] = os.environ) -> MlflowTracking:
    settings = MlflowSettings.from_env(env)
    return MlflowTracking(
        tracking_uri=settings.tracking_uri,
        artifact_location=settings.artifact_location,
        experiment=settings.experiment,
        model_name=settings.model_name,
        s3_endpoint_url=settings.s3_endpoint_url,
        browser_url=settings.browser_url,
    )


TRAINING_COMMAND = ("python", "-m", "bridge_assets.ml.pipes_train")


class TrainingLauncher(dg.ConfigurableResource):
    """Runs training out of process through Dagster Pipes: a local subprocess, or a Docker
    container of `image` (which must have bridge installed and reach the lake and MLflow; AWS
    keys reach it as a mounted credentials file, see `bridge_assets.ml.container`)."""

    kind: Literal["subprocess", "docker"] = "subprocess"
    image: str = "bridge:latest"

    def client(self) -> dg.PipesSubprocessClient | PipesDockerClient:
        if self.kind == "docker":
            return PipesDockerClient()
        return dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT), message_reader=WholeLineMessageReader())

    def command(self) -> list[str]:
        """The subprocess uses this interpreter; a container its own `python`."""
        return [sys.executable, *TRAINING_COMMAND[1:]] if self.kind == "subprocess" else list(TRAINING_COMMAND)

    def run(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, Any], env: Mapping[str, str]
    ) -> dg.PipesClientCompletedInvocation:
        client = self.client()
        if isinstance(client, PipesDockerClient):  # no secrets in what `docker inspect` shows
            with container_spec(env) as spec:
                return client.run(
                    context=context,
                    image=self.image,
                    command=self.command(),
                    extras=extras,
                    env=spec.environment,
                    container_kwargs={"volumes": spec.volumes},
                )
        return client.run(context=context, command=self.command(), extras=extras, env=dict(env))


def training_launcher(env: Mapping[str, str] = os.environ) -> TrainingLauncher:
    return TrainingLauncher(
        kind=env.get("BRIDGE_TRAINING_LAUNCHER", "subprocess"),  # type: ignore[arg-type]
        image=env.get("BRIDGE_TRAINING_IMAGE", "bridge:latest"),
    )


class RayServing(dg.ConfigurableResource):
    """Where the prediction service runs: a local detached Ray by default, or `address`; the
    fields are `ServingSettings`' (serving.deploy), which declares their variables."""

    address: str | None = None
    ray_port: int = 6390
    temp_dir: str = "/tmp/bridge-ray"
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    haproxy: bool = True
    num_cpus: int = 2
    object_store_mb: int = 512
    replicas: int = 1
    unit: str = "GBP(£)"
    max_batch_records: int = 10_000
    max_body_bytes: int = 4 * 1_048_576
    log_flush_seconds: float = 10.0
    model_placement: str = "ingress"

    def settings(self) -> ServingSettings:
        return ServingSettings.model_validate(self.model_dump())


def ray_serving(env: Mapping[str, str] = os.environ) -> RayServing:
    return RayServing(**ServingSettings.from_env(env).model_dump())


class PromotionPolicy(dg.ConfigurableResource):
    """Gate tolerances and budgets, the A/B test's parameters and what a verdict leads to, the
    sign-off rule and the post-deploy guardrail."""

    baseline_tolerance: float
    champion_tolerance: float
    champion_recent_min_rows: int
    slice_tolerance: float
    slice_min_rows: int
    latency_p99_ms: float
    latency_calls: int
    probe_max_area: float
    require_approval: bool
    approvers: list[str]
    ab_min_effect: float
    ab_alpha: float
    ab_power: float
    ab_staging_weight: float
    ab_salt: str
    promotion_policy: str
    guardrail_seconds: float
    guardrail_canary_share: float
    guardrail_min_requests: int
    guardrail_error_margin: float
    guardrail_latency_factor: float
    guardrail_latency_slack_ms: float
    guardrail_alpha: float

    def settings(self) -> PromotionSettings:
        return PromotionSettings(**{**self.model_dump(), "approvers": tuple(self.approvers)})


def promotion_policy(env: Mapping[str, str] = os.environ) -> PromotionPolicy:
    settings = PromotionSettings.from_env(env)
    return PromotionPolicy(**{**settings.model_dump(), "approvers": list(settings.approvers)})


class Alerting(dg.ConfigurableResource):
    """Where loop events go: `BRIDGE_ALERT_WEBHOOK` (it may carry a token: an EnvVar, never stored)."""

    webhook_url: str | None = None

    def send(self, event: LoopEvent) -> bool:
        """Deliver `event` (retried; never raises: the loop goes on without the receiver)."""
        return send_alert(self.webhook_url, event)


def alerting(env: Mapping[str, str] = os.environ) -> Alerting:
    return Alerting(webhook_url=_env_or_none(env, "BRIDGE_ALERT_WEBHOOK"))
