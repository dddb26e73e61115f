"""Operating the interaction logs (step 10): closed hours compacted, old hours expired.

Replicas write one Parquet file per flush (and a sweep one per orphaned spool range), so an
hour holds many small files; this asset merges each hour that ended over an hour ago into one
file (record counts checked, nothing lost or duplicated; see `serving.interactions`) and, with
`BRIDGE_INTERACTIONS_RETENTION_DAYS` set, deletes hours older than that many days.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from bridge_assets.defs.resources import LakeStorage


class LogCompactionConfig(dg.Config):
    retention_days: float | None = Field(
        default=None,
        ge=0,
        description="delete interaction files of hours older than this many days; 0 keeps them all; "
        "unset: the storage resource's (`BRIDGE_INTERACTIONS_RETENTION_DAYS`)",
    )


@dg.asset(
    group_name="serving",
    kinds={"parquet"},
    owners=["team:ml-engineering"],
    automation_condition=dg.AutomationCondition.on_cron("20 * * * *"),
)
def interaction_logs(
    context: dg.AssetExecutionContext, config: LogCompactionConfig, storage: LakeStorage
) -> dg.MaterializeResult:
    """The interaction logs, compacted per closed hour and kept for the retention period; the
    lake's housekeeping too: what killed writers left (staging files, incomplete multipart
    uploads older than an hour) is swept."""
    from bridge_assets.lake.interactions import compact_closed_hours, expire_interactions

    store = storage.open()
    now = datetime.now(UTC)
    compacted = compact_closed_hours(store, now)
    retention_days = storage.interactions_retention_days if config.retention_days is None else config.retention_days
    expired = expire_interactions(store, now, timedelta(days=retention_days)) if retention_days > 0 else 0
    swept = store.sweep_temporaries()
    for remains in swept:
        context.log.info(f"swept what a killed writer left: {remains}")
    for done in compacted:
        context.log.info(f"{done.partition}: {done.files} files → 1 ({done.records} records)")
    return dg.MaterializeResult(
        metadata={
            "hours_compacted": len(compacted),
            "files_merged": sum(c.files for c in compacted),
            "records_compacted": sum(c.records for c in compacted),
            "files_expired": expired,
            "temporaries_swept": len(swept),
        }
    )
