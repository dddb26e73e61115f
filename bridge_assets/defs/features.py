"""Features (steps 15–17): the versioned housing feature table and its checks."""

import hashlib
import json
from datetime import timedelta

import dagster as dg
import polars as pl

from bridge_assets.core.contract import FEATURES, SCHEMA, TARGET
from bridge_assets.core.features import SPLIT_BOUNDS, SPLITS
from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.metadata import markdown_preview, table_schema
from bridge_assets.defs.policies import storage_retries
from bridge_assets.defs.raw import raw_housing
from bridge_assets.defs.resources import LakeStorage
from bridge_assets.lake.feature_store import FeatureBuild, FeatureStore, build_features, feature_backlog

# Hash splits converge on 64/16/20; below this many rows their proportions are too noisy to judge.
MIN_ROWS_FOR_PROPORTIONS = 500
SPLIT_TOLERANCE = 0.05
EXPECTED_SHARE = dict(zip(SPLITS, (SPLIT_BOUNDS[0], SPLIT_BOUNDS[1] - SPLIT_BOUNDS[0], 1 - SPLIT_BOUNDS[1])))
EXPECTED_SCHEMA = pl.Schema({**SCHEMA, "batch_id": pl.String(), "split": pl.String(), "reference_split": pl.String()})
CHECKS = ("schema", "no_nulls", "row_count", "split_proportions")
ADDS_ROWS_CHECK = "batches_add_rows"
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _checks(rows: pl.LazyFrame, schema: pl.Schema, counts: dict[str, int]) -> list[dg.AssetCheckResult]:
    """Evaluate the table's contract on a version: schema, nulls, rows, split shares."""
    missing_or_wrong = {
        name: f"expected {dtype}, found {schema.get(name)}"
        for name, dtype in EXPECTED_SCHEMA.items()
        if schema.get(name) != dtype
    }
    required = ["row_id", "batch_id", *FEATURES, TARGET, "split"]
    nulls = rows.select(pl.col(required).null_count()).collect().row(0, named=True) if not missing_or_wrong else {}
    total = sum(counts.values())
    shares = {s: counts.get(s, 0) / total for s in SPLITS} if total else {}
    off = {
        s: round(shares[s] - EXPECTED_SHARE[s], 4)
        for s in SPLITS
        if abs(shares[s] - EXPECTED_SHARE[s]) > SPLIT_TOLERANCE
    }
    judged = total >= MIN_ROWS_FOR_PROPORTIONS
    return [
        dg.AssetCheckResult(check_name="schema", passed=not missing_or_wrong, metadata={"problems": missing_or_wrong}),
        dg.AssetCheckResult(
            check_name="no_nulls",
            passed=bool(nulls) and not any(nulls.values()),
            metadata={"null_counts": {k: v for k, v in nulls.items() if v}},
        ),
        dg.AssetCheckResult(check_name="row_count", passed=total > 0, metadata={"rows": total}),
        dg.AssetCheckResult(
            check_name="split_proportions",
            passed=not judged or not off,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"shares": shares, "expected": EXPECTED_SHARE, "off_by": off, "judged": judged},
        ),
    ]


def _adds_rows_check(build: FeatureBuild) -> dg.AssetCheckResult:
    """Warns about batches that added no row: every labelled row was already in the table."""
    nothing = build.batches_adding_nothing
    return dg.AssetCheckResult(
        check_name=ADDS_ROWS_CHECK,
        passed=not nothing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "batches_adding_no_rows": dg.MetadataValue.json(nothing),
            "hint": "a repeated simulator seed lands the same rows again; use a new seed",
        },
    )


@dg.asset(
    deps=[raw_housing],
    group_name="features",
    kinds={"polars", "duckdb", "parquet"},
    owners=["team:data-engineering"],
    # Stale features mean training and monitoring look at old data: warn after half the window.
    freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(hours=48), warn_window=timedelta(hours=24)),
    # No automation condition: `feature_backlog_sensor` requests a run while any validated
    # batch is missing from the table, which also covers runs that interleave.
    check_specs=[
        *(dg.AssetCheckSpec(name, asset="housing_features", blocking=True) for name in CHECKS),
        dg.AssetCheckSpec(ADDS_ROWS_CHECK, asset="housing_features", description="every new batch adds rows"),
    ],
)
def housing_features(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    """Versioned feature table: each validated batch becomes an immutable, content-hashed part.

    Cleaning: categories normalised, exact duplicates dropped (also against earlier batches),
    delayed labels joined by `row_id`, a hash split per row, and the BridgeAI reference split
    on the real data. Query a version with `FeatureStore(store).connect(version)` (DuckDB).
    """
    with storage_retries(context, storage):
        return _feature_version(context, storage)


def _feature_version(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    store = storage.open()
    try:
        build = build_features(store, publish=False)
    except ValueError as error:
        raise dg.Failure(str(error), allow_retries=False) from error  # no data yet: retrying cannot help
    version = build.version
    features = FeatureStore(store)
    rows = features.scan(version)
    schema = rows.collect_schema()
    counts = version.rows_per_split
    checks = _checks(rows, schema, counts)
    blocking_failed = [c.check_name for c in checks if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR]
    if blocking_failed:  # the version stays unpublished: training keeps using the last good one
        context.log.error(f"feature version {version.version} failed {blocking_failed}; LATEST not moved")
    else:
        features.publish(version)
    if build.batches_adding_nothing:
        context.log.warning(f"batches adding no rows (all duplicates): {build.batches_adding_nothing}")
    context.log.info(f"feature version {version.version}: +{build.added_batches} on top of {build.previous}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version.version),
        metadata={
            "version": version.version,
            "previous_version": build.previous or "none",
            "rows": version.rows,
            "rows_per_split": dg.MetadataValue.json(counts),
            "batches": dg.MetadataValue.json(version.batch_ids),
            "added_batches": dg.MetadataValue.json(build.added_batches),
            "batches_adding_no_rows": dg.MetadataValue.json(build.batches_adding_nothing),
            "rows_added_per_batch": dg.MetadataValue.json({o.batch_id: o.rows_added for o in build.outcomes}),
            "duplicates_dropped": build.duplicates_dropped,
            "rows_awaiting_label": build.awaiting_label,
            "published": not blocking_failed,
            "manifest": dg.MetadataValue.path(store.uri(f"{features.prefix}versions/{version.version}.json")),
            "dagster/column_schema": table_schema(schema),
            "dagster/row_count": version.rows,
            "preview": markdown_preview(rows.head(5).collect()),
        },
        check_results=[*checks, _adds_rows_check(build)],
    )


@cadenced_sensor(
    30,
    target=[housing_features],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def feature_backlog_sensor(context: dg.SensorEvaluationContext, storage: LakeStorage) -> dg.SensorResult:
    """Requests a feature-table run while a validated batch is missing from the latest version.

    The rule is the table's own state (`feature_backlog`), not "a parent was updated since the
    last run": a run that started before a raw batch finished, or labels that land later, leave
    that batch in the backlog and the next tick requests it. The run key is the backlog and the
    version it builds on, so an unchanged state is never requested twice (a run whose blocking
    checks failed is not repeated in a loop); no request while a feature run is in progress.
    """
    store = storage.open()
    backlog = feature_backlog(store)
    if not backlog:
        return dg.SensorResult(skip_reason="every validated batch is in the latest feature version")
    running = [
        run.run_id
        for run in context.instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS))
        if run.asset_selection and housing_features.key in run.asset_selection
    ]
    if running:
        return dg.SensorResult(skip_reason=f"backlog {backlog} waits for feature run {running[0]}")
    latest = FeatureStore(store).latest()
    state = json.dumps({"latest": latest.version if latest else None, "backlog": backlog}, sort_keys=True)
    run_key = f"features-{hashlib.sha256(state.encode()).hexdigest()[:16]}"
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"bridge/backlog": ",".join(backlog)[:200]})],
    )
