"""Serving (steps 6–9): Staging → Production with evidence, rollback, deploy into Ray Serve."""

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from pydantic import Field

from bridge_assets.defs.audit import audit_markdown, open_registry, run_actor
from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.features import IN_PROGRESS
from bridge_assets.defs.resources import Alerting, LakeStorage, MlflowTracking, PromotionPolicy, RayServing
from bridge_assets.defs.training import candidate_model
from bridge_assets.ml.following import FollowState, follow, refused
from bridge_assets.ml.guardrail import Watch, watch_of
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS, Authorisation, Registry
from bridge_assets.monitoring.alerts import EventKind, LoopEvent


class PromotionConfig(dg.Config):
    version: str = Field(default="", description="version to promote (default: the one in Staging)")
    override_reason: str = Field(
        default="", description="promote without a 'promote' A/B verdict, for this reason (recorded)"
    )
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
    context: dg.OpExecutionContext,
    config: RollbackConfig,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    alerting: Alerting,
) -> str:
    """Point Production back at the version it had before (from the audit trail); recorded.
    The registry sensor then brings the service in line."""
    registry = open_registry(storage, mlflow_tracking, run_actor(context, config.actor))
    try:
        current, restored = registry.rollback(config.reason)
    except ValueError as error:
        raise dg.Failure(f"rollback refused: {error}") from error
    context.log.info(f"{registry.model_name}: Production rolled back from v{current} to v{restored}")
    alerting.send(
        LoopEvent(
            "rollback",
            f"Production rolled back from v{current} to v{restored}: {config.reason}"[:500],
            registry.model_name,
            restored,
            {"rolled_back": current, "actor": registry.actor, "reason": config.reason},
        )
    )
    return restored


@dg.job(description="Operator action: point Production back at the previous version.")
def rollback_model() -> None:
    restore_previous_production()


AUTHORISED_CHECK = "registry_authorised"
SERVING_CHECK = "serving_matches_registry"


@dg.asset(
    deps=[candidate_model],
    group_name="serving",
    kinds={"ray", "fastapi"},
    owners=["team:ml-engineering"],
    check_specs=[
        dg.AssetCheckSpec(
            AUTHORISED_CHECK,
            asset="production_deployment",
            description="the served versions were moved there by bridge, or passed their gates",
        ),
        dg.AssetCheckSpec(
            SERVING_CHECK,
            asset="production_deployment",
            description="the service answers and serves the versions the registry says (registry_sensor asks it)",
        ),
    ],
)
def production_deployment(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    serving: RayServing,
    promotion: PromotionPolicy,
) -> dg.MaterializeResult:
    """The Production version live in Ray Serve, the Staging version beside it for the A/B
    experiment's share of clients (`BRIDGE_AB_STAGING_WEIGHT`), and, while a new Production
    version is watched, the previous one for the canary's share (`BRIDGE_GUARDRAIL_CANARY_SHARE`).

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
    versions, watch = wanted_versions(registry, production, staging, policy)
    staging_version, previous_version = versions.get("staging"), versions.get("previous")
    try:
        checked = probe(registry.client, settings.model_name, production.version, PRODUCTION_ALIAS)
        if staging_version:
            probe(registry.client, settings.model_name, staging_version, STAGING_ALIAS)
        if previous_version:
            probe(registry.client, settings.model_name, previous_version, None)
    except ValueError as error:
        raise dg.Failure(f"refused to deploy: {error}") from error
    env = {**storage.settings().to_env(), **settings.to_env(), **serving.settings().to_env()}
    url = deploy(
        settings.model_name,
        production.version,
        PRODUCTION_ALIAS,
        env=env,
        staging_version=staging_version,
        staging_weight=policy.ab_staging_weight,
        previous_version=previous_version,
        previous_weight=policy.guardrail_canary_share,
        salt=policy.ab_salt,
    )
    canary = (
        f"v{previous_version} for {policy.guardrail_canary_share:.0%} of clients until {watch.ends:%H:%M:%S} UTC"
        if watch
        else "none"
    )
    context.log.info(
        f"serving {settings.model_name} v{production.version} at {url}"
        + (f" with v{staging_version} for {policy.ab_staging_weight:.0%} of clients" if staging_version else "")
        + (f"; the post-deploy watch keeps {canary}" if watch else "")
    )
    staging_refused = staging.version is not None and not staging.allowed
    return dg.MaterializeResult(
        metadata={
            "endpoint": dg.MetadataValue.url(f"{url}/predict"),
            "docs": dg.MetadataValue.url(f"{url}/docs"),
            "model_name": settings.model_name,
            "model_version": production.version,
            "staging_version": staging_version or "none",
            "staging_weight": policy.ab_staging_weight if staging_version else 0.0,
            "canary": canary,
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
            ),
            dg.AssetCheckResult(
                check_name=SERVING_CHECK,
                passed=True,
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"serving v{production.version}"
                + (f" and v{staging_version} (staging)" if staging_version else "")
                + (f" and v{previous_version} (previous: the post-deploy watch's control)" if previous_version else ""),
            ),
        ],
        data_version=dg.DataVersion(
            f"{settings.model_name}/{production.version}/{staging_version or '-'}/{previous_version or '-'}"
        ),
    )


def wanted_versions(
    registry: Registry, production: Authorisation, staging: Authorisation, policy: PromotionSettings
) -> tuple[dict[str, str], Watch | None]:
    """What the service should serve, by variant (the rule `production_deployment` deploys and
    `registry_sensor` compares with Serve): Production; Staging if it may be deployed and the
    A/B weight is on; the previous Production version while a post-deploy watch runs."""
    assert production.version is not None
    wanted = {"production": production.version}
    if staging.version and staging.allowed and policy.ab_staging_weight > 0 and staging.version != production.version:
        wanted["staging"] = staging.version
    watch = watch_of(registry.history(), production.version, policy, datetime.now(UTC))
    if watch:
        wanted["previous"] = watch.previous  # the watch's control group
    return wanted, watch


DEPLOY_RETRY_SECONDS = 300  # a deployment that did not bring the service in line is requested again after this


def _deployment_in_flight(instance: dg.DagsterInstance) -> bool:
    """A production_deployment run is queued or running: its outcome is what to wait for."""
    runs = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS), limit=20)
    return any(production_deployment.key in (run.asset_selection or set()) for run in runs)


def _check(passed: bool, description: str, **metadata: Any) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=production_deployment.key,
        check_name=SERVING_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )


@cadenced_sensor(
    30,
    target=[production_deployment],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def registry_sensor(
    context: dg.SensorEvaluationContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
    serving: RayServing,
    alerting: Alerting,
) -> dg.SensorResult | dg.SkipReason:
    """Deployment follows the registry, checked against what the service itself says it
    serves (its `/model`), not against what was last deployed: up but serving other versions
    (a crash, a hand deploy, a stop of the app) → `production_deployment` is requested; not
    answering at all → the `serving_matches_registry` check fails and an alert goes out, and
    nothing is started behind people's backs. A version moved outside bridge is served only
    with a passing gate record; otherwise `registry_authorised` fails with the reason."""
    from serving.deploy import service_state

    registry = open_registry(storage, mlflow_tracking, actor="registry_sensor")
    production = registry.authorise(PRODUCTION_ALIAS)
    if production.version is None:
        return dg.SkipReason("no Production version yet")
    staging = registry.authorise(STAGING_ALIAS)
    for moved in (m for m in (production, staging) if m.newly_recorded):
        alerting.send(
            LoopEvent(
                "out_of_band_move",
                moved.reason,
                registry.model_name,
                moved.version,
                {"alias": moved.alias, "deployable": moved.allowed},
            )
        )
    wanted, _ = wanted_versions(registry, production, staging, promotion.settings())
    state = FollowState.from_json(context.cursor)
    if not production.allowed:
        decision = refused(state, production.version, production.reason)
        if decision.action == "none":
            return dg.SkipReason(decision.reason)
        refusal = dg.AssetCheckEvaluation(
            asset_key=production_deployment.key,
            check_name=AUTHORISED_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"reason": production.reason, "version": production.version},
            description=production.reason,
        )
        return dg.SensorResult(asset_events=[refusal], cursor=decision.state.to_json())
    served = service_state({**os.environ, **serving.settings().to_env()})
    decision = follow(
        state,
        wanted,
        served.status,
        served.versions,
        served.problem,
        deployment_in_flight=_deployment_in_flight(context.instance),
        now=time.time(),
        retry_seconds=DEPLOY_RETRY_SECONDS,
    )
    cursor = decision.state.to_json()
    if decision.action == "none":
        return dg.SkipReason(decision.reason)
    if decision.action == "in_line":
        return dg.SensorResult(skip_reason=decision.reason, cursor=cursor)
    if decision.action == "report_in_line":
        return dg.SensorResult(asset_events=[_check(True, decision.reason)], cursor=cursor)
    if decision.action == "report_unreachable":
        kind: EventKind = "service_down" if served.status == "down" else "deployment_mismatch"
        alerting.send(
            LoopEvent(
                kind, decision.reason, registry.model_name, production.version, {"wanted": wanted, "url": served.url}
            )
        )
        return dg.SensorResult(
            asset_events=[_check(False, decision.reason, url=served.url, wanted=str(wanted))], cursor=cursor
        )
    if decision.drifted:
        alerting.send(
            LoopEvent(
                "deployment_mismatch",
                f"{served.url} {decision.reason}",
                registry.model_name,
                production.version,
                {"wanted": wanted, "served": served.versions},
            )
        )
    key = "/".join(f"{k}={v}" for k, v in sorted(wanted.items())) + f"@{int(decision.state.requested_at or 0)}"
    request = dg.RunRequest(
        run_key=key, tags={"bridge/registry_state": key, "bridge/served": json.dumps(served.versions)}
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)
