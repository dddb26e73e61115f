"""A training round as its own process, launched by Dagster Pipes (step 13).

Dagster passes the round's settings as Pipes extras and the lake and MLflow locations as
environment variables; this process reads the pinned feature version and the Production
version (the incumbent a round may fine-tune or recalibrate; its unseen batches are the recent
rows), runs every option, logs the round to MLflow, registers the best as a candidate and
reports the materialization's metadata (with the table of options and why one won) back
through Pipes. Run by `PipesSubprocessClient` locally or
`PipesDockerClient` in a container (`python -m bridge_assets.ml.pipes_train`).
"""

from __future__ import annotations

import base64

from dagster_pipes import PipesContext, open_dagster_pipes
from mlflow.exceptions import MlflowException

from bridge_assets.core.presets import TrainConfig
from bridge_assets.core.recency import Recency
from bridge_assets.lake.feature_store import FeatureStore, FeatureVersion
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.registry import PRODUCTION_ALIAS
from bridge_assets.ml.round import Incumbent, RoundPolicy, RoundResult, run_round
from bridge_assets.ml.tracking import (
    MlflowSettings,
    RoundRecord,
    load_registered,
    log_round,
    loss_curve_png,
    unseen_batches,
)


def metrics_table(result: RoundResult) -> str:
    """Markdown: every candidate and both baselines on validation and test."""
    rows = [(c.config.name, c.metrics) for c in result.candidates] + [
        (f"baseline: {name}", scores) for name, scores in result.baselines.items()
    ]
    lines = [
        "| model | val MAE | val RMSE | val R² | test MAE | test RMSE | test R² |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        mark = " (best)" if name == result.best.config.name else ""
        lines.append(
            f"| {name}{mark} | {m['val_mae']:,.0f} | {m['val_rmse']:,.0f} | {m['val_r2']:.4f} "
            f"| {m['test_mae']:,.0f} | {m['test_rmse']:,.0f} | {m['test_r2']:.4f} |"
        )
    return "\n".join(lines)


def materialization_metadata(result: RoundResult, record: RoundRecord, settings: MlflowSettings, version: str) -> dict:
    best = result.best
    curve = base64.b64encode(loss_curve_png(best)).decode()
    url = settings.run_url(record.experiment_id, record.best_run_id)
    version_url = settings.model_version_url(record.model_version)
    return {
        "model_uri": record.model_uri,
        "model_version": record.model_version,
        "best_config": record.best_name,
        "best_option": best.option,
        "config_hash": best.config.config_hash(),
        "feature_version": version,
        "split": result.split,
        "rows": {"raw_value": result.rows, "type": "json"},
        "validation": result.validation,
        "incumbent": result.incumbent or "none",
        "recency": result.policy.recency.describe(),
        "calibration": best.calibration.describe() if best.calibration else "none",
        "choice": result.reason(),
        "mlflow_parent_run_id": record.parent_run_id,
        "mlflow_run_id": record.best_run_id,
        "mlflow_run": {"raw_value": url, "type": "url"},
        "mlflow_model_version": {"raw_value": version_url, "type": "url"},
        **{f"best_{k}": v for k, v in best.metrics.items()},
        "options": {"raw_value": result.choice_table(), "type": "md"},
        "metrics": {"raw_value": metrics_table(result), "type": "md"},
        "loss_curve": {"raw_value": f"![loss curve](data:image/png;base64,{curve})", "type": "md"},
    }


def production_incumbent(
    settings: MlflowSettings, features: FeatureStore, version: FeatureVersion
) -> tuple[Incumbent | None, frozenset[str]]:
    """The Production version as a round's incumbent, and the batches of `version` it never saw
    (the round's recent rows); (None, empty) before there is a Production."""
    client = settings.activate()
    try:
        production = str(client.get_model_version_by_alias(settings.model_name, PRODUCTION_ALIAS).version)
    except MlflowException:
        return None, frozenset()
    model, calibration = load_registered(settings.model_name, production)
    unseen = unseen_batches(client, settings.model_name, production, features, version.batch_ids) or []
    return Incumbent(production, model, calibration), frozenset(unseen)


def train(pipes: PipesContext) -> None:
    features = FeatureStore(StorageSettings.from_env().open())
    version = pipes.get_extra("feature_version")
    pinned = features.load(version) if version else features.latest()
    if pinned is None:
        raise SystemExit("no feature version yet: materialize housing_features first")
    configs = [TrainConfig.from_dict(c) for c in pipes.get_extra("configs")]
    split = pipes.get_extra("split")
    settings = MlflowSettings.from_env()
    incumbent, recent = production_incumbent(settings, features, pinned) if split == "hash" else (None, frozenset())
    policy = RoundPolicy(
        options=tuple(pipes.get_extra("options")),
        recency=Recency.from_dict(pipes.get_extra("recency")),
        recent_batches=recent,
        min_gain=pipes.get_extra("min_gain"),
        calibration=pipes.get_extra("calibration"),
    )
    rows = features.scan(pinned).collect()
    pipes.log.info(
        f"round {list(policy.options)} with {[c.name for c in configs]} on feature version {pinned.version} ({rows.height} rows, {split} split); "
        f"incumbent: {f'Production v{incumbent.version}' if incumbent else 'none'}; recent batches: {sorted(recent) or 'none'}; "
        f"recency: {policy.recency.describe()}"
    )
    result = run_round(rows, configs, split, policy=policy, incumbent=incumbent)
    record = log_round(settings, result, feature_version=pinned.version, dagster_run_id=pipes.run_id)
    pipes.log.info(f"registered {record.model_uri} ({record.best_name}) as candidate: {result.reason()}")
    pipes.report_asset_materialization(
        metadata=materialization_metadata(result, record, settings, pinned.version),
        data_version=f"{record.model_name}/{record.model_version}",
    )


def main() -> None:
    with open_dagster_pipes() as pipes:
        train(pipes)


if __name__ == "__main__":
    main()
