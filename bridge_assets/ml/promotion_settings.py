"""What promotion may do, and how strictly: gate tolerances and budgets, the A/B test, the
post-deploy guardrail and sign-offs, declared once, read from the environment by
`PromotionSettings.from_env`; the gates, the experiment, the guardrail and the Dagster
resources take the object."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from bridge_assets.settings import EnvSettings, comma_separated

Share = Annotated[float, Field(ge=0, le=1)]
Probability = Annotated[float, Field(gt=0, lt=1)]


class PromotionSettings(EnvSettings):
    """Every tolerance, budget and approval rule of promotion (README: configuration)."""

    baseline_tolerance: NonNegativeFloat = Field(
        0.005,
        validation_alias="BRIDGE_GATE_BASELINE_TOLERANCE",
        description="how much worse than the better linear baseline a candidate may be",
    )
    champion_tolerance: NonNegativeFloat = Field(
        0.005,
        validation_alias="BRIDGE_GATE_CHAMPION_TOLERANCE",
        description="how much worse than Production on the same rows",
    )
    champion_recent_min_rows: PositiveInt = Field(
        200,
        validation_alias="BRIDGE_GATE_CHAMPION_RECENT_MIN_ROWS",
        description="test rows of batches Production never saw, to judge on them alone",
    )
    slice_tolerance: NonNegativeFloat = Field(
        0.10, validation_alias="BRIDGE_GATE_SLICE_TOLERANCE", description="per-slice error vs Production"
    )
    slice_min_rows: PositiveInt = Field(
        30, validation_alias="BRIDGE_GATE_SLICE_MIN_ROWS", description="the rows a slice needs to be judged"
    )
    latency_p99_ms: PositiveFloat = Field(
        250.0, validation_alias="BRIDGE_GATE_LATENCY_P99_MS", description="single-row latency budget (p99)"
    )
    latency_calls: PositiveInt = Field(
        100, validation_alias="BRIDGE_GATE_LATENCY_CALLS", description="the calls that measure it"
    )
    require_approval: bool = Field(
        False, validation_alias="BRIDGE_REQUIRE_APPROVAL", description="human sign-off before Staging"
    )
    approvers: Annotated[tuple[str, ...], BeforeValidator(comma_separated)] = Field(
        (), validation_alias="BRIDGE_APPROVERS", description="who may give it (comma-separated)"
    )
    ab_min_effect: PositiveFloat = Field(
        0.05, validation_alias="BRIDGE_AB_MIN_EFFECT", description="the smallest MAE difference that matters"
    )
    ab_alpha: Probability = Field(0.05, validation_alias="BRIDGE_AB_ALPHA", description="the A/B test's level")
    ab_power: Probability = Field(0.8, validation_alias="BRIDGE_AB_POWER", description="the A/B test's power")
    ab_staging_weight: Share = Field(
        0.5,
        validation_alias="BRIDGE_AB_STAGING_WEIGHT",
        description="share of clients Staging serves during an A/B test",
    )
    ab_salt: str = Field("bridge", validation_alias="BRIDGE_AB_SALT", description="the assignment hash's salt")
    promotion_policy: Literal["manual", "automatic"] = Field(
        "manual",
        validation_alias="BRIDGE_PROMOTION_POLICY",
        description="what an A/B verdict leads to: reported (manual) or acted on (automatic)",
    )
    guardrail_seconds: NonNegativeFloat = Field(
        1800.0,
        validation_alias="BRIDGE_GUARDRAIL_SECONDS",
        description="how long a new Production version is watched (0: off)",
    )
    guardrail_canary_share: Share = Field(
        0.1,
        validation_alias="BRIDGE_GUARDRAIL_CANARY_SHARE",
        description="share of clients the previous version keeps while it is watched",
    )
    guardrail_min_requests: PositiveInt = Field(
        50,
        validation_alias="BRIDGE_GUARDRAIL_MIN_REQUESTS",
        description="requests on each side before live health is compared",
    )
    guardrail_error_margin: NonNegativeFloat = Field(
        0.02,
        validation_alias="BRIDGE_GUARDRAIL_ERROR_MARGIN",
        description="a rise in server-error rate below this is no breach (absolute)",
    )
    guardrail_latency_factor: PositiveFloat = Field(
        1.5,
        validation_alias="BRIDGE_GUARDRAIL_LATENCY_FACTOR",
        description="p95 model time may be this times the previous version's ...",
    )
    guardrail_latency_slack_ms: NonNegativeFloat = Field(
        1.0,
        validation_alias="BRIDGE_GUARDRAIL_LATENCY_SLACK_MS",
        description="... plus this, so jitter of a fraction of a millisecond is no breach",
    )
    guardrail_alpha: Probability = Field(
        0.01,
        validation_alias="BRIDGE_GUARDRAIL_ALPHA",
        description="... and a breach must also be beyond chance at this level",
    )

    @model_validator(mode="after")
    def _shares_fit(self) -> PromotionSettings:
        if self.guardrail_seconds > 0 and not 0 < self.guardrail_canary_share <= 0.5:
            raise ValueError(
                f"BRIDGE_GUARDRAIL_CANARY_SHARE must be in (0, 0.5], not {self.guardrail_canary_share}: the watch compares the "
                "new version with the previous one over the same seconds (BRIDGE_GUARDRAIL_SECONDS=0 turns the guardrail off)"
            )
        if self.ab_staging_weight + self.guardrail_canary_share > 1:
            raise ValueError("BRIDGE_AB_STAGING_WEIGHT + BRIDGE_GUARDRAIL_CANARY_SHARE must not exceed 1")
        return self
