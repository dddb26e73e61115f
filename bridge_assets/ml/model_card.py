"""The Markdown model card every gated version carries: data, metrics beside the baselines,
slices, intended use, limits and lineage, written from the evaluation's own figures and the
data contract's description of the data set."""

from __future__ import annotations

import json
from collections.abc import Mapping

from bridge_assets.core.contract import INTENDED_USE, KNOWN_LIMITS
from bridge_assets.core.recency import Recency
from bridge_assets.ml.gate_checks import GateResult


def model_card(
    model_name: str,
    version: str,
    tags: Mapping[str, str],
    feature_version: str,
    test_rows: int,
    metrics: dict[str, dict[str, float]],
    results: list[GateResult],
    evaluation_run_id: str,
) -> str:
    """The version's model card (Markdown): data, metrics with baselines, slices, use, limits, lineage."""
    lines = [
        f"# Model card: {model_name} v{version}",
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Data",
        f"- trained on feature version `{tags.get('bridge.feature_version', 'unknown')}` ({tags.get('bridge.split', 'hash')} split)",
        f"- evaluated on the hash-split test rows of feature version `{feature_version}` ({test_rows} rows, unseen in training)",
        "",
        "## How it was made",
        f"- option: {tags.get('bridge.option', 'scratch')}"
        + (f" (incumbent: Production v{tags['bridge.incumbent']})" if tags.get("bridge.incumbent") else "")
        + f"; validated on {'the rows of batches Production never saw' if tags.get('bridge.validation') == 'recent' else 'the whole validation split'}",
        f"- recency: {Recency.from_dict(json.loads(tags.get('bridge.recency') or '{}')).describe()}",
        f"- recalibration stage: {tags.get('bridge.calibration', 'none')}",
        f"- why this option: {tags.get('bridge.choice', 'the only one run')}",
        "",
        "## Metrics on the test rows",
        "| model | RMSE | MAE | R² |",
        "|---|---|---|---|",
        *(f"| {name} | {m['rmse']:,.0f} | {m['mae']:,.0f} | {m['r2']:.4f} |" for name, m in metrics.items()),
        "",
        "## Gates",
        "| gate | result | figures |",
        "|---|---|---|",
        *(
            f"| {r.name} | {'skipped' if r.skipped else 'pass' if r.passed else 'FAIL'} | {r.summary} |"
            for r in results
            if r.name != "model_card"
        ),
        "",
        "## Slices",
        next(
            (str(r.figures["table"]) for r in results if r.name == "slices" and "table" in r.figures),
            "Not compared: no Production version yet.",
        ),
        "",
        "## Limits",
        *(f"- {limit}" for limit in KNOWN_LIMITS),
        "",
        "## Lineage",
        f"- training run `{tags.get('bridge.run_id', 'unknown')}`, config hash `{tags.get('bridge.config_hash', 'unknown')}`",
        f"- git commit `{tags.get('bridge.git_commit', 'unknown')}` (dirty: {tags.get('bridge.git_dirty', 'unknown')})",
        f"- gate evaluation run `{evaluation_run_id}`",
    ]
    return "\n".join(lines) + "\n"
