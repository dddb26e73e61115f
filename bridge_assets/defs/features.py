"""Features (steps 15–17): the versioned housing feature table and its checks."""

import json

import dagster as dg
import polars as pl

from bridge_assets.core.contract import FEATURES, SCHEMA, TARGET
from bridge_assets.core.features import SPLIT_BOUNDS, SPLITS
from bridge_assets.defs.metadata import markdown_preview, table_schema
from bridge_assets.defs.raw import raw_housing
from bridge_assets.defs.resources import LakeStorage
from bridge_assets.lake.feature_store import FeatureStore, build_features
from bridge_assets.lake.landing import LABELS_PREFIX

# Hash splits converge on 64/16/20; below this many rows their proportions are too noisy to judge.
MIN_ROWS_FOR_PROPORTIONS = 500
SPLIT_TOLERANCE = 0.05
EXPECTED_SHARE = dict(zip(SPLITS, (SPLIT_BOUNDS[0], SPLIT_BOUNDS[1] - SPLIT_BOUNDS[0], 1 - SPLIT_BOUNDS[1])))
EXPECTED_SCHEMA = pl.Schema({**SCHEMA, "batch_id": pl.String(), "split": pl.String(), "reference_split": pl.String()})
CHECKS = ("schema", "no_nulls", "row_count", "split_proportions")


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
    off = {s: round(shares[s] - EXPECTED_SHARE[s], 4) for s in SPLITS if abs(shares[s] - EXPECTED_SHARE[s]) > SPLIT_TOLERANCE}
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


@dg.asset(
    deps=[raw_housing],
    group_name="lake",
    kinds={"polars", "duckdb", "parquet"},
    # eager() waits for every dependency partition; one failed or pending raw batch must not
    # hold back the feature table for all the others.
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()),
    check_specs=[dg.AssetCheckSpec(name, asset="housing_features", blocking=True) for name in CHECKS],
)
def housing_features(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.MaterializeResult:
    """Versioned feature table: each validated batch becomes an immutable, content-hashed part.

    Cleaning: categories normalised, exact duplicates dropped (also against earlier batches),
    delayed labels joined by `row_id`, a hash split per row, and the BridgeAI reference split
    on the real data. Query a version with `FeatureStore(store).connect(version)` (DuckDB).
    """
    store = storage.open()
    try:
        build = build_features(store, publish=False)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
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
            "duplicates_dropped": build.duplicates_dropped,
            "rows_awaiting_label": build.awaiting_label,
            "published": not blocking_failed,
            "manifest": dg.MetadataValue.path(store.uri(f"{features.prefix}versions/{version.version}.json")),
            "dagster/column_schema": table_schema(schema).value,
            "dagster/row_count": version.rows,
            "preview": markdown_preview(rows.head(5).collect()),
        },
        check_results=checks,
    )


@dg.sensor(target=[housing_features], default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=30)
def landed_labels_sensor(context: dg.SensorEvaluationContext, storage: LakeStorage) -> dg.SensorResult:
    """Requests a feature-table update when ground truth lands for a batch (delayed labels).

    Batches landed without prices get their feature part only once their labels are there;
    new label objects are requested once each (the cursor holds those already seen).
    """
    seen: set[str] = set(json.loads(context.cursor)) if context.cursor else set()
    landed = [k for k in storage.open().list(LABELS_PREFIX) if k.endswith("/labels.parquet")]
    new = sorted(set(landed) - seen)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"labels:{','.join(new)}")] if new else [],
        cursor=json.dumps(sorted(seen | set(landed))),
        skip_reason=None if new else f"no new labels ({len(landed)} landed)",
    )
