"""Promotion (steps 5–6): the candidate through blocking gates to Staging, human sign-off.

Thin: the gates, the registry and the statistics live in `bridge_assets.ml` and `core`.
"""

import hashlib

import dagster as dg
from pydantic import Field

from bridge_assets.defs.audit import audit_markdown, open_registry, run_actor
from bridge_assets.defs.cadence import cadenced_sensor
from bridge_assets.defs.features import housing_features
from bridge_assets.defs.resources import Alerting, LakeStorage, MlflowTracking, PromotionPolicy
from bridge_assets.defs.serving_logs import interaction_logs
from bridge_assets.defs.training import candidate_model
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.feedback import LABELS_PREFIX, FeedbackJoin, join_feedback, read_feedback_labels
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.experiment import act_on_verdict, evaluate_experiment, plots_markdown, record_verdict
from bridge_assets.ml.gates import GATES, approve, run_gates
from bridge_assets.ml.registry import CANDIDATE_ALIAS, PRODUCTION_ALIAS, STAGING_ALIAS
from bridge_assets.monitoring.alerts import LoopEvent


@dg.asset(
    deps=[candidate_model, housing_features],
    group_name="registry",
    kinds={"mlflow"},
    owners=["team:ml-engineering"],
    # Every new candidate meets the gates, whoever trained it (schedule, retrain policy, a
    # person); a new feature version alone does not re-judge the same candidate.
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets(housing_features)),
    check_specs=[
        dg.AssetCheckSpec(name, asset="staged_model", blocking=True, description=text) for name, text in GATES.items()
    ],
)
def staged_model(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
    alerting: Alerting,
) -> dg.MaterializeResult:
    """The `candidate` version judged by every gate; `staging` points at it only if all pass
    (and, when sign-off is required, after an approval). A failed gate fails its check with
    the numbers and the run; the outcome is recorded in the audit trail either way."""
    registry = open_registry(storage, mlflow_tracking, actor=run_actor(context))
    version = registry.version_for(CANDIDATE_ALIAS)
    if version is None:
        raise dg.Failure(f"no version of {registry.model_name} is a candidate: materialize candidate_model first")
    outcome = run_gates(registry, FeatureStore(registry.store), version, promotion.settings())
    report = outcome.report
    status = "staged" if outcome.staged else "awaiting approval" if outcome.awaiting_approval else "blocked"
    context.log.info(f"{registry.model_name} v{version}: {status}. {report.explain()}")
    if status == "blocked":
        failed = {r.name: r.summary for r in report.failures()}
        alerting.send(
            LoopEvent(
                "gates_failed",
                f"v{version} blocked: {report.explain()}"[:500],
                registry.model_name,
                version,
                {"failed": failed},
            )
        )
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
                metadata={
                    "summary": result.summary,
                    "skipped": result.skipped,
                    **{k: dg.MetadataValue.md(v) if k == "table" else v for k, v in result.figures.items()},
                },
            )
            for result in report.results
        ],
        data_version=dg.DataVersion(f"{registry.model_name}/{version}/{status}"),
    )


@cadenced_sensor(
    30,
    target=[staged_model],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def candidates_sensor(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> dg.SensorResult | dg.SkipReason:
    """The gates for a candidate registered outside Dagster (`bridge train`, a notebook): no
    `candidate_model` materialization exists for the automation to follow, so this requests
    `staged_model` once for it. Candidates of Dagster runs are left to the automation."""
    registry = open_registry(storage, mlflow_tracking)
    version = registry.version_for(CANDIDATE_ALIAS)
    if version is None:
        return dg.SkipReason(f"no version of {registry.model_name} is a candidate")
    if (judged := registry.gate_record(version)) is not None:
        return dg.SkipReason(f"v{version} was judged by the gates ({judged.action})")
    trained_by = registry.client.get_model_version(registry.model_name, version).tags.get(
        "bridge.dagster_run_id", "none"
    )
    if trained_by != "none":
        return dg.SkipReason(f"v{version} was registered by dagster run {trained_by[:8]}: the automation gates it")
    if context.cursor == version:
        return dg.SkipReason(f"the gates were requested for v{version}")
    request = dg.RunRequest(run_key=f"gates/{registry.model_name}/{version}", tags={"bridge/candidate": version})
    return dg.SensorResult(run_requests=[request], cursor=version)


class ApprovalConfig(dg.Config):
    version: str = Field(description="model version whose gates passed")
    approver: str = Field(description="your name; must be on BRIDGE_APPROVERS")
    reason: str = Field(description="why it may go to Staging (recorded)")


@dg.op
def sign_off(
    context: dg.OpExecutionContext,
    config: ApprovalConfig,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
) -> str:
    """Record a listed approver's sign-off and move `staging` to the version."""
    registry = open_registry(storage, mlflow_tracking, run_actor(context))
    try:
        approve(registry, config.version, config.approver, config.reason, promotion.settings())
    except ValueError as error:
        raise dg.Failure(f"approval refused: {error}") from error
    context.log.info(f"{registry.model_name} v{config.version} approved by {config.approver}; now in Staging")
    return config.version


@dg.job(description="Human sign-off: a listed approver moves a version whose gates passed to Staging.")
def approve_model() -> None:
    sign_off()


def _feedback(store: ObjectStore) -> FeedbackJoin:
    from bridge_assets.lake.interactions import read_interactions

    return join_feedback(read_interactions(store), read_feedback_labels(store, deduplicate=False))


@dg.asset(deps=[interaction_logs], group_name="registry", kinds={"polars"}, owners=["team:ml-engineering"])
def feedback(storage: LakeStorage) -> dg.MaterializeResult:
    """Released ground truth joined to logged predictions by request id: how much feedback
    each variant and version has, labels released twice (counted once) and labels whose
    request was never logged (counted, not dropped)."""
    joined = _feedback(storage.open())
    per_variant = joined.joined.group_by("variant", "model_version").len().sort("variant", "model_version")
    return dg.MaterializeResult(
        metadata={
            "labels": joined.labels,
            "matched": joined.matched,
            "unmatched_labels": joined.unmatched_labels,
            "duplicate_labels": joined.duplicate_labels,
            "per_variant": dg.MetadataValue.md(
                "| variant | version | labelled predictions |\n|---|---|---|\n"
                + "\n".join(f"| {v} | {m} | {n} |" for v, m, n in per_variant.iter_rows())
            ),
        }
    )


@dg.asset(deps=[feedback], group_name="registry", kinds={"scipy"}, owners=["team:ml-engineering"])
def ab_report(
    context: dg.AssetExecutionContext,
    storage: LakeStorage,
    mlflow_tracking: MlflowTracking,
    promotion: PromotionPolicy,
    alerting: Alerting,
) -> dg.MaterializeResult:
    """Staging against Production on delayed ground truth: per-variant MAE/RMSE with
    intervals, Welch's t on per-client MAE, the sample size for the minimum effect, and the
    verdict (promote / keep / inconclusive), recorded on the Staging version."""
    registry = open_registry(storage, mlflow_tracking, actor=run_actor(context))
    joined = _feedback(registry.store)
    evidence = evaluate_experiment(joined, registry, promotion.settings())
    if evidence is None:
        return dg.MaterializeResult(
            metadata={"verdict": "none", "reason": "no experiment: Production and Staging must both be set"}
        )
    record = record_verdict(registry, evidence, joined)
    report = evidence.report
    context.log.info(
        f"A/B v{evidence.staging_version} vs v{evidence.production_version}: {report.verdict} ({report.reason})"
    )
    acted = act_on_verdict(registry, evidence, promotion.promotion_policy)
    context.log.info(acted.summary)
    if report.verdict != "inconclusive":
        alerting.send(
            LoopEvent(
                "ab_verdict",
                f"A/B verdict {report.verdict}: {acted.summary}",
                registry.model_name,
                evidence.staging_version,
                {
                    "verdict": report.verdict,
                    "reason": report.reason,
                    "production_version": evidence.production_version,
                    "policy": promotion.promotion_policy,
                    "action": acted.action,
                    "audit_record": record.key,
                },
            )
        )
    return dg.MaterializeResult(
        metadata={
            "verdict": report.verdict,
            "reason": report.reason,
            "policy_action": acted.action,
            "policy_summary": acted.summary,
            "production_version": evidence.production_version,
            "staging_version": evidence.staging_version,
            "p_value": report.p_value,
            "difference": report.difference,
            "labels_production": report.production.labels,
            "labels_staging": report.staging.labels,
            "required_clients_per_arm": report.required_clients_per_arm,
            "report": dg.MetadataValue.md(evidence.table()),
            "plots": dg.MetadataValue.md(plots_markdown(evidence)),
            "audit_record": record.key,
        },
        data_version=dg.DataVersion(
            f"{evidence.staging_version}/{report.verdict}/{report.production.labels + report.staging.labels}"
        ),
    )


@cadenced_sensor(
    60,
    target=[feedback, ab_report],
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def experiment_sensor(
    context: dg.SensorEvaluationContext, storage: LakeStorage, mlflow_tracking: MlflowTracking
) -> dg.SensorResult | dg.SkipReason:
    """While Production and Staging both exist, newly released labels bring a fresh
    `feedback` + `ab_report` (its verdict then goes to the promotion policy)."""
    registry = open_registry(storage, mlflow_tracking)
    production, staging = registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)
    if production is None or staging is None or production == staging:
        return dg.SkipReason(f"no experiment (production {production or 'none'}, staging {staging or 'none'})")
    releases = sorted(storage.open().list(LABELS_PREFIX))
    state = hashlib.sha256("\n".join([production, staging, *releases]).encode()).hexdigest()[:16]
    if not releases or context.cursor == state:
        return dg.SkipReason(f"no new labels for the experiment v{staging} vs v{production}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=state, tags={"bridge/experiment": f"{staging}-vs-{production}"})],
        cursor=state,
    )
