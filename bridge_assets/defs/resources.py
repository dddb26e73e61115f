"""The project's resources, configured in one place from the environment.

Secrets reach Dagster only as `dg.EnvVar`, so they never appear in run config, the UI or logs.
"""

import os
from collections.abc import Mapping

import dagster as dg
from dagster_aws.s3 import S3Resource

from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.settings import DEFAULT_PREFIX, DEFAULT_REGION, StorageSettings
from bridge_assets.lake.storage import ObjectStore


class LakeStorage(dg.ConfigurableResource):
    """The object store: a local folder by default, an S3 bucket when `s3_bucket` is set."""

    local_root: str
    s3_bucket: str | None = None
    s3_prefix: str = DEFAULT_PREFIX
    endpoint_url: str | None = None
    region_name: str = DEFAULT_REGION
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None

    def settings(self) -> StorageSettings:
        return StorageSettings(
            local_root=self.local_root,
            s3_bucket=self.s3_bucket,
            s3_prefix=self.s3_prefix,
            endpoint_url=self.endpoint_url,
            region=self.region_name,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
        )

    def open(self) -> ObjectStore:
        client = None
        if self.s3_bucket:
            client = S3Resource(
                endpoint_url=self.endpoint_url,
                region_name=self.region_name,
                aws_access_key_id=self.aws_access_key_id,
                aws_secret_access_key=self.aws_secret_access_key,
            ).get_client()
        return self.settings().open(client)

    def features(self) -> FeatureStore:
        return FeatureStore(self.open())


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
    )
