"""Serving (steps 6–9): Staging → Production with evidence, rollback, deploy into Ray Serve."""

import dagster as dg
from pydantic import Field

from bridge_assets.defs.cadence import sensor_interval
from bridge_assets.defs.resources import LakeStorage, MlflowTracking, PromotionPolicy, RayServing
from bridge_assets.defs.training import candidate_model
from bridge_assets.defs.audit import audit_markdown, open_registry, run_actor
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS


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
    registry = open_registry(storage, mlflow_tracking, run_actor(context, config.actor))
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
    registry = open_registry(storage, mlflow_tracking, run_actor(context, config.actor))
    try:
        current, restored = registry.rollback(config.reason)
    except ValueError as error:
        raise dg.Failure(f"rollback refused: {error}") from error
    context.log.info(f"{registry.model_name}: Production rolled back from v{current} to v{restored}")
    return restored


@dg.job(description="Operator action: point Production back at the previous version.")
def rollback_model() -> None:
    restore_previous_production()


AUTHORISED_CHECK = "registry_authorised"


@dg.asset(
    deps=[candidate_model],
    group_name="serving",
    kinds={"ray", "fastapi"},
    owners=["team:ml-engineering"],
    check_specs=[dg.AssetCheckSpec(AUTHORISED_CHECK, asset="production_deployment",
                                   description="the served versions were moved there by bridge, or passed their gates")],
)  # fmt: skip
def production_deployment(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    serving: RayServing,
    promotion: PromotionPolicy,
) -> dg.MaterializeResult:
    """The Production version live in Ray Serve, and the Staging version beside it for the
    A/B experiment's share of clients (`BRIDGE_AB_STAGING_WEIGHT`).

    Follows the registry: a version an alias points at is served only if bridge moved it
    there, or, moved by hand, if it has a passing gate record (the move is recorded as out of
    band). Each version is loaded and probed here first (refused with the reason if it does
    not load or predicts nonsense on the real data); then Serve rolls over, old replicas
    serving until the new ones are healthy.
    """
    from serving.deploy import api_key_status, deploy, probe

    settings = mlflow_tracking.settings()
    registry = open_registry(storage, mlflow_tracking, actor=run_actor(context))
    production = registry.authorise(PRODUCTION_ALIAS)
    if production.version is None:
        raise dg.Failure(f"no version of {settings.model_name} is marked Production: run the promote_model job")
    if not production.allowed:
        raise dg.Failure(f"refused to deploy: {production.reason}")
    staging = registry.authorise(STAGING_ALIAS)
    policy = promotion.settings()
    staging_version = staging.version if staging.allowed and policy.ab_staging_weight > 0 else None
    if staging_version == production.version:
        staging_version = None
    try:
        checked = probe(registry.client, settings.model_name, production.version, PRODUCTION_ALIAS)
        if staging_version:
            probe(registry.client, settings.model_name, staging_version, STAGING_ALIAS)
    except ValueError as error:
        raise dg.Failure(f"refused to deploy: {error}") from error
    env = {**storage.settings().to_env(), **settings.to_env(), **serving.settings().to_env()}
    url = deploy(
        settings.model_name, production.version, PRODUCTION_ALIAS, env=env,
        staging_version=staging_version, staging_weight=policy.ab_staging_weight, salt=policy.ab_salt,
    )  # fmt: skip
    context.log.info(f"serving {settings.model_name} v{production.version} at {url}"
                     + (f" with v{staging_version} for {policy.ab_staging_weight:.0%} of clients" if staging_version else ""))
    staging_refused = staging.version is not None and not staging.allowed
    return dg.MaterializeResult(
        metadata={
            "endpoint": dg.MetadataValue.url(f"{url}/predict"),
            "docs": dg.MetadataValue.url(f"{url}/docs"),
            "model_name": settings.model_name,
            "model_version": production.version,
            "staging_version": staging_version or "none",
            "staging_weight": policy.ab_staging_weight if staging_version else 0.0,
            "probe_rows": checked.rows,
            "probe_latency_ms": checked.latency_ms,
            "run_id": checked.model.run_id,
            "feature_version": checked.model.feature_version,
            "api_keys": api_key_status(),
            "audit_trail": audit_markdown(registry),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=AUTHORISED_CHECK,
                passed=not staging_refused,
                severity=dg.AssetCheckSeverity.ERROR,
                description=staging.reason if staging_refused else production.reason,
                metadata={"production": production.reason, "staging": staging.reason},
            )
        ],
        data_version=dg.DataVersion(f"{settings.model_name}/{production.version}/{staging_version or '-'}"),
    )


def _deployed(instance: dg.DagsterInstance) -> tuple[str | None, str | None]:
    """(production, staging) versions of the latest production_deployment materialization."""
    records = instance.fetch_materializations(production_deployment.key, limit=1).records
    if not records:
        return None, None
    metadata = records[0].asset_materialization.metadata if records[0].asset_materialization else {}
    staging = metadata["staging_version"].value if "staging_version" in metadata else "none"
    return (metadata["model_version"].value if "model_version" in metadata else None), (None if staging == "none" else staging)


@dg.sensor(target=[production_deployment], minimum_interval_seconds=sensor_interval("registry_sensor", 30), default_status=dg.DefaultSensorStatus.RUNNING)
def registry_sensor(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking, promotion: PromotionPolicy
) -> dg.SensorResult | dg.SkipReason:
    """Deployment follows the registry: when `production` or `staging` points elsewhere than
    what is deployed, request `production_deployment`, unless the version was moved outside
    bridge without a passing gate record; then the `registry_authorised` check fails with the
    reason (recorded in the audit trail) and nothing is deployed."""
    registry = open_registry(storage, mlflow_tracking, actor="registry_sensor")
    production = registry.authorise(PRODUCTION_ALIAS)
    if production.version is None:
        return dg.SkipReason("no Production version yet")
    staging = registry.authorise(STAGING_ALIAS)
    wanted_staging = staging.version if staging.allowed and promotion.ab_staging_weight > 0 and staging.version != production.version else None
    if (production.version, wanted_staging) == _deployed(context.instance):
        return dg.SkipReason(f"the service is in line with the registry (v{production.version}, staging {wanted_staging or 'none'})")
    moves = [r.key for r in registry.history() if r.to_stage in ("Production", "Staging")]
    state = f"{production.version}/{wanted_staging or '-'}/{moves[-1] if moves else '-'}"
    if context.cursor == state:
        return dg.SkipReason(f"already handled {state}")
    if not production.allowed:
        refusal = dg.AssetCheckEvaluation(
            asset_key=production_deployment.key, check_name=AUTHORISED_CHECK, passed=False,
            severity=dg.AssetCheckSeverity.ERROR, metadata={"reason": production.reason, "version": production.version},
            description=production.reason,
        )  # fmt: skip
        return dg.SensorResult(asset_events=[refusal], cursor=state)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=state, tags={"bridge/registry_state": state})], cursor=state)
