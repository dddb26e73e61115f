"""Alerts: one typed JSON payload per loop event, POSTed to `BRIDGE_ALERT_WEBHOOK`.

Every event a person may have to act on — drift or decay found, gates that failed, a rollback,
an alias moved outside bridge, an A/B verdict, an asset overdue by its freshness policy, a
service that does not serve what the registry says or does not answer — is one `LoopEvent`
with a stable `kind`, so a receiver routes on a field instead of parsing sentences. Delivery is
retried a few times with a short backoff and never raises: the loop goes on when the receiver
is down (the failure is logged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import requests

from bridge_assets.retrying import retried

log = logging.getLogger("bridge.alerts")

EventKind = Literal[
    "drift",
    "decay",
    "gates_failed",
    "rollback",
    "out_of_band_move",
    "ab_verdict",
    "freshness_failed",
    "deployment_mismatch",
    "service_down",
]
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LoopEvent:
    """What happened, to which model version, and the figures behind it (`details`)."""

    kind: EventKind
    summary: str
    model_name: str | None = None
    version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), default=str, sort_keys=True).encode()


def send_alert(
    url: str | None, event: LoopEvent, attempts: int = 3, timeout: float = 3.0, backoff: float = 0.5
) -> bool:
    """POST `event` to `url` (no URL: nothing to do); True when a 2xx came back."""
    if not url:
        return False

    def deliver() -> None:
        response = requests.post(
            url, data=event.to_json(), headers={"Content-Type": "application/json"}, timeout=timeout
        )
        if not 200 <= response.status_code < 300:
            raise NotDelivered(f"HTTP {response.status_code}")

    try:
        retried(deliver, attempts, retry_on=(NotDelivered, requests.RequestException), backoff=backoff)
    except (NotDelivered, requests.RequestException) as problem:  # refused, timed out, not 2xx
        log.warning(
            "alert %s not delivered to %s after %d attempts: %s", event.kind, url.split("?")[0], attempts, problem
        )
        return False
    return True


class NotDelivered(Exception):
    """The webhook answered, but not with a 2xx."""
