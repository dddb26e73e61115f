"""The online A/B experiment's evidence: errors per variant from joined feedback, the report,
its plots, and the verdict recorded for the Staging version (step 6)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import polars as pl

from bridge_assets.core.abtest import ABReport, compare_variants, per_client_mae
from bridge_assets.lake.feedback import FeedbackJoin
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS, AuditRecord, Registry


@dataclass(frozen=True)
class ExperimentEvidence:
    """The report of one comparison and the rows it used."""

    production_version: str
    staging_version: str
    report: ABReport
    rows: pl.DataFrame  # variant, client, error

    def table(self) -> str:
        """Markdown: per-variant figures with intervals, then the test."""
        r = self.report
        lines = ["| variant | version | labels | clients | MAE (95% CI) | RMSE (95% CI) |", "|---|---|---|---|---|---|"]
        for summary, version in ((r.production, self.production_version), (r.staging, self.staging_version)):
            lines.append(
                f"| {summary.variant} | v{version} | {summary.labels} | {summary.clients} | "
                f"{summary.mae:,.0f} ({summary.mae_ci[0]:,.0f} – {summary.mae_ci[1]:,.0f}) | "
                f"{summary.rmse:,.0f} ({summary.rmse_ci[0]:,.0f} – {summary.rmse_ci[1]:,.0f}) |"
            )
        lines += [
            "",
            (
                f"Welch t on per-client MAE: difference (Staging − Production) {r.difference:+,.0f} "
                f"({r.relative_difference:+.1%}), 95% CI {r.difference_ci[0]:+,.0f} … {r.difference_ci[1]:+,.0f}, "
                f"t = {r.t_statistic:.2f}, df = {r.degrees_of_freedom:.0f}, p = {r.p_value:.3g}"
            ),
            (
                f"Needed for a {r.min_effect:.0%} effect at α = {r.alpha}, power {r.power}: "
                f"{r.required_clients_per_arm} clients (~{r.required_labels_per_arm} labels) per arm"
            ),
            f"**Verdict: {r.verdict}** — {r.reason}",
        ]
        return "\n".join(lines)


def experiment_rows(joined: pl.DataFrame, production_version: str, staging_version: str) -> pl.DataFrame:
    """Labelled requests each variant answered with the version under test; a request without
    a client id is its own client (the router assigned it by request id)."""
    client = pl.col("client_id") if "client_id" in joined.columns else pl.lit(None, dtype=pl.String)
    return joined.filter(
        ((pl.col("variant") == "production") & (pl.col("model_version") == production_version))
        | ((pl.col("variant") == "staging") & (pl.col("model_version") == staging_version))
    ).select("variant", pl.coalesce(client, pl.col("request_id")).alias("client"), "error")


def evaluate_experiment(
    feedback: FeedbackJoin, registry: Registry, settings: PromotionSettings
) -> ExperimentEvidence | None:
    """Compare Staging with Production on the feedback so far; None without both versions."""
    production, staging = registry.version_for(PRODUCTION_ALIAS), registry.version_for(STAGING_ALIAS)
    if production is None or staging is None:
        return None
    rows = experiment_rows(feedback.joined, production, staging)
    arms = {v: rows.filter(pl.col("variant") == v) for v in ("production", "staging")}
    report = compare_variants(
        arms["production"]["error"].to_numpy(),
        arms["production"]["client"].to_numpy(),
        arms["staging"]["error"].to_numpy(),
        arms["staging"]["client"].to_numpy(),
        min_effect=settings.ab_min_effect,
        alpha=settings.ab_alpha,
        power=settings.ab_power,
    )
    return ExperimentEvidence(production, staging, report, rows)


def record_verdict(registry: Registry, evidence: ExperimentEvidence, feedback: FeedbackJoin) -> AuditRecord:
    """The verdict becomes evidence on the Staging version (what `promote_staging` checks)."""
    r = evidence.report
    stage = registry.stage(evidence.staging_version)
    return registry.record(
        "ab_verdict",
        evidence.staging_version,
        from_stage=stage,
        to_stage=stage,
        reason=r.reason,
        evidence={
            "verdict": r.verdict,
            "production_version": evidence.production_version,
            "difference": r.difference,
            "relative_difference": r.relative_difference,
            "p_value": r.p_value,
            "labels": {"production": r.production.labels, "staging": r.staging.labels},
            "clients": {"production": r.production.clients, "staging": r.staging.clients},
            "required_clients_per_arm": r.required_clients_per_arm,
            "feedback": {
                "labels": feedback.labels,
                "matched": feedback.matched,
                "unmatched": feedback.unmatched_labels,
            },
        },
    )


@dataclass(frozen=True)
class VerdictAction:
    """What the promotion policy did about a verdict, in words for people and the audit trail."""

    action: str  # "promoted", "ended", "reported", "waiting"
    summary: str


def act_on_verdict(registry: Registry, evidence: ExperimentEvidence, policy: str) -> VerdictAction:
    """The promotion policy (`BRIDGE_PROMOTION_POLICY`): `automatic` promotes on `promote` (the
    verdict is the reason in the audit trail) and ends the experiment on `keep` (Staging goes
    back to None; Production stays); `manual` only reports, leaving the `promote_model` run to
    a person. An inconclusive verdict waits for more feedback under either policy."""
    verdict, staging = evidence.report.verdict, evidence.staging_version
    if verdict == "inconclusive":
        return VerdictAction("waiting", f"v{staging}: inconclusive so far ({evidence.report.reason})")
    if policy != "automatic":
        how = (
            "run promote_model (or `bridge promote`)"
            if verdict == "promote"
            else "end the experiment (unstage) or let it run"
        )
        return VerdictAction(
            "reported", f"v{staging}: verdict {verdict}; the manual policy leaves it to a person: {how}"
        )
    if verdict == "promote":
        previous = registry.promote_staging(staging)
        return VerdictAction("promoted", f"v{staging} promoted to Production by the automatic policy (was v{previous})")
    registry.unstage(f"A/B verdict keep, automatic policy: {evidence.report.reason}")
    return VerdictAction(
        "ended", f"experiment ended by the automatic policy: v{staging} kept out ({evidence.report.reason})"
    )


def plots_markdown(evidence: ExperimentEvidence) -> str:
    """Per-client MAE distributions and MAE with intervals per variant (base64 PNG in Markdown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = evidence.report
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for variant, color in (("production", "tab:blue"), ("staging", "tab:orange")):
        arm = evidence.rows.filter(pl.col("variant") == variant)
        if arm.height:
            left.hist(
                per_client_mae(arm["error"].to_numpy(), arm["client"].to_numpy()),
                bins=30,
                alpha=0.6,
                color=color,
                label=variant,
            )
    left.set(xlabel="per-client MAE", ylabel="clients", title="per-client MAE")
    left.legend()
    summaries = [r.production, r.staging]
    maes = np.array([s.mae for s in summaries])
    errors = np.array([[s.mae - s.mae_ci[0] for s in summaries], [s.mae_ci[1] - s.mae for s in summaries]])
    right.bar(
        [f"production v{evidence.production_version}", f"staging v{evidence.staging_version}"],
        maes,
        yerr=errors,
        capsize=6,
        color=["tab:blue", "tab:orange"],
    )
    right.set(ylabel="MAE", title=f"MAE with 95% CI — verdict: {r.verdict}")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f"![A/B](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"
