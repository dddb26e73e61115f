"""Deployment follows the registry: what to do on each look at the service, and what to
remember until the next look. Framework-free; `registry_sensor` turns the decision into
Dagster's run requests, check results and alerts.

The service's own answer (its `/model`) is the truth compared with the registry's wanted
versions, never the last deployment bridge made: a crash, a hand deploy or a stopped app shows
up as a difference. A service that does not answer is reported, not redeployed behind
people's backs; one that answers with other versions is brought in line, once per registry
state and service answer until the retry period has passed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

Versions = dict[str, str]  # variant ("production", "staging", "previous") -> version
ServiceStatus = Literal["serving", "empty", "down", "unreadable"]


@dataclass(frozen=True)
class FollowState:
    """What the follower remembers between looks (the sensor's cursor, as JSON)."""

    wanted: Versions | None = None  # the registry's versions at the last look
    served: Versions | None = None  # what the service said it served then
    status: ServiceStatus | None = None
    in_line: Versions | None = None  # the last registry state the service was seen serving
    requested_at: float | None = None  # when a deployment was last requested
    refused: str | None = None  # a Production version already reported as not deployable

    def to_json(self) -> str:
        return json.dumps({name: value for name, value in asdict(self).items() if value is not None})

    @classmethod
    def from_json(cls, text: str | None) -> FollowState:
        return cls(**json.loads(text)) if text else cls()


# "none": nothing to do and nothing new to remember; "in_line": nothing to do, the look remembered
Action = Literal["none", "in_line", "report_in_line", "report_refused", "report_unreachable", "deploy"]


@dataclass(frozen=True)
class FollowDecision:
    """One look's outcome: what to do, why (for people), whether a service that was in line
    drifted away from it (an alert), and what to remember."""

    action: Action
    reason: str
    state: FollowState
    drifted: bool = False


def refused(state: FollowState, version: str, reason: str) -> FollowDecision:
    """Production points at a version that may not be deployed: reported once per version."""
    if state.refused == version:
        return FollowDecision("none", f"refused to deploy v{version} (reported)", state)
    return FollowDecision("report_refused", reason, replace(state, refused=version))


def follow(
    state: FollowState,
    wanted: Versions,
    status: ServiceStatus,
    served: Versions,
    problem: str,
    deployment_in_flight: bool,
    now: float,
    retry_seconds: float,
) -> FollowDecision:
    """Compare the service's answer (`status`, `served`) with the registry's `wanted`."""
    seen = FollowState(wanted=wanted, served=served, status=status, in_line=state.in_line)  # a refusal is forgotten
    if status == "serving" and served == wanted:
        settled = replace(seen, in_line=wanted)
        if state.status in (None, "serving") and state.served == wanted:
            return FollowDecision("in_line", f"the service serves what the registry says: {wanted}", settled)
        return FollowDecision("report_in_line", f"the service serves {wanted}", settled)
    if status in ("down", "unreadable"):
        if state.status == status and state.wanted == wanted:
            return FollowDecision("none", f"still {status} (reported): {problem}", state)
        return FollowDecision(
            "report_unreachable", f"the service does not serve the registry's {wanted}: {problem}", seen
        )
    if deployment_in_flight:
        return FollowDecision(
            "none", f"a production_deployment run is under way (serving {served or 'nothing'}, wanted {wanted})", state
        )
    if state.wanted == wanted and state.served == served and state.requested_at is not None:
        waited = now - state.requested_at
        if waited < retry_seconds:
            return FollowDecision(
                "none", f"deployment of {wanted} requested {waited:.0f} s ago; serving {served or 'nothing'}", state
            )
    drifted = state.in_line == wanted  # it served this registry state and no longer does: not a registry move
    reason = (
        f"serves {served or 'nothing'} where the registry says {wanted}: redeploying"
        if drifted
        else f"deploying {wanted} (serving {served or 'nothing'})"
    )
    return FollowDecision("deploy", reason, replace(seen, requested_at=now), drifted=drifted)
