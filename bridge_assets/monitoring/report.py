"""A window's drift and decay report: computed per model version and variant, written to the
lake as JSON (for machines), HTML (for people) and one PNG per feature (reference vs window).

    monitoring/reports/<window>/report.json
    monitoring/reports/<window>/report.html
    monitoring/reports/<window>/plots/<version>--<variant>--<column>.png
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl

from bridge_assets.lake.storage import ObjectStore
from bridge_assets.monitoring.alarms import Alarm, AlarmKind, alarm_texts
from bridge_assets.monitoring.decay import error_stats, judge_estimated, judge_realised
from bridge_assets.monitoring.drift import ColumnDrift, profile_drift
from bridge_assets.monitoring.profiles import (
    MONITORED_COLUMNS,
    PREDICTION,
    WindowSlice,
    window_bounds,
    window_rows,
    window_slices,
)
from bridge_assets.monitoring.reference import Reference
from bridge_assets.monitoring.settings import MonitorSettings
from bridge_assets.monitoring.whylogs_compat import DatasetProfileView

REPORTS_PREFIX = "monitoring/reports/"
FeedbackJoiner = Callable[[pl.DataFrame], pl.DataFrame]  # window rows -> joined rows with `error`


def report_prefix(window: str) -> str:
    return f"{REPORTS_PREFIX}{window}/"


@dataclass
class SliceReport:
    """Drift and decay of one model version and variant within a window."""

    model_version: str
    variant: str
    rows: int
    rejected: dict[str, int]
    reference: dict | None
    drift: list[ColumnDrift] = field(default_factory=list)
    realised: dict | None = None
    estimated: dict | None = None
    plots: dict[str, bytes] = field(default_factory=dict)

    @property
    def drifted_features(self) -> list[str]:
        return [d.column for d in self.drift if d.drifted and d.column != PREDICTION]

    @property
    def prediction_drifted(self) -> bool:
        return any(d.drifted for d in self.drift if d.column == PREDICTION)

    @property
    def realised_decay(self) -> bool:
        return bool(self.realised and self.realised["verdict"]["decayed"])

    @property
    def estimated_decay(self) -> bool:
        return bool(self.estimated and self.estimated["verdict"]["decayed"])

    @property
    def retrain_outcome(self) -> str | None:
        """For a version a retrain made to replace another: whether the decay it was made for is
        gone on its own labelled traffic (None for other versions or without enough labels)."""
        made_for = (self.reference or {}).get("made_for") or {}
        verdict = (self.realised or {}).get("verdict") or {}
        if not made_for or not verdict.get("judged"):
            return None
        state = "decay persists" if verdict["decayed"] else "decay gone"
        return f"v{self.model_version}/{self.variant} ({made_for['option']}, made to replace v{made_for['incumbent']}): {state} — {verdict['reason']}"

    def alarms(self) -> list[Alarm]:
        def alarm(kind: AlarmKind, detail: str, column: str | None = None) -> Alarm:
            return Alarm(self.model_version, self.variant, kind, detail, column)

        found = [
            alarm("feature drift", "; ".join(d.reasons), d.column)
            for d in self.drift
            if d.drifted and d.column != PREDICTION
        ]
        if self.prediction_drifted:
            found.append(
                alarm("prediction drift", "; ".join(next(d for d in self.drift if d.column == PREDICTION).reasons))
            )
        if self.realised_decay and self.realised:
            found.append(alarm("realised decay", self.realised["verdict"]["reason"]))
        if self.estimated_decay and self.estimated:
            found.append(alarm("estimated decay", self.estimated["verdict"]["reason"]))
        return found

    def to_dict(self) -> dict:
        return {
            "model_version": self.model_version,
            "variant": self.variant,
            "rows": self.rows,
            "rejected": self.rejected,
            "reference": self.reference,
            "drift": [d.to_dict() for d in self.drift],
            "drifted_features": self.drifted_features,
            "prediction_drifted": self.prediction_drifted,
            "realised": self.realised,
            "estimated": self.estimated,
            "retrain_outcome": self.retrain_outcome,
            "alarms": alarm_texts(self.alarms()),
        }


@dataclass
class WindowReport:
    window: str
    slices: list[SliceReport]
    generated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def alarms(self) -> list[Alarm]:
        return [alarm for s in self.slices for alarm in s.alarms()]

    @property
    def retrain_outcomes(self) -> list[str]:
        return [outcome for s in self.slices if (outcome := s.retrain_outcome)]

    def to_dict(self) -> dict:
        start, end = window_bounds(self.window)
        return {
            "schema_version": 1,
            "window": self.window,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "generated_at": self.generated_at,
            "slices": [s.to_dict() for s in self.slices],
            "alarms": alarm_texts(self.alarms),
            "alarm_records": [a.to_dict() for a in self.alarms],
            "retrain_outcomes": self.retrain_outcomes,
        }


def build_report(
    store: ObjectStore,
    window: str,
    settings: MonitorSettings,
    reference_for: Callable[[str], Reference | None],
    join_labels: FeedbackJoiner | None = None,
    *,
    plots: bool = True,
) -> WindowReport:
    """Drift (profiles vs the version's reference), realised decay (feedback-joined errors)
    and estimated decay (DLE on the window's rows) for every version and variant."""
    slices = window_slices(store, window)
    rows = window_rows(store, window) if any(s.rows for s in slices) else pl.DataFrame()
    joined = join_labels(rows) if join_labels is not None and rows.height else pl.DataFrame()
    reports = []
    for part in slices:
        reference = reference_for(part.model_version)
        report = SliceReport(
            part.model_version, part.variant, part.rows, part.rejected, reference.summary() if reference else None
        )
        if reference is not None and part.profile is not None:
            report.drift = profile_drift(reference.profile, part.profile, list(MONITORED_COLUMNS), settings.drift)
            mine = _slice_rows(rows, part)
            baseline = reference.metrics["rmse"]
            estimate = (
                reference.estimator.estimate_rmse(mine, mine[PREDICTION].to_numpy()) if mine.height else float("nan")
            )
            report.estimated = {
                "rmse": estimate,
                "rows": mine.height,
                "baseline_rmse": baseline,
                "verdict": judge_estimated(
                    estimate, baseline, mine.height, settings.min_labels, settings.decay_tolerance
                ).to_dict(),
            }
            labelled = _slice_rows(joined, part)
            stats = error_stats(labelled["error"].to_numpy()) if labelled.height else None
            report.realised = {
                **(stats.to_dict() if stats else {"labels": 0}),
                "baseline_rmse": baseline,
                "baseline_mae": reference.metrics["mae"],
                "verdict": judge_realised(stats, baseline, settings.min_labels, settings.decay_tolerance).to_dict(),
            }
            if plots:
                report.plots = {c: distribution_png(reference.profile, part.profile, c) for c in MONITORED_COLUMNS}
        reports.append(report)
    return WindowReport(window, reports)


def _slice_rows(rows: pl.DataFrame, part: WindowSlice) -> pl.DataFrame:
    if rows.height == 0:
        return rows
    return rows.filter((pl.col("model_version") == part.model_version) & (pl.col("variant") == part.variant))


def distribution_png(reference: DatasetProfileView, window: DatasetProfileView, column: str) -> bytes:
    """Reference vs window for one column: CDFs for continuous columns, shares for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.2, 2.6), dpi=80)
    ref_col, win_col = reference.get_column(column), window.get_column(column)
    if ref_col is not None and win_col is not None:
        if ref_col.get_metric("types").fractional.value > 0:
            for label, col in (("reference", ref_col), ("window", win_col)):
                sketch = col.get_metric("distribution").kll.value
                grid = np.linspace(0.005, 0.995, 100)
                axes.plot(sketch.get_quantiles(grid.tolist()), grid, label=label)
            axes.set(ylabel="CDF")
        else:
            shares = {}
            for label, col in (("reference", ref_col), ("window", win_col)):
                items = col.get_metric("frequent_items").to_summary_dict()["frequent_strings"]
                total = sum(i.est for i in items) or 1
                shares[label] = {i.value: i.est / total for i in items}
            levels = sorted(
                set(shares["reference"]) | set(shares["window"]),
                key=lambda v: (not v.lstrip("-").isdigit(), float(v) if v.lstrip("-").isdigit() else 0, v),
            )
            x = np.arange(len(levels))
            axes.bar(x - 0.2, [shares["reference"].get(v, 0) for v in levels], 0.4, label="reference")
            axes.bar(x + 0.2, [shares["window"].get(v, 0) for v in levels], 0.4, label="window")
            axes.set_xticks(x, levels, fontsize=7)
            axes.set(ylabel="share")
    axes.set_title(column, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def summary_markdown(report: WindowReport) -> str:
    """One row per version/variant and column: effect sizes, bars, verdicts (Dagster metadata)."""
    lines = [
        "| version | variant | column | KS | PSI | Hellinger | KS bar | drift |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for part in report.slices:
        for d in part.drift:
            lines.append(
                f"| {part.model_version} | {part.variant} | {d.column} | {d.ks:.3f} | {d.psi:.3f} | {d.hellinger:.3f} | {d.ks_bar:.3f} | {'**yes**' if d.drifted else 'no'} |"
            )
    lines.append("")
    lines.append("| version | variant | rows | rejected | live RMSE (labels) | estimated RMSE | test RMSE |")
    lines.append("|---|---|---|---|---|---|---|")
    for part in report.slices:
        realised = part.realised or {}
        live = f"{realised['rmse']:,.0f} ({realised['labels']})" if realised.get("labels") else "no labels"
        estimate = f"{part.estimated['rmse']:,.0f}" if part.estimated and np.isfinite(part.estimated["rmse"]) else "n/a"
        test = f"{part.reference['metrics']['rmse']:,.0f}" if part.reference else "no reference"
        lines.append(
            f"| {part.model_version} | {part.variant} | {part.rows} | {sum(part.rejected.values())} | {live} | {estimate} | {test} |"
        )
    if report.retrain_outcomes:
        lines += ["", "Retrained versions:", *(f"- {outcome}" for outcome in report.retrain_outcomes)]
    return "\n".join(lines)


def render_html(report: WindowReport) -> str:
    """A self-contained page: alarms, the summary tables and every plot inline."""
    data = report.to_dict()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>bridge drift report {html.escape(report.window)}</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            ".alarm{color:#b00}img{margin:4px}</style></head><body>"
        ),
        f"<h1>Window {html.escape(data['start'])} – {html.escape(data['end'])}</h1>",
        f"<p>generated {html.escape(report.generated_at)}</p>",
        "<h2>Alarms</h2>",
        "<ul>" + "".join(f"<li class='alarm'>{html.escape(a.text)}</li>" for a in report.alarms) + "</ul>"
        if report.alarms
        else "<p>none</p>",
    ]
    for part in report.slices:
        parts.append(f"<h2>Model version {html.escape(part.model_version)} — {html.escape(part.variant)}</h2>")
        parts.append(f"<p>{part.rows} predictions; rejected: {html.escape(json.dumps(part.rejected))}</p>")
        if part.reference is None:
            parts.append("<p>No reference profile for this version yet.</p>")
            continue
        parts.append(
            "<table><tr><th>column</th><th>KS</th><th>PSI</th><th>Hellinger</th><th>KS bar</th><th>drift</th></tr>"
        )
        for d in part.drift:
            parts.append(
                f"<tr><td>{d.column}</td><td>{d.ks:.3f}</td><td>{d.psi:.3f}</td><td>{d.hellinger:.3f}</td><td>{d.ks_bar:.3f}</td>"
                f"<td class='{'alarm' if d.drifted else ''}'>{'yes' if d.drifted else 'no'}</td></tr>"
            )
        parts.append("</table>")
        for label, block in (
            ("Realised error (feedback)", part.realised),
            ("Estimated error (no labels)", part.estimated),
        ):
            if block:
                parts.append(f"<h3>{label}</h3><pre>{html.escape(json.dumps(block, indent=2, default=str))}</pre>")
        for column, png in part.plots.items():
            parts.append(f"<img alt='{column}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store: ObjectStore, report: WindowReport) -> dict[str, str]:
    """Plots first, then the JSON and the HTML: keys of what was written."""
    prefix = report_prefix(report.window)
    keys: dict[str, str] = {}
    for part in report.slices:
        for column, png in part.plots.items():
            key = f"{prefix}plots/{part.model_version}--{part.variant}--{column}.png"
            store.put_bytes(key, png)
    keys["json"] = f"{prefix}report.json"
    store.put_text(keys["json"], json.dumps(report.to_dict(), indent=2, default=str))
    keys["html"] = f"{prefix}report.html"
    store.put_text(keys["html"], render_html(report))
    return keys
