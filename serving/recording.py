"""One interaction record per request, and the request metrics, owned by one ASGI middleware.

`RecordRequests` wraps the whole app: it gives each request its id, client key and A/B variant
(an `Exchange` on the request's state, which handlers and guards fill in: rows, predictions,
error), and when the reply starts — whatever produced it: a handler, a guard, an exception
handler, or an exception nobody handled (a 500 it sends itself) — it writes the request's
records to the replica's spool, before the reply leaves. A request the client abandons is
recorded as 499. Requests that never reach the app (refused by the proxy, a dead connection)
are counted by the client, not here. GETs of `/health`, `/model` and the docs are not recorded.

Metrics (`ray.serve.metrics`, exported with Serve's on each node's Ray metrics port, tags
`model_version`, `variant`, `endpoint`): `bridge_requests_total` (plus `status`),
`bridge_request_errors_total` (status >= 500) and `bridge_request_latency_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from serving.guards import error_reply, service_of
from serving.interactions import InteractionLogger, record

log = logging.getLogger("bridge.serving")
UNRECORDED_GETS = frozenset({"/health", "/model", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
ENDPOINTS = frozenset({"/predict", "/predict/batch", "/invocations"})
LATENCY_BOUNDARIES_MS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]


@dataclass
class Exchange:
    """What is known about one request; the handlers add rows, predictions and errors."""

    request_id: str
    client_id: str | None
    variant: str
    model_version: str
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any] | None] = field(default_factory=lambda: [None])
    predictions: list[float] | None = None
    model_ms: float | None = None  # the version's own model time for this request's rows
    error: str | None = None


def exchange_of(request: Request | dict) -> Exchange:
    """The request's exchange (from a Request or an ASGI scope)."""
    state = request["state"] if isinstance(request, dict) else request.scope["state"]
    return state["exchange"]


class RequestMetrics:
    """Requests, server errors and latency per model version, variant and endpoint."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        tags = ("model_version", "variant", "endpoint")
        self.requests = Counter(
            "bridge_requests",
            description="Requests answered, by status.",
            tag_keys=(*tags, "status"),  # type: ignore[arg-type]  # Ray annotates tag_keys as a 1-tuple
        )
        self.errors = Counter(
            "bridge_request_errors",
            description="Requests answered with a 5xx.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self.latency = Histogram(
            "bridge_request_latency_ms",
            description="Time to the reply's start.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=tags,  # type: ignore[arg-type]
        )

    def observe(self, exchange: Exchange, endpoint: str, status: int, latency_ms: float) -> None:
        tags = {"model_version": exchange.model_version, "variant": exchange.variant, "endpoint": endpoint}
        self.requests.inc(tags={**tags, "status": str(status)})
        if status >= 500:
            self.errors.inc(tags=tags)
        self.latency.observe(latency_ms, tags=tags)


class Recorder:
    """Turns a finished exchange into records (spooled) and metrics, for one replica."""

    def __init__(
        self, logger: InteractionLogger, model_name: str, replica: str, metrics: RequestMetrics | None
    ) -> None:
        self.logger = logger
        self.model_name = model_name
        self.replica = replica
        self.metrics = metrics

    def write(self, exchange: Exchange, path: str, status: int) -> None:
        latency_ms = (time.perf_counter() - exchange.started) * 1000
        error = exchange.error if status >= 400 else None
        if status >= 400 and error is None:
            error = f"HTTP {status}"
        predictions = exchange.predictions if status < 400 else None
        self.logger.log(
            [
                record(
                    request_id=exchange.request_id,
                    row_index=index,
                    endpoint=path[:200],
                    status=status,
                    model_name=self.model_name,
                    model_version=exchange.model_version,
                    variant=exchange.variant,
                    latency_ms=latency_ms,
                    model_ms=exchange.model_ms if status < 400 else None,
                    features=row,
                    prediction=predictions[index] if predictions else None,
                    error=error,
                    client_id=exchange.client_id,
                    replica=self.replica,
                )
                for index, row in enumerate(exchange.rows)
            ]
        )
        if self.metrics is not None:
            self.metrics.observe(exchange, path if path in ENDPOINTS else "other", status, latency_ms)


class RecordRequests:
    """ASGI middleware: exactly one record (per row) for every request that reaches the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (service := service_of(scope)) is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        echo_id = not request_id  # Serve's proxy always sets one; outside Serve the app echoes its own
        if echo_id:
            request_id = uuid.uuid4().hex
            scope["headers"] = [*scope.get("headers", []), (b"x-request-id", request_id.encode())]
        client_id = headers.get(b"x-client-id", b"").decode("latin-1")[:200] or None
        variant = service.experiment.variant_for(client_id or request_id)
        exchange = Exchange(request_id, client_id, variant, service.versions[variant])
        scope.setdefault("state", {})["exchange"] = exchange
        recorded = not (scope["method"] in ("GET", "HEAD") and scope["path"] in UNRECORDED_GETS)
        started = False

        async def send_recorded(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                answered = [
                    (b"x-model-version", exchange.model_version.encode()),
                    (b"x-variant", exchange.variant.encode()),
                ]
                if echo_id:
                    answered.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": [*message.get("headers", []), *answered]}
                if recorded:
                    service.recorder.write(exchange, scope["path"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except asyncio.CancelledError:
            if not started and recorded:
                exchange.error = "client disconnected before the reply"
                service.recorder.write(exchange, scope["path"], 499)
            raise
        except Exception as error:
            log.exception("unhandled error on %s (request %s)", scope["path"], request_id)
            if started:
                raise
            exchange.error = f"internal error: {type(error).__name__}"
            await error_reply(scope["path"], 500, exchange.error)(scope, receive, send_recorded)
