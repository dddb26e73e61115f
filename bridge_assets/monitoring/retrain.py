"""Retraining on what was seen (step 21): labelled traffic back into the lake, and the policy.

Labelled traffic (interaction rows joined to released labels) lands as an ordinary raw batch
(`landing/batches/feedback-<window>[-n]/`), so it passes the same contract and quarantine
as any batch and the next feature version contains it. A retrain then pins that version.

Policy (`BRIDGE_RETRAIN_POLICY`): `manual` alerts (failed check with the reason, optional
webhook) and leaves a ready retraining job to launch; `automatic` requests one training
round, the cheapest effective one first (`plan_retrain`: recalibration, then a full round).
Never a storm: at most one open retrain, and a cool-down between requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from bridge_assets.core.contract import FEATURES, ROW_ID, SEEN_AT, SEEN_AT_DTYPE, TARGET
from bridge_assets.lake.landing import LandedBatch, land_batch, landed_batches, read_batch
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.monitoring.alarms import Alarm, alarm_texts
from bridge_assets.monitoring.profiles import window_bounds
from bridge_assets.monitoring.settings import RetrainPolicy

FEEDBACK_BATCH_PREFIX = "feedback-"
_FEEDBACK_BATCH = re.compile(rf"^{FEEDBACK_BATCH_PREFIX}(\d{{8}}T\d{{6}}Z-\d+s)(?:-\d+)?$")


def feedback_rows(joined: pl.DataFrame) -> pl.DataFrame:
    """Batch rows from labelled traffic: a stable row id per served row, features, true price,
    and when the house was seen (the request's time: what recency-aware training weights by)."""
    row_index = pl.col("row_index").cast(pl.String) if "row_index" in joined.columns else pl.lit("0")
    seen = [pl.col("timestamp").cast(SEEN_AT_DTYPE).alias(SEEN_AT)] if "timestamp" in joined.columns else []
    return joined.select(
        (pl.lit("fb-") + pl.col("request_id").cast(pl.String) + pl.lit("-") + row_index).alias(ROW_ID),
        *(pl.col(c) for c in FEATURES),
        pl.col(TARGET).cast(pl.Float64),
        *seen,
    ).unique(ROW_ID, keep="first", maintain_order=True)


def _feedback_window(batch_id: str) -> str | None:
    """The monitoring window a feedback batch came from (`feedback-<window>[-n]`), if it is one."""
    match = _FEEDBACK_BATCH.match(batch_id)
    return match.group(1) if match else None


def _overlaps(window: str, other: str) -> bool:
    start, end = window_bounds(window)
    other_start, other_end = window_bounds(other)
    return start < other_end and other_start < end


def land_feedback_batch(store: ObjectStore, window: str, joined: pl.DataFrame) -> tuple[LandedBatch | None, int]:
    """Land the window's labelled rows not landed before as a new raw batch; (None, 0) if none.

    "Before" is any feedback batch of a window overlapping this one in time, whatever its
    length: after a change of `BRIDGE_MONITOR_WINDOW_SECONDS` (the demo's 2-minute windows, then
    `make dev`'s hour) the same requests fall into new windows and must not land again."""
    rows = feedback_rows(joined)
    base = f"{FEEDBACK_BATCH_PREFIX}{window}"
    batches = [(b, _feedback_window(b.batch_id)) for b in landed_batches(store)]
    overlapping = [b for b, other in batches if other is not None and _overlaps(window, other)]
    if overlapping:
        seen = pl.concat([read_batch(store, b).select(pl.col(ROW_ID).cast(pl.String)) for b in overlapping])
        rows = rows.join(seen, on=ROW_ID, how="anti")
    if rows.is_empty():
        return None, 0
    same_window = sum(1 for _, other in batches if other == window)
    batch_id = base if not same_window else f"{base}-{same_window + 1}"
    batch, count = land_batch(store, batch_id, [rows])
    return batch, count


@dataclass(frozen=True)
class RetrainDecision:
    action: str  # "request" (automatic), "alert" (manual) or "skip"
    reason: str


def decide_retrain(
    policy: RetrainPolicy,
    alarms: list[Alarm],
    *,
    open_retrains: int,
    seconds_since_last_request: float | None,
    cooldown_seconds: int,
) -> RetrainDecision:
    """What the loop does about a window's alarms, by policy, without storms."""
    if not alarms:
        return RetrainDecision("skip", "no alarms")
    reason = "; ".join(alarm_texts(alarms))
    if policy == "manual":
        return RetrainDecision("alert", reason)
    if open_retrains:
        return RetrainDecision("skip", f"a retrain is already open ({open_retrains}); not requesting another")
    if seconds_since_last_request is not None and seconds_since_last_request < cooldown_seconds:
        return RetrainDecision(
            "skip", f"cool-down: last retrain requested {seconds_since_last_request:.0f}s ago (< {cooldown_seconds}s)"
        )
    return RetrainDecision("request", reason)


@dataclass(frozen=True)
class RetrainAttempt:
    """The newest version an earlier round made to replace the current Production."""

    version: str
    option: str  # what that round chose: recalibrate, finetune or scratch
    gates_passed: bool | None  # None: its gates have not run yet
    served: bool
    decayed: bool  # its own realised decay in the window at hand


@dataclass(frozen=True)
class RetrainPlan:
    action: str  # "recalibrate", "full" or "skip"
    options: tuple[str, ...]
    reason: str


FULL_ROUND: tuple[str, ...] = ("recalibrate", "finetune", "scratch")


def plan_retrain(alarms: list[Alarm], attempt: RetrainAttempt | None) -> RetrainPlan:
    """The cheapest effective action for a window's alarms. Realised decay (labels exist) is met
    by recalibrating Production first — minutes, no network trained; only if that did not fix it
    (the recalibrated version was blocked by its gates, or decays itself) does a full round run,
    which compares all options again. Alarms without labels (drift, estimated decay) leave nothing
    to recalibrate on: a full round. A served replacement without decay of its own means the
    decay is handled: nothing to do."""
    if not any(alarm.kind == "realised decay" for alarm in alarms):
        return RetrainPlan("full", FULL_ROUND, "no labelled decay to recalibrate on")
    if attempt is None:
        return RetrainPlan(
            "recalibrate", ("recalibrate",), "labelled decay: recalibrating Production is the cheapest fix"
        )
    if attempt.gates_passed is None:
        return RetrainPlan("skip", (), f"v{attempt.version} ({attempt.option}) awaits its gates")
    if attempt.served and not attempt.decayed:
        return RetrainPlan(
            "skip", (), f"v{attempt.version} ({attempt.option}) is served and shows no realised decay of its own"
        )
    why = (
        "was blocked by its gates" if not attempt.gates_passed else "decays too" if attempt.decayed else "is not served"
    )
    return RetrainPlan("full", FULL_ROUND, f"v{attempt.version} ({attempt.option}) {why}: a full round")
