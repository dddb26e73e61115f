"""Simulated clients for the prediction service (`bridge traffic`): the A/B experiment's load.

Houses come from the simulator (with its drift knobs); each is sent once to `/predict` by one
of `clients` simulated clients (`X-Client-ID`, so the router's assignment is sticky per
client) with `X-Request-ID` = its `row_id`. The true prices are withheld in the lake *before*
anything is sent, to be released later as delayed ground truth (`bridge release-feedback`);
when the run is over, the prices of requests the service did not answer are dropped again.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl
import requests

from bridge_assets.core.contract import FEATURES, ROW_ID, TARGET
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.lake.feedback import keep_answered_feedback, withhold_feedback
from bridge_assets.lake.storage import ObjectStore


@dataclass
class TrafficResult:
    """What was sent and how the service answered."""

    traffic_id: str
    withheld_key: str
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # transport errors, first few
    labels_withheld: int = 0  # true prices kept for answered requests (to release later)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)


def client_ids(rows: int, clients: int, seed: int) -> list[str]:
    """Which simulated client sends each row (uniformly at random, reproducible)."""
    picks = np.random.default_rng([seed, 7]).integers(0, clients, rows)
    return [f"client-{i:05d}" for i in picks]


def post_json(url: str, body: dict, headers: Mapping[str, str], timeout: float = 30.0) -> tuple[int, dict | None]:
    """POST `body` as JSON as a client does; the status and the JSON reply (a refusal's too;
    None if the reply is not JSON). A connection that fails raises (an OSError)."""
    reply = requests.post(url, json=body, headers=dict(headers), timeout=timeout)
    try:
        return reply.status_code, reply.json()
    except ValueError:
        return reply.status_code, None


def send_traffic(
    store: ObjectStore,
    url: str,
    *,
    rate: float,
    duration: float,
    clients: int = 200,
    seed: int = 0,
    drift: Drift | None = None,
    traffic_id: str | None = None,
    concurrency: int = 8,
    on_reply: Callable[[int], None] | None = None,
    api_key: str | None = None,
) -> TrafficResult:
    """Send `rate` houses a second for `duration` seconds (open loop: each request has its
    due time) from `clients` clients, with `api_key` if given; the prices of the answered
    requests stay withheld under the traffic id."""
    if rate <= 0 or duration <= 0 or clients < 1:
        raise ValueError("rate and duration must be > 0 and clients ≥ 1")
    traffic_id = traffic_id or f"traffic-{datetime.now(UTC):%Y%m%dT%H%M%S}-s{seed}"
    count = max(1, math.ceil(rate * duration))
    houses = pl.concat(Simulator.fit().generate(count, seed=seed, batch_id=traffic_id, drift=drift))
    result = TrafficResult(
        traffic_id, withhold_feedback(store, traffic_id, houses[ROW_ID].to_list(), houses[TARGET].to_list())
    )
    senders = client_ids(count, clients, seed)
    bodies = houses.select(FEATURES).with_columns(pl.col(pl.Enum, pl.Categorical).cast(pl.String)).to_dicts()
    lock = threading.Lock()
    answered: set[str] = set()
    started = time.monotonic()

    def send(index: int) -> None:
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        headers = {"X-Client-ID": senders[index], "X-Request-ID": houses[ROW_ID][index]} | (
            {"X-API-Key": api_key} if api_key else {}
        )
        try:
            status, reply = post_json(f"{url.rstrip('/')}/predict", bodies[index], headers)
        except OSError as error:
            status, reply = 0, None
            with lock:
                if len(result.failures) < 5:
                    result.failures.append(f"{type(error).__name__}: {error}")
        with lock:
            result.sent += 1
            result.statuses[status] += 1
            if status == 200:
                answered.add(headers["X-Request-ID"])
            if reply and isinstance(reply.get("response"), dict):
                result.variants[reply["response"].get("variant", "unknown")] += 1
        if on_reply:
            on_reply(1)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(send, range(count)))
    result.labels_withheld = keep_answered_feedback(store, traffic_id, answered)
    return result
