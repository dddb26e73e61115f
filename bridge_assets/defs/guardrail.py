"""The post-deploy guardrail (step 9): for a while after a new Production version takes
traffic, the previous version keeps a share of clients (`production_deployment` deploys it as
the `previous` variant) and both are compared over the same seconds; a breach rolls the new
version back through `rollback_model`, recorded in the audit trail with both versions' figures,
and `registry_sensor` then puts the previous version back into Serve. When the watch ends
without a breach, `registry_sensor` redeploys without the control group."""

import json
from datetime import UTC, datetime

import dagster as dg

from bridge_assets.defs.audit import open_registry
from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.resources import LakeStorage, MlflowTracking, PromotionPolicy
from bridge_assets.defs.serving import rollback_model
from bridge_assets.lake.interactions import interaction_files, read_interaction_files
from bridge_assets.ml.guardrail import WatchTally, judge, watch_of
from bridge_assets.ml.registry import PRODUCTION_ALIAS

GUARDRAIL_ACTOR = "post_deploy_guardrail"


@cadenced_sensor(
    30,
    job=rollback_model,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def post_deploy_guardrail(
    context: dg.SensorEvaluationContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
) -> dg.SensorResult | dg.SkipReason:
    """Watch the Production version for `BRIDGE_GUARDRAIL_SECONDS` after bridge moved it there:
    its server errors and model time against the previous version's, which serves
    `BRIDGE_GUARDRAIL_CANARY_SHARE` of clients meanwhile. Each tick reads only the record files
    it has not read (the cursor keeps the tally). A breach requests `rollback_model` once (run
    key: version and watch start) with both versions' figures as the reason. A version that
    came back by a rollback is not watched: rolling back again would flap."""
    settings = promotion.settings()
    if settings.guardrail_seconds <= 0:
        return dg.SkipReason("the guardrail is off (BRIDGE_GUARDRAIL_SECONDS=0)")
    registry = open_registry(storage, mlflow_tracking, actor=GUARDRAIL_ACTOR)
    version = registry.version_for(PRODUCTION_ALIAS)
    watch = watch_of(registry.history(), version, settings, datetime.now(UTC))
    if watch is None:
        return dg.SkipReason(
            f"no watch runs on Production (v{version or 'none'}): not moved there by bridge from another version within {settings.guardrail_seconds:g} s, or a rollback"
        )
    store = storage.open()
    tally = WatchTally.from_json(json.loads(context.cursor)) if context.cursor else None
    files = interaction_files(store, since=watch.started)
    if tally is None or tally.watch != WatchTally.key(watch) or not set(tally.files) <= set(files):
        tally = WatchTally(WatchTally.key(watch))  # a new watch, or an hour compacted since: count afresh
    unread = sorted(set(files) - set(tally.files))
    tally.add(read_interaction_files(store, unread, since=watch.started), watch)
    tally.files = files
    verdict = judge(tally, watch, settings)
    context.log.info(verdict.reason)
    cursor = json.dumps(tally.to_json())
    if not verdict.breach:
        return dg.SensorResult(skip_reason=verdict.reason, cursor=cursor)
    request = dg.RunRequest(
        run_key=f"guardrail/{watch.version}/{watch.started.isoformat()}",
        run_config={
            "ops": {"restore_previous_production": {"config": {"reason": verdict.reason, "actor": GUARDRAIL_ACTOR}}}
        },
        tags={"bridge/guardrail": f"v{watch.version}"},
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)
