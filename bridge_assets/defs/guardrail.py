"""The post-deploy guardrail (step 9): for a while after a new Production version takes
traffic, its live health is compared with its predecessor's; a breach rolls it back through
`rollback_model`, recorded in the audit trail with the figures, and `registry_sensor` then
puts the previous version back into Serve."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from bridge_assets.defs.cadence import sensor_interval
from bridge_assets.defs.resources import LakeStorage, MlflowTracking, PromotionPolicy
from bridge_assets.defs.audit import open_registry
from bridge_assets.defs.serving import production_deployment, rollback_model
from bridge_assets.ml.guardrail import judge, traffic_health
from bridge_assets.ml.registry import PRODUCTION, PRODUCTION_ALIAS
from serving.interactions import read_interactions

GUARDRAIL_ACTOR = "post_deploy_guardrail"


def took_traffic_at(instance: dg.DagsterInstance, version: str) -> datetime | None:
    """When `version` started serving: the first of the latest unbroken run of
    `production_deployment` materializations that deployed it (a Staging change redeploys
    the same Production version; that does not restart its watch)."""
    started = None
    for record in instance.fetch_materializations(production_deployment.key, limit=100).records:  # newest first
        metadata = record.asset_materialization.metadata if record.asset_materialization else {}
        if "model_version" not in metadata or metadata["model_version"].value != version:
            break
        started = record.timestamp
    return datetime.fromtimestamp(started, UTC) if started is not None else None


@dg.sensor(
    job=rollback_model,
    minimum_interval_seconds=sensor_interval("post_deploy_guardrail", 30),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def post_deploy_guardrail(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking, promotion: PromotionPolicy
) -> dg.RunRequest | dg.SkipReason:
    """Watch the Production version for `BRIDGE_GUARDRAIL_SECONDS` after it takes traffic:
    its server-error rate and p95 latency in the interaction records against the previous
    Production version's over as long just before the switch. A breach requests
    `rollback_model` once (run key: version and switch time) with the figures as the reason.
    A version that came back by a rollback is not watched: rolling back again would flap."""
    settings = promotion.settings()
    if settings.guardrail_seconds <= 0:
        return dg.SkipReason("the guardrail is off (BRIDGE_GUARDRAIL_SECONDS=0)")
    registry = open_registry(storage, mlflow_tracking, actor=GUARDRAIL_ACTOR)
    version = registry.version_for(PRODUCTION_ALIAS)
    moves = [r for r in registry.history() if r.to_stage == PRODUCTION and r.action != "out_of_band"]
    if version is None or not moves or moves[-1].version != version:
        return dg.SkipReason(f"no Production version set by bridge to watch (production: {version or 'none'})")
    move = moves[-1]
    previous = move.evidence.get("previous_production")
    if move.action == "rollback" or not previous or previous == version:
        return dg.SkipReason(f"v{version} is not watched: {move.action} ({'no predecessor' if not previous else 'a rollback'})")
    started = took_traffic_at(context.instance, version)
    if started is None:
        return dg.SkipReason(f"v{version} is not deployed yet")
    now = datetime.now(UTC)
    watch = timedelta(seconds=settings.guardrail_seconds)
    if now - started > watch:
        return dg.SkipReason(f"v{version} has served since {started:%Y-%m-%d %H:%M:%S} UTC: past its {watch} watch")
    records = read_interactions(storage.open(), since=started - watch)
    verdict = judge(traffic_health(records, version, started, now), traffic_health(records, previous, started - watch, started), settings)
    context.log.info(verdict.reason)
    if not verdict.breach:
        return dg.SkipReason(verdict.reason)
    return dg.RunRequest(
        run_key=f"guardrail/{version}/{started.isoformat()}",
        run_config={"ops": {"restore_previous_production": {"config": {"reason": verdict.reason, "actor": GUARDRAIL_ACTOR}}}},
        tags={"bridge/guardrail": f"v{version}"},
    )
