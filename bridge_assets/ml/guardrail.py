"""The post-deploy guardrail: a new Production version judged live against its predecessor,
as a canary over the same seconds.

Gates judge a version on held-out rows before it serves; some faults only show under real
traffic (inputs the probes never sent, a heavier network). For a watch period after a version
becomes Production, the router keeps a share of clients on the previous version
(`BRIDGE_GUARDRAIL_CANARY_SHARE`), so both answer the same traffic on the same machine at the
same time; comparing them then measures the model, not the hour. A breach needs both a
practical size (the error margin; the latency factor and slack) and significance (a one-sided
Fisher exact test on server errors, a one-sided Mann-Whitney U test on model time), so a few
unlucky requests roll nothing back.

Latency is compared on `model_ms`, each request's own version's model time: waiting in queues
(shared by both versions, and long on a loaded machine) does not enter it, and a busy machine
slows both versions alike. Only single-row `/predict` requests count for it (a batch's model
time grows with its rows).

The watch reads the records incrementally: `WatchTally` keeps counts and a log-spaced
histogram of model times per version, so a tick reads only files it has not read.

Pure functions and data (no Dagster, no Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl
from scipy import stats

from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.registry import PRODUCTION, AuditRecord

# Histogram bins for model time: log-spaced from 10 µs to 100 s, 4% wide.
BIN_EDGES_MS = np.geomspace(0.01, 100_000.0, 401)
BIN_CENTRES_MS = np.sqrt(BIN_EDGES_MS[:-1] * BIN_EDGES_MS[1:])


@dataclass(frozen=True)
class Watch:
    """A new Production version under watch, and the previous one kept beside it as control."""

    version: str
    previous: str
    started: datetime  # when bridge moved the version to Production
    ends: datetime


def watch_of(
    history: list[AuditRecord], version: str | None, settings: PromotionSettings, now: datetime
) -> Watch | None:
    """The watch on `version` if one runs at `now`: it became Production by a bridge move (not a
    rollback, not a hand move) from a different version, less than `guardrail_seconds` ago."""
    if settings.guardrail_seconds <= 0 or version is None:
        return None
    moves = [r for r in history if r.to_stage == PRODUCTION and r.action != "out_of_band"]
    if not moves or moves[-1].version != version or moves[-1].action == "rollback":
        return None
    previous = moves[-1].evidence.get("previous_production")
    if not previous or previous == version:
        return None
    started = datetime.fromisoformat(moves[-1].at)
    ends = started + timedelta(seconds=settings.guardrail_seconds)
    return Watch(version, str(previous), started, ends) if now < ends else None


@dataclass
class VersionTally:
    """One version's requests during a watch: counts, and model times as a histogram."""

    requests: int = 0  # that reached the model: successes and server errors (client errors say nothing about it)
    server_errors: int = 0
    model_ms_bins: dict[int, int] = field(default_factory=dict)  # bin index -> single-row requests

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0

    @property
    def timed(self) -> int:
        return sum(self.model_ms_bins.values())

    def model_ms(self) -> np.ndarray:
        """The model times, each as its bin's centre (4% resolution)."""
        bins = sorted(self.model_ms_bins)
        return np.repeat(BIN_CENTRES_MS[bins], [self.model_ms_bins[b] for b in bins])

    def p95_ms(self) -> float | None:
        times = self.model_ms()
        return float(np.quantile(times, 0.95, method="higher")) if times.size else None

    def describe(self, version: str) -> str:
        p95 = self.p95_ms()
        latency = f"p95 model time {p95:.2f} ms" if p95 is not None else "no timed request"
        return f"v{version}: {self.requests} requests, {self.server_errors} server errors ({self.error_rate:.1%}), {latency}"


@dataclass
class WatchTally:
    """Both sides of a watch, and the record files already counted (the sensor's cursor)."""

    watch: str  # "<version>/<previous>@<started>": a new watch starts a new tally
    files: list[str] = field(default_factory=list)
    new: VersionTally = field(default_factory=VersionTally)
    previous: VersionTally = field(default_factory=VersionTally)

    @staticmethod
    def key(watch: Watch) -> str:
        return f"{watch.version}/{watch.previous}@{watch.started.isoformat()}"

    def add(self, records: pl.DataFrame, watch: Watch) -> None:
        """Count the records of both versions from the watch's start (one per request)."""
        for side, variant, version in (
            (self.new, "production", watch.version),
            (self.previous, "previous", watch.previous),
        ):
            mine = records.filter(
                (pl.col("variant") == variant)
                & (pl.col("model_version") == version)
                & (pl.col("row_index") == 0)
                & (pl.col("timestamp") >= watch.started)
                & ((pl.col("status") < 400) | (pl.col("status") >= 500))
            )
            side.requests += mine.height
            side.server_errors += mine.filter(pl.col("status") >= 500).height
            timed = (
                mine.filter((pl.col("status") < 400) & (pl.col("endpoint") == "/predict"))["model_ms"]
                .drop_nulls()
                .to_numpy()
            )
            bins = np.clip(np.searchsorted(BIN_EDGES_MS, timed, side="right") - 1, 0, len(BIN_CENTRES_MS) - 1)
            for index, count in zip(*np.unique(bins, return_counts=True), strict=True):
                side.model_ms_bins[int(index)] = side.model_ms_bins.get(int(index), 0) + int(count)

    def to_json(self) -> dict:
        side = lambda s: {
            "requests": s.requests,
            "server_errors": s.server_errors,
            "bins": {str(k): v for k, v in s.model_ms_bins.items()},
        }
        return {"watch": self.watch, "files": self.files, "new": side(self.new), "previous": side(self.previous)}

    @classmethod
    def from_json(cls, data: dict) -> WatchTally:
        side = lambda s: VersionTally(s["requests"], s["server_errors"], {int(k): v for k, v in s["bins"].items()})
        return cls(data["watch"], list(data["files"]), side(data["new"]), side(data["previous"]))


@dataclass(frozen=True)
class GuardrailVerdict:
    """`breach` is grounds for a rollback; `decided` is False while a side has too few requests."""

    breach: bool
    decided: bool
    reason: str


def judge(tally: WatchTally, watch: Watch, settings: PromotionSettings) -> GuardrailVerdict:
    """Compare the new version with the previous one over the same seconds (`guardrail_*`)."""
    new, previous = tally.new, tally.previous
    observed = f"{new.describe(watch.version)}; over the same seconds {previous.describe(watch.previous)}"
    fewest = min(new.requests, previous.requests)
    if fewest < settings.guardrail_min_requests:
        return GuardrailVerdict(
            False, False, f"too few requests yet (need {settings.guardrail_min_requests} on each side): {observed}"
        )
    breaches = []
    table = [
        [new.server_errors, new.requests - new.server_errors],
        [previous.server_errors, previous.requests - previous.server_errors],
    ]
    errors_p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    rise = new.error_rate - previous.error_rate
    if rise > settings.guardrail_error_margin and errors_p < settings.guardrail_alpha:
        breaches.append(
            f"server-error rate {new.error_rate:.1%} against {previous.error_rate:.1%} (+{rise:.1%} > {settings.guardrail_error_margin:.1%}, Fisher p={errors_p:.1g})"
        )
    if min(new.timed, previous.timed) >= settings.guardrail_min_requests:
        new_p95, previous_p95 = new.p95_ms(), previous.p95_ms()
        assert new_p95 is not None and previous_p95 is not None
        limit = previous_p95 * settings.guardrail_latency_factor + settings.guardrail_latency_slack_ms
        slower_p = float(stats.mannwhitneyu(new.model_ms(), previous.model_ms(), alternative="greater").pvalue)
        if new_p95 > limit and slower_p < settings.guardrail_alpha:
            breaches.append(
                f"p95 model time {new_p95:.2f} ms > {previous_p95:.2f} ms × {settings.guardrail_latency_factor:g} + "
                f"{settings.guardrail_latency_slack_ms:g} ms (Mann-Whitney p={slower_p:.1g})"
            )
    if breaches:
        return GuardrailVerdict(True, True, f"post-deploy guardrail: {'; '.join(breaches)} ({observed})")
    return GuardrailVerdict(False, True, f"healthy: {observed}")
