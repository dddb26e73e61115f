"""The post-deploy guardrail: a new Production version's live health against its predecessor's.

Gates judge a version on held-out rows before it serves; some faults only show under real
traffic (inputs the probes never sent, a heavier network, a replica that cannot keep up). For
a watch period after a version takes traffic, its server-error rate and latency in the
interaction records are compared with the previous version's over the same length of time
just before the switch; a breach is grounds for an automatic rollback.

Pure functions over the records frame (`serving.interactions.SCHEMA`): no Dagster, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

from bridge_assets.ml.gates import PromotionSettings


@dataclass(frozen=True)
class TrafficHealth:
    """One version's requests in a span of time: server errors and successful latency."""

    version: str
    requests: int  # requests that reached the model: successes and server errors (not 4xx)
    server_errors: int
    p95_ms: float | None  # of successful requests

    @property
    def error_rate(self) -> float:
        return self.server_errors / self.requests if self.requests else 0.0

    def describe(self) -> str:
        latency = f"p95 {self.p95_ms:.0f} ms" if self.p95_ms is not None else "no successful request"
        return f"v{self.version}: {self.requests} requests, {self.error_rate:.1%} server errors, {latency}"


def traffic_health(records: pl.DataFrame, version: str, start: datetime, end: datetime) -> TrafficHealth:
    """`version`'s health over [start, end): one count per request (rows of a batch request
    share its outcome), client errors (4xx) left out: they say nothing about the model."""
    requests = records.filter(
        (pl.col("model_version") == version)
        & (pl.col("row_index") == 0)
        & pl.col("timestamp").is_between(start, end, closed="left")
        & ((pl.col("status") < 400) | (pl.col("status") >= 500))
    )
    ok = requests.filter(pl.col("status") < 400)["latency_ms"].drop_nulls()
    return TrafficHealth(
        version=version,
        requests=requests.height,
        server_errors=requests.filter(pl.col("status") >= 500).height,
        p95_ms=float(ok.quantile(0.95, interpolation="higher")) if ok.len() else None,
    )


@dataclass(frozen=True)
class GuardrailVerdict:
    """`breach` is grounds for a rollback; `decided` is False while the new version has too
    few requests to judge."""

    breach: bool
    decided: bool
    reason: str


def judge(new: TrafficHealth, previous: TrafficHealth, settings: PromotionSettings) -> GuardrailVerdict:
    """Compare a new version's live health with its predecessor's (`guardrail_*` settings)."""
    observed = f"{new.describe()}; before the switch {previous.describe()}"
    if new.requests < settings.guardrail_min_requests:
        return GuardrailVerdict(False, False, f"too few requests yet (need {settings.guardrail_min_requests}): {observed}")
    # Without enough traffic before the switch there is no baseline: errors are judged against
    # none, latency not at all.
    baseline = previous.requests >= settings.guardrail_min_requests
    allowed_errors = (previous.error_rate if baseline else 0.0) + settings.guardrail_error_margin
    breaches = []
    if new.error_rate > allowed_errors:
        breaches.append(f"server-error rate {new.error_rate:.1%} > {allowed_errors:.1%} allowed")
    if baseline and new.p95_ms is not None and previous.p95_ms is not None:
        limit = previous.p95_ms * settings.guardrail_latency_factor + settings.guardrail_latency_slack_ms
        if new.p95_ms > limit:
            breaches.append(
                f"p95 latency {new.p95_ms:.0f} ms > {previous.p95_ms:.0f} ms × {settings.guardrail_latency_factor:g} + {settings.guardrail_latency_slack_ms:g} ms"
            )
    if breaches:
        return GuardrailVerdict(True, True, f"post-deploy guardrail: {'; '.join(breaches)} ({observed})")
    return GuardrailVerdict(False, True, f"healthy: {observed}")
