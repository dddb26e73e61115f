"""Serving (steps 6–9): Staging → Production with evidence, rollback, deploy into Ray Serve."""

import dagster as dg
from pydantic import Field

from bridge_assets.defs.resources import LakeStorage, MlflowTracking, RayServing
from bridge_assets.defs.training import candidate_model
from bridge_assets.ml.registry import PRODUCTION_ALIAS, Registry


def open_registry(storage: LakeStorage, mlflow_tracking: MlflowTracking, actor: str | None = None) -> Registry:
    """The registry of the configured model, recording into the configured lake."""
    settings = mlflow_tracking.settings()
    return Registry(settings.activate(), settings.model_name, storage.open(), actor)


def _actor(context: dg.OpExecutionContext, configured: str) -> str:
    return configured or f"dagster run {context.run_id[:8]}"


class PromotionConfig(dg.Config):
    version: str = Field(default="", description="version to promote (default: the one in Staging)")
    override_reason: str = Field(default="", description="promote without a 'promote' A/B verdict, for this reason (recorded)")
    actor: str = Field(default="", description="who asks (recorded; default: this run)")


@dg.op
def set_production_alias(
    context: dg.OpExecutionContext, config: PromotionConfig, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> str:
    """Staging → Production: needs a 'promote' A/B verdict, no Production yet, or an override
    reason; the previous Production version is archived. Recorded in the audit trail."""
    registry = open_registry(storage, mlflow_tracking, _actor(context, config.actor))
    try:
        previous = registry.promote_staging(config.version or None, override_reason=config.override_reason or None)
    except ValueError as error:
        raise dg.Failure(f"promotion refused: {error}") from error
    version = registry.version_for(PRODUCTION_ALIAS) or config.version
    context.log.info(f"{registry.model_name} v{version} is Production (was: {previous or 'none'})")
    return version


@dg.job(description="Operator action: move the Staging version to Production (with evidence or an override reason).")
def promote_model() -> None:
    set_production_alias()


class RollbackConfig(dg.Config):
    reason: str = Field(description="why Production goes back (recorded)")
    actor: str = Field(default="", description="who asks (recorded; default: this run)")


@dg.op
def restore_previous_production(
    context: dg.OpExecutionContext, config: RollbackConfig, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> str:
    """Point Production back at the version it had before (from the audit trail); recorded.
    The registry sensor then brings the service in line."""
    registry = open_registry(storage, mlflow_tracking, _actor(context, config.actor))
    try:
        current, restored = registry.rollback(config.reason)
    except ValueError as error:
        raise dg.Failure(f"rollback refused: {error}") from error
    context.log.info(f"{registry.model_name}: Production rolled back from v{current} to v{restored}")
    return restored


@dg.job(description="Operator action: point Production back at the previous version.")
def rollback_model() -> None:
    restore_previous_production()


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

    settings = mlflow_tracking.settings()
    registry = open_registry(storage, mlflow_tracking)
    client = registry.client
    version = registry.version_for(PRODUCTION_ALIAS)
    if version is None:
        raise dg.Failure(f"no version of {settings.model_name} is marked Production: run the promote_model job")
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
