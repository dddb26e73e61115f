"""Promotion (steps 5–6): the candidate through blocking gates to Staging, human sign-off.

Thin: the gates, the registry and the statistics live in `bridge_assets.ml` and `core`.
"""

import dagster as dg
from pydantic import Field

from bridge_assets.defs.features import housing_features
from bridge_assets.defs.resources import LakeStorage, MlflowTracking, PromotionPolicy
from bridge_assets.defs.serving import open_registry
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.ml.gates import GATES, approve, run_gates
from bridge_assets.ml.registry import CANDIDATE_ALIAS, Registry


def audit_markdown(registry: Registry, limit: int = 30) -> dg.MetadataValue:
    """The newest part of the registry's audit trail, for the UI."""
    records = registry.history()[-limit:]
    lines = ["| at (UTC) | version | action | from → to | by | reason |", "|---|---|---|---|---|---|"]
    for r in records:
        reason = r.reason.replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r.at[:19]} | {r.version} | {r.action} | {r.from_stage or '-'} → {r.to_stage or '-'} | {r.actor} | {reason} |")
    return dg.MetadataValue.md("\n".join(lines))


@dg.asset(
    deps=[candidate_model, housing_features],
    group_name="promotion",
    kinds={"mlflow"},
    check_specs=[dg.AssetCheckSpec(name, asset="staged_model", blocking=True, description=text) for name, text in GATES.items()],
)
def staged_model(
    context: dg.AssetExecutionContext, storage: LakeStorage, mlflow_tracking: MlflowTracking, promotion: PromotionPolicy
) -> dg.MaterializeResult:
    """The `candidate` version judged by every gate; `staging` points at it only if all pass
    (and, when sign-off is required, after an approval). A failed gate fails its check with
    the numbers and the run; the outcome is recorded in the audit trail either way."""
    registry = open_registry(storage, mlflow_tracking, actor=f"dagster run {context.run_id[:8]}")
    version = registry.version_for(CANDIDATE_ALIAS)
    if version is None:
        raise dg.Failure(f"no version of {registry.model_name} is a candidate: materialize candidate_model first")
    outcome = run_gates(registry, FeatureStore(registry.store), version, promotion.settings())
    report = outcome.report
    status = "staged" if outcome.staged else "awaiting approval" if outcome.awaiting_approval else "blocked"
    context.log.info(f"{registry.model_name} v{version}: {status}. {report.explain()}")
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "status": status,
            "verdict": report.explain(),
            "feature_version": report.feature_version,
            "test_rows": report.test_rows,
            "production_version": report.production_version or "none",
            "gates_run_id": report.evaluation_run_id,
            "model_card": dg.MetadataValue.md(report.card),
            "audit_trail": audit_markdown(registry),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=result.name,
                passed=result.passed,
                severity=dg.AssetCheckSeverity.ERROR,
                description=result.summary,
                metadata={"summary": result.summary, "skipped": result.skipped, **{
                    k: dg.MetadataValue.md(v) if k == "table" else v for k, v in result.figures.items()
                }},
            )
            for result in report.results
        ],
        data_version=dg.DataVersion(f"{registry.model_name}/{version}/{status}"),
    )


class ApprovalConfig(dg.Config):
    version: str = Field(description="model version whose gates passed")
    approver: str = Field(description="your name; must be on BRIDGE_APPROVERS")
    reason: str = Field(description="why it may go to Staging (recorded)")


@dg.op
def sign_off(
    context: dg.OpExecutionContext, config: ApprovalConfig, storage: LakeStorage, mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
) -> str:  # fmt: skip
    """Record a listed approver's sign-off and move `staging` to the version."""
    registry = open_registry(storage, mlflow_tracking)
    try:
        approve(registry, config.version, config.approver, config.reason, promotion.settings())
    except ValueError as error:
        raise dg.Failure(f"approval refused: {error}") from error
    context.log.info(f"{registry.model_name} v{config.version} approved by {config.approver}; now in Staging")
    return config.version


@dg.job(description="Human sign-off: a listed approver moves a version whose gates passed to Staging.")
def approve_model() -> None:
    sign_off()
