"""The registry's audit trail as Dagster sees it: who a run acts as, and the trail in the UI."""

import dagster as dg

from bridge_assets.defs.resources import LakeStorage, MlflowTracking
from bridge_assets.ml.registry import Registry


def open_registry(storage: LakeStorage, mlflow_tracking: MlflowTracking, actor: str | None = None) -> Registry:
    """The registry of the configured model, recording into the configured lake."""
    settings = mlflow_tracking.settings()
    return Registry(settings.activate(), settings.model_name, storage.open(), actor)


# Dagster's run tags for what launched a run (no public constants for them).
LAUNCHED_BY_TAGS = {"dagster/sensor_name": "sensor", "dagster/schedule_name": "schedule"}
AUTOMATION_TAG = "dagster/from_automation_condition"


def run_actor(context: dg.OpExecutionContext | dg.AssetExecutionContext, on_behalf_of: str = "") -> str:
    """Who a run's registry moves are recorded as: the run and what launched it, e.g.
    `dagster run 1a2b3c4d (sensor retrain_sensor)`, after the person it acts for, if any."""
    tags = context.run.tags
    launched = [f"{kind} {tags[tag]}" for tag, kind in LAUNCHED_BY_TAGS.items() if tag in tags]
    launched += ["automation"] if tags.get(AUTOMATION_TAG) == "true" else []
    run = f"dagster run {context.run.run_id[:8]}" + (f" ({', '.join(launched)})" if launched else "")
    return f"{on_behalf_of} via {run}" if on_behalf_of else run


def audit_markdown(registry: Registry, limit: int = 30) -> dg.MetadataValue:
    """The newest part of the registry's audit trail, for the UI."""
    lines = ["| at (UTC) | version | action | from → to | by | reason |", "|---|---|---|---|---|---|"]
    for r in registry.history()[-limit:]:
        reason = r.reason.replace("|", "/").replace("\n", " ")[:200]
        lines.append(
            f"| {r.at[:19]} | {r.version} | {r.action} | {r.from_stage or '-'} → {r.to_stage or '-'} | {r.actor} | {reason} |"
        )
    return dg.MetadataValue.md("\n".join(lines))
