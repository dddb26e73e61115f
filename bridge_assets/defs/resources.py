"""The project's resources, configured in one place from the environment.

Secrets reach Dagster only as `dg.EnvVar`, so they never appear in run config, the UI or logs.
"""

import os
import sys
from collections.abc import Mapping
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import dagster as dg
from dagster_aws.s3 import S3Resource
from dagster_docker import PipesDockerClient
from pydantic import Field, create_model

from bridge_assets.defs.pipes_messages import WholeLineMessageReader
from bridge_assets.lake.settings import DEFAULT_PREFIX, DEFAULT_REGION, StorageSettings
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.container import TrainingSettings, container_spec
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.tracking import PROJECT_ROOT, MlflowSettings
from bridge_assets.monitoring.alerts import LoopEvent, send_alert
from bridge_assets.settings import EnvSettings
from serving.deploy import ServingSettings


def _config_type(annotation: Any) -> Any:
    """A settings field's type as Dagster config knows it: a tuple as a list, a `Literal` as
    its values' type (the settings class checks the value), optional stays optional."""
    origin = get_origin(annotation)
    if origin is Literal:
        return type(get_args(annotation)[0])
    if origin is tuple:
        return list[get_args(annotation)[0]]  # type: ignore[misc]
    if origin in (Union, UnionType):
        (inner,) = (arg for arg in get_args(annotation) if arg is not type(None))
        return _config_type(inner) | None
    return annotation


def _config_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _declared(settings_class: type[EnvSettings], name: str) -> Any:
    """A resource field with the default and description the settings class declares."""
    info = settings_class.model_fields[name]
    return Field(_config_value(info.get_default(call_default_factory=True)), description=info.description)


def settings_resource(settings_class: type[EnvSettings]) -> type[dg.ConfigurableResource]:
    """A resource base whose fields are `settings_class`'s (names, defaults, descriptions), so
    a setting is declared once and still shows, typed, in Dagster's launchpad; the subclass's
    `settings()` validates them back into the settings class."""
    fields: dict[str, Any] = {
        name: (_config_type(info.annotation), _declared(settings_class, name))
        for name, info in settings_class.model_fields.items()
    }
    return create_model(f"{settings_class.__name__}Fields", __base__=dg.ConfigurableResource, **fields)


def resource_values(settings: EnvSettings) -> dict[str, Any]:
    """`settings` as keyword arguments of its `settings_resource`."""
    return {name: _config_value(value) for name, value in settings.model_dump().items()}


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
    retries: int = _declared(StorageSettings, "retries")
    retry_delay_seconds: float = _declared(StorageSettings, "retry_delay_seconds")
    interactions_retention_days: float = _declared(StorageSettings, "interactions_retention_days")

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
            retries=self.retries,
            retry_delay_seconds=self.retry_delay_seconds,
            interactions_retention_days=self.interactions_retention_days,
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
        retries=settings.retries,
        retry_delay_seconds=settings.retry_delay_seconds,
        interactions_retention_days=settings.interactions_retention_days,
    )


class MlflowTracking(settings_resource(MlflowSettings)):  # type: ignore[misc]
    """Where training runs and registered models go (the embedded SQLite store by default)."""

    def settings(self) -> MlflowSettings:
        return MlflowSettings.model_validate(self.model_dump())


def mlflow_tracking(env: Mapping[str, str] = os.environ) -> MlflowTracking:
    return MlflowTracking(**resource_values(MlflowSettings.from_env(env)))


TRAINING_COMMAND = ("python", "-m", "bridge_assets.ml.pipes_train")


class TrainingLauncher(settings_resource(TrainingSettings)):  # type: ignore[misc]
    """Runs training out of process through Dagster Pipes: a local subprocess, or a Docker
    container of `image` (which must have bridge installed and reach the lake and MLflow; AWS
    keys reach it as a mounted credentials file, see `bridge_assets.ml.container`)."""

    def settings(self) -> TrainingSettings:
        return TrainingSettings.model_validate(self.model_dump())

    def client(self) -> dg.PipesSubprocessClient | PipesDockerClient:
        if self.settings().launcher == "docker":
            return PipesDockerClient()
        return dg.PipesSubprocessClient(cwd=str(PROJECT_ROOT), message_reader=WholeLineMessageReader())

    def command(self) -> list[str]:
        """The subprocess uses this interpreter; a container its own `python`."""
        return (
            [sys.executable, *TRAINING_COMMAND[1:]]
            if self.settings().launcher == "subprocess"
            else list(TRAINING_COMMAND)
        )

    def run(
        self, context: dg.AssetExecutionContext, extras: Mapping[str, Any], env: Mapping[str, str]
    ) -> dg.PipesClientCompletedInvocation:
        client = self.client()
        if isinstance(client, PipesDockerClient):  # no secrets in what `docker inspect` shows
            with container_spec(env) as spec:
                return client.run(
                    context=context,
                    image=self.settings().image,
                    command=self.command(),
                    extras=extras,
                    env=spec.environment,
                    container_kwargs={"volumes": spec.volumes},
                )
        return client.run(context=context, command=self.command(), extras=extras, env=dict(env))


def training_launcher(env: Mapping[str, str] = os.environ) -> TrainingLauncher:
    return TrainingLauncher(**resource_values(TrainingSettings.from_env(env)))


class RayServing(settings_resource(ServingSettings)):  # type: ignore[misc]
    """Where the prediction service runs: a local detached Ray by default, or `address`."""

    def settings(self) -> ServingSettings:
        return ServingSettings.model_validate(self.model_dump())


def ray_serving(env: Mapping[str, str] = os.environ) -> RayServing:
    return RayServing(**resource_values(ServingSettings.from_env(env)))


class PromotionPolicy(settings_resource(PromotionSettings)):  # type: ignore[misc]
    """Gate tolerances and budgets, the A/B test's parameters and what a verdict leads to, the
    sign-off rule and the post-deploy guardrail."""

    def settings(self) -> PromotionSettings:
        return PromotionSettings.model_validate(self.model_dump())


def promotion_policy(env: Mapping[str, str] = os.environ) -> PromotionPolicy:
    return PromotionPolicy(**resource_values(PromotionSettings.from_env(env)))


class Alerting(dg.ConfigurableResource):
    """Where loop events go: `BRIDGE_ALERT_WEBHOOK` (it may carry a token: an EnvVar, never stored)."""

    webhook_url: str | None = None

    def send(self, event: LoopEvent) -> bool:
        """Deliver `event` (retried; never raises: the loop goes on without the receiver)."""
        return send_alert(self.webhook_url, event)


def alerting(env: Mapping[str, str] = os.environ) -> Alerting:
    return Alerting(webhook_url=_env_or_none(env, "BRIDGE_ALERT_WEBHOOK"))
