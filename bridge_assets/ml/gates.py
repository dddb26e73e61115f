"""Compliance gates between a candidate and Staging (step 5), and the human sign-off.

Every gate judges the registered pyfunc (`models:/name/version`), the form any MLflow client
loads, so a version that misbehaves only as a pyfunc is caught too. Rows are the latest
feature version's hash-split test rows: the split is stable by `row_id`, so no earlier version
trained on them either. Gates:

1. `baseline`: RMSE and MAE not worse than the better linear baseline (lower test RMSE) beyond a
   tolerance;
2. `champion`: not worse than the current Production on the same rows beyond a tolerance —
   the test rows of batches Production never saw when there are enough of them;
3. `signature`: the logged input schema equals the contract (12 features, types, no extras);
4. `edge_probe`: finite, positive predictions at every bound, a very large area, and every
   category level in any case;
5. `slices`: MAE of each furnishing level and each yes/no value not worse than Production's;
6. `latency`: single-row p99 within a budget, not counting time spent waiting for a CPU;
7. `model_card`: a Markdown card logged on the version's run.

`mlflow.models.evaluate` scores the predictions (logged in a `gates` run: the evidence) and
`mlflow.validate_evaluation_results` applies the thresholds of gates 1 and 2. Tolerances and
budgets come from `PromotionSettings.from_env` (`promotion_settings.py`: variables
`BRIDGE_GATE_*`, `BRIDGE_AB_*`, `BRIDGE_APPROVERS`, `BRIDGE_REQUIRE_APPROVAL`), read nowhere else.
This module runs the gates and records the outcome; each gate is in `gate_checks.py`, the card in
`model_card.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import numpy as np
import polars as pl

from bridge_assets.core.contract import (
    TARGET,
)
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.metrics import BASELINES, LinearModel, regression_metrics
from bridge_assets.core.recency import Recency
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.ml.gate_checks import (
    GateResult,
    edge_gate,
    latency_gate,
    model_input,
    predict,
    signature_gate,
    slice_gate,
    threshold_gate,
)
from bridge_assets.ml.model_card import model_card
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS, STAGING_ALIAS, PromotionRefused, Registry
from bridge_assets.ml.round import split_rows, windowed
from bridge_assets.ml.tracking import unseen_batches

GATES: dict[str, str] = {
    "baseline": "RMSE and MAE not worse than the better linear baseline (by RMSE) beyond the tolerance",
    "champion": "not worse than the current Production on the same rows beyond the tolerance",
    "signature": "input schema equals the contract: 12 features, their types, no extras",
    "edge_probe": "finite, positive predictions at bounds, a very large area, every category level in any case",
    "slices": "per-slice MAE (furnishing level, each yes/no) not worse than Production's beyond the tolerance",
    "latency": "single-row prediction p99 within the budget (time waiting for a CPU not counted)",
    "model_card": "a Markdown model card logged on the version",
}


@dataclass
class GateReport:
    """All gates of one version, the card and where the evidence is in MLflow."""

    model_name: str
    version: str
    feature_version: str
    test_rows: int
    results: list[GateResult]
    card: str
    evaluation_run_id: str
    production_version: str | None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def explain(self) -> str:
        """What blocked the version (gate names and numbers), or that every gate passed."""
        failed = self.failures()
        if not failed:
            return f"v{self.version}: every gate passed"
        return f"v{self.version} blocked by " + "; ".join(f"{r.name}: {r.summary}" for r in failed)

    def evidence(self) -> dict[str, Any]:
        return {
            "feature_version": self.feature_version,
            "test_rows": self.test_rows,
            "evaluation_run_id": self.evaluation_run_id,
            "production_version": self.production_version,
            "gates": {r.name: {"passed": r.passed, "skipped": r.skipped, "summary": r.summary} for r in self.results},
        }


def _champion_rows(
    registry: Registry,
    features: FeatureStore,
    production_version: str,
    batch_ids: list[str],
    test: pl.DataFrame,
    settings: PromotionSettings,
) -> tuple[np.ndarray, str]:
    """The test rows the champion gate judges on, and how to name them. After the world moved
    (a price rise, feedback from decayed traffic) a retrained candidate must beat Production on
    what is served now — rows of batches Production never saw — not on the old regime's rows,
    where a model that learned the change is worse by design. With fewer than
    `champion_recent_min_rows` such rows (or Production's feature version unknown), every test
    row: a small new sample would make the comparison noise."""
    every = np.ones(test.height, dtype=bool)
    unseen = unseen_batches(registry.client, registry.model_name, production_version, features, batch_ids) or []
    recent = test["batch_id"].is_in(unseen).to_numpy() if unseen else ~every
    if recent.sum() < settings.champion_recent_min_rows or recent.all():
        return every, f"Production v{production_version}"
    shown = ", ".join(unseen[:3]) + (f" and {len(unseen) - 3} more" if len(unseen) > 3 else "")
    return (
        recent,
        f"Production v{production_version} on the {int(recent.sum())} test rows of batches it never saw ({shown})",
    )


def evaluate_version(
    registry: Registry, features: FeatureStore, version: str, settings: PromotionSettings
) -> GateReport:
    """Run every gate on `version` against the current Production (never raises for a bad model).

    A version whose round validated on recent rows (tag `bridge.validation=recent`: rows of
    batches Production never saw) is judged on the same kind of rows by the baseline and slice
    gates as by the champion gate, against baselines fitted under its round's recency
    (`bridge.recency`): what it was made for, measured as its round measured it."""
    latest = features.latest()
    if latest is None:
        raise ValueError("no feature version yet: materialize housing_features first")
    parts = split_rows(features.scan(latest.version).collect(), "hash")
    test = parts["test"]
    actual = test[TARGET].to_numpy()
    name, client = registry.model_name, registry.client
    details = client.get_model_version(name, str(version))
    recency = Recency.from_dict(json.loads(details.tags.get("bridge.recency") or "{}"))
    train, weights = windowed(parts["train"], recency)
    encode = Preprocessor.fit(train)
    x_train, x_test = encode.transform(train), encode.transform(test)
    baseline_predictions = {
        f"baseline: {baseline}": LinearModel.fit(
            x_train, train[TARGET].to_numpy(), log_target=log_target, weights=weights
        ).predict(x_test)
        for baseline, log_target in BASELINES.items()
    }
    metrics: dict[str, dict[str, float]] = {
        key: regression_metrics(actual, p) for key, p in baseline_predictions.items()
    }

    production_version = registry.version_for(PRODUCTION_ALIAS)
    if production_version == str(version):
        production_version = None  # re-checking Production itself: nothing else to compare with

    def load_and_predict(v: str) -> tuple[Any, np.ndarray | None, str | None]:
        try:
            model = mlflow.pyfunc.load_model(f"models:/{name}/{v}")
        except Exception as error:  # noqa: BLE001
            return None, None, f"does not load: {type(error).__name__}: {str(error)[:300]}"
        try:
            return model, predict(model, model_input(test)), None
        except Exception as error:  # noqa: BLE001
            return model, None, f"{type(error).__name__}: {str(error)[:300]}"

    model, predictions, error = load_and_predict(str(version))
    production_predictions = load_and_predict(production_version)[1] if production_version else None
    rows, against = np.ones(test.height, dtype=bool), "all test rows"
    if production_version is not None:
        rows, against = _champion_rows(registry, features, production_version, latest.batch_ids, test, settings)
    recent = details.tags.get("bridge.validation") == "recent" and not rows.all()
    judged = rows if recent else np.ones(test.height, dtype=bool)
    with mlflow.start_run(
        run_name=f"gates {name} v{version}", tags={"bridge.kind": "gates", "bridge.model_version": str(version)}
    ) as run:
        on_judged = {key: regression_metrics(actual[judged], p[judged]) for key, p in baseline_predictions.items()}
        better = min(on_judged, key=lambda key: on_judged[key]["rmse"])
        limits = {k: on_judged[better][k] * (1 + settings.baseline_tolerance) for k in ("rmse", "mae")}
        where = f" on the {int(judged.sum())} test rows of batches Production never saw" if recent else ""
        baseline_note = f"the better linear baseline ({better.removeprefix('baseline: ')}{', recency ' + recency.describe() if recency.active else ''}){where}"
        results = [
            threshold_gate(
                "baseline",
                predictions[judged] if predictions is not None else None,
                actual[judged],
                limits,
                baseline_note,
                error,
            )
        ]
        if production_version is None:
            results.append(GateResult("champion", True, "skipped: no Production version yet", skipped=True))
        elif production_predictions is None:
            results.append(
                GateResult("champion", False, f"Production v{production_version} did not predict the test rows")
            )
        else:
            metrics[f"Production v{production_version}"] = regression_metrics(actual, production_predictions)
            prod = regression_metrics(actual[rows], production_predictions[rows])
            limits = {k: prod[k] * (1 + settings.champion_tolerance) for k in ("rmse", "mae")}
            results.append(
                threshold_gate(
                    "champion",
                    predictions[rows] if predictions is not None else None,
                    actual[rows],
                    limits,
                    against,
                    error,
                )
            )
        if predictions is not None:
            metrics = {f"candidate v{version}": regression_metrics(actual, predictions), **metrics}
        if recent:
            shown = {
                key: p
                for key, p in (
                    (f"candidate v{version}", predictions),
                    (f"Production v{production_version}", production_predictions),
                    *baseline_predictions.items(),
                )
                if p is not None
            }
            metrics |= {f"{key}, recent rows": regression_metrics(actual[rows], p[rows]) for key, p in shown.items()}
        results.append(signature_gate(model))
        results.append(edge_gate(model) if model is not None else GateResult("edge_probe", False, error or "no model"))
        sliced = lambda p: p[judged] if p is not None else None
        results.append(
            slice_gate(
                sliced(predictions),
                sliced(production_predictions),
                test.filter(pl.Series(judged)),
                settings,
                production_version,
            )
        )
        results.append(
            latency_gate(model, model_input(test.head(1)), settings)
            if model is not None
            else GateResult("latency", False, error or "no model")
        )
        card = model_card(
            name, str(version), details.tags, latest.version, test.height, metrics, results, run.info.run_id
        )
        results.append(_log_card(registry, details, card, run.info.run_id))
        mlflow.log_metrics({f"gate_{r.name}_passed": float(r.passed) for r in results})
        mlflow.log_text(card, "model_card.md")
    return GateReport(
        name, str(version), latest.version, test.height, results, card, run.info.run_id, production_version
    )


def _log_card(registry: Registry, details: Any, card: str, evaluation_run_id: str) -> GateResult:
    """Gate 7: the card becomes an artifact of the version's own run and a tag points at it."""
    run_id = details.run_id or evaluation_run_id
    try:
        registry.client.log_text(run_id, card, "model_card.md")
        logged = {a.path for a in registry.client.list_artifacts(run_id)}
    except Exception as error:  # noqa: BLE001
        return GateResult("model_card", False, f"could not log the model card: {type(error).__name__}: {error}")
    if "model_card.md" not in logged:
        return GateResult("model_card", False, f"model_card.md missing from run {run_id} after logging")
    uri = f"runs:/{run_id}/model_card.md"
    registry.client.set_model_version_tag(registry.model_name, details.version, "bridge.model_card", uri)
    return GateResult("model_card", True, f"logged at {uri}", {"uri": uri, "characters": len(card)})


@dataclass(frozen=True)
class GateOutcome:
    """What happened to the version after its gates."""

    report: GateReport
    staged: bool
    awaiting_approval: bool


def run_gates(registry: Registry, features: FeatureStore, version: str, settings: PromotionSettings) -> GateOutcome:
    """Evaluate `version`, record the outcome, and move `staging` to it only if every gate
    passed (and, when sign-off is required, not before an approval)."""
    report = evaluate_version(registry, features, version, settings)
    stage = registry.stage(version)
    if not report.passed:
        registry.record(
            "gates_failed",
            version,
            from_stage=stage,
            to_stage=stage,
            reason=report.explain(),
            evidence=report.evidence(),
        )
        return GateOutcome(report, staged=False, awaiting_approval=False)
    registry.record(
        "gates_passed", version, from_stage=stage, to_stage=stage, reason=report.explain(), evidence=report.evidence()
    )
    if registry.version_for(PRODUCTION_ALIAS) == str(version):  # re-checked Production: nothing to stage
        return GateOutcome(report, staged=False, awaiting_approval=False)
    if settings.require_approval and not registry.approved(version):
        return GateOutcome(report, staged=False, awaiting_approval=True)
    registry.stage_version(version, reason="every gate passed", evidence=report.evidence())
    return GateOutcome(report, staged=True, awaiting_approval=False)


def approve(registry: Registry, version: str, approver: str, reason: str, settings: PromotionSettings) -> None:
    """A human sign-off: only a listed approver, only for a version whose latest gate run
    passed; recorded, then the version moves to Staging."""
    if approver not in settings.approvers:
        raise PromotionRefused(
            f"{approver!r} is not an approver (BRIDGE_APPROVERS: {', '.join(settings.approvers) or 'none'})"
        )
    if not reason.strip():
        raise PromotionRefused("an approval needs a reason")
    if registry.version_for(STAGING_ALIAS) == str(version):
        raise PromotionRefused(f"v{version} is already in Staging: nothing to approve")
    gates = registry.gate_record(version)
    if gates is None or gates.action != "gates_passed":
        raise PromotionRefused(
            f"v{version} has no passing gate record to approve ({gates.reason if gates else 'never evaluated'})"
        )
    approved = Registry(registry.client, registry.model_name, registry.store, actor=approver)
    stage = approved.stage(version)
    approved.record(
        "approve", version, from_stage=stage, to_stage=stage, reason=reason, evidence={"gate_record": gates.key}
    )
    approved.stage_version(
        version,
        reason=f"approved by {approver}: {reason}",
        evidence={"gate_record": gates.key, **asdict(gates)["evidence"]},
    )
