"""Serving (steps 7–9): promote a version to Production, deploy it into Ray Serve."""

import dagster as dg
from mlflow.exceptions import MlflowException
from pydantic import Field

from bridge_assets.defs.resources import LakeStorage, MlflowTracking, RayServing
from bridge_assets.defs.training import candidate_model
from bridge_assets.ml.tracking import PRODUCTION_ALIAS, promote_to_production


class PromotionConfig(dg.Config):
    version: str = Field(description="registered model version to mark Production")


@dg.op
def set_production_alias(context: dg.OpExecutionContext, config: PromotionConfig, mlflow_tracking: MlflowTracking) -> str:
    """Point the `production` alias at a version (the previous one is tagged Archived)."""
    settings = mlflow_tracking.settings()
    previous = promote_to_production(settings.activate(), settings.model_name, config.version)
    context.log.info(f"{settings.model_name} v{config.version} is Production (was: {previous or 'none'})")
    return config.version


@dg.job(description="Operator action: mark a registered model version Production.")
def promote_model() -> None:
    set_production_alias()


@dg.asset(deps=[candidate_model], group_name="serving", kinds={"ray", "fastapi"})
def production_deployment(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    serving: RayServing,
) -> dg.MaterializeResult:
    """The Production model version live in Ray Serve.

    The version is loaded and probed here first (refused with the reason if it does not load
    or predicts nonsense on the real data); then Serve rolls over, old replicas serving until
    the new ones are healthy.
    """
    from serving.deploy import deploy, probe
    from serving.model import version_for_alias

    settings = mlflow_tracking.settings()
    client = settings.activate()
    try:
        version = version_for_alias(client, settings.model_name, PRODUCTION_ALIAS)
    except MlflowException as error:  # no Production version yet
        raise dg.Failure(f"no version of {settings.model_name} is marked Production: run the promote_model job") from error
    try:
        checked = probe(client, settings.model_name, version, PRODUCTION_ALIAS)
    except ValueError as error:
        raise dg.Failure(f"refused to deploy: {error}") from error
    env = {**storage.settings().to_env(), **settings.to_env(), **serving.settings().to_env()}
    url = deploy(settings.model_name, version, PRODUCTION_ALIAS, env=env)
    context.log.info(f"serving {settings.model_name} v{version} at {url}")
    return dg.MaterializeResult(
        metadata={
            "endpoint": dg.MetadataValue.url(f"{url}/predict"),
            "docs": dg.MetadataValue.url(f"{url}/docs"),
            "model_name": settings.model_name,
            "model_version": version,
            "probe_rows": checked.rows,
            "probe_latency_ms": checked.latency_ms,
            "run_id": checked.model.run_id,
            "feature_version": checked.model.feature_version,
        },
        data_version=dg.DataVersion(f"{settings.model_name}/{version}"),
    )
