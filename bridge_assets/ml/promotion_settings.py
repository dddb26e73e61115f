"""What promotion may do, and how strictly: gate tolerances and budgets, the A/B test, the
post-deploy guardrail and sign-offs, read from the environment in one place
(`PromotionSettings.from_env`); the gates, the experiment, the guardrail and the Dagster
resources take the object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from bridge_assets.core.contract import AREA_MAX


def _policy(value: str) -> str:
    if value not in ("manual", "automatic"):
        raise ValueError(f"BRIDGE_PROMOTION_POLICY must be manual or automatic, not {value!r}")
    return value


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class PromotionSettings:
    """Every tolerance, budget and approval rule of promotion (README: configuration)."""

    baseline_tolerance: float = 0.005
    champion_tolerance: float = 0.005
    champion_recent_min_rows: int = 200  # test rows of batches Production never saw, to judge on them alone
    slice_tolerance: float = 0.10
    slice_min_rows: int = 30
    latency_p99_ms: float = 250.0
    latency_calls: int = 100
    probe_max_area: float = AREA_MAX  # the contract's bound: every area the API accepts must predict finite
    require_approval: bool = False
    approvers: tuple[str, ...] = ()
    ab_min_effect: float = 0.05
    ab_alpha: float = 0.05
    ab_power: float = 0.8
    ab_staging_weight: float = 0.5  # share of clients the Staging version serves while both exist
    ab_salt: str = "bridge"
    promotion_policy: str = "manual"  # on an A/B verdict: "manual" reports it, "automatic" acts on it
    guardrail_seconds: float = 1800.0  # how long a new Production version is watched (0: never)
    guardrail_canary_share: float = 0.1  # share of clients the previous version keeps while it is watched
    guardrail_min_requests: int = 50  # on each side before live health is compared
    guardrail_error_margin: float = 0.02  # a rise in server-error rate below this is no breach (absolute) ...
    guardrail_latency_factor: float = 1.5  # p95 model time may be this times the previous version's ...
    guardrail_latency_slack_ms: float = 1.0  # ... plus this, so a fraction of a millisecond of jitter is no breach
    guardrail_alpha: float = 0.01  # ... and a breach must also be beyond chance at this level

    def __post_init__(self) -> None:
        if self.guardrail_seconds > 0 and not 0 < self.guardrail_canary_share <= 0.5:
            raise ValueError(
                f"BRIDGE_GUARDRAIL_CANARY_SHARE must be in (0, 0.5], not {self.guardrail_canary_share}: the watch compares the "
                "new version with the previous one over the same seconds (BRIDGE_GUARDRAIL_SECONDS=0 turns the guardrail off)"
            )
        if self.ab_staging_weight + self.guardrail_canary_share > 1:
            raise ValueError("BRIDGE_AB_STAGING_WEIGHT + BRIDGE_GUARDRAIL_CANARY_SHARE must not exceed 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> PromotionSettings:
        def number(name: str, default: float) -> float:
            return float(env.get(name) or default)

        defaults = cls()
        return cls(
            baseline_tolerance=number("BRIDGE_GATE_BASELINE_TOLERANCE", defaults.baseline_tolerance),
            champion_tolerance=number("BRIDGE_GATE_CHAMPION_TOLERANCE", defaults.champion_tolerance),
            champion_recent_min_rows=int(
                number("BRIDGE_GATE_CHAMPION_RECENT_MIN_ROWS", defaults.champion_recent_min_rows)
            ),
            slice_tolerance=number("BRIDGE_GATE_SLICE_TOLERANCE", defaults.slice_tolerance),
            slice_min_rows=int(number("BRIDGE_GATE_SLICE_MIN_ROWS", defaults.slice_min_rows)),
            latency_p99_ms=number("BRIDGE_GATE_LATENCY_P99_MS", defaults.latency_p99_ms),
            latency_calls=int(number("BRIDGE_GATE_LATENCY_CALLS", defaults.latency_calls)),
            probe_max_area=number("BRIDGE_GATE_PROBE_MAX_AREA", defaults.probe_max_area),
            require_approval=_flag(env.get("BRIDGE_REQUIRE_APPROVAL")),
            approvers=tuple(name.strip() for name in (env.get("BRIDGE_APPROVERS") or "").split(",") if name.strip()),
            ab_min_effect=number("BRIDGE_AB_MIN_EFFECT", defaults.ab_min_effect),
            ab_alpha=number("BRIDGE_AB_ALPHA", defaults.ab_alpha),
            ab_power=number("BRIDGE_AB_POWER", defaults.ab_power),
            ab_staging_weight=number("BRIDGE_AB_STAGING_WEIGHT", defaults.ab_staging_weight),
            ab_salt=env.get("BRIDGE_AB_SALT") or defaults.ab_salt,
            promotion_policy=_policy(env.get("BRIDGE_PROMOTION_POLICY") or defaults.promotion_policy),
            guardrail_seconds=number("BRIDGE_GUARDRAIL_SECONDS", defaults.guardrail_seconds),
            guardrail_canary_share=number("BRIDGE_GUARDRAIL_CANARY_SHARE", defaults.guardrail_canary_share),
            guardrail_min_requests=int(number("BRIDGE_GUARDRAIL_MIN_REQUESTS", defaults.guardrail_min_requests)),
            guardrail_error_margin=number("BRIDGE_GUARDRAIL_ERROR_MARGIN", defaults.guardrail_error_margin),
            guardrail_latency_factor=number("BRIDGE_GUARDRAIL_LATENCY_FACTOR", defaults.guardrail_latency_factor),
            guardrail_latency_slack_ms=number("BRIDGE_GUARDRAIL_LATENCY_SLACK_MS", defaults.guardrail_latency_slack_ms),
            guardrail_alpha=number("BRIDGE_GUARDRAIL_ALPHA", defaults.guardrail_alpha),
        )
