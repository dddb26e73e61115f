"""What a request must pass before a handler sees it, and error replies in each endpoint's shape.

ASGI middleware, in order: an API key (when keys are configured) on every path but `/health`
and the docs — 401; a JSON content type on POSTs — 415; the body size, by header or as it
streams in — 413 naming both the body and the batch limit. `/invocations` answers errors in
MLflow's `{"error_code", "message"}` shape, every other endpoint in the reference's.

API keys come from the replica's environment (`BRIDGE_API_KEYS`, comma-separated, inherited
from the Ray node) or a file named by `BRIDGE_API_KEYS_FILE` (one key a line) — never from init
arguments, which Ray stores. Keys are compared in constant time and never logged or recorded.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

MLFLOW_ENDPOINT = "/invocations"
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
MLFLOW_ERROR_CODES = {
    401: "UNAUTHENTICATED", 413: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"
}  # fmt: skip


def service_of(scope: dict) -> Any:
    """The replica's service for an HTTP request (None for other scopes, or outside a replica).
    Serve ships the ingress class by value, so the service lives on the app's state."""
    return getattr(scope["app"].state, "service", None) if scope["type"] == "http" and "app" in scope else None


def error_reply(path: str, status: int, message: str, **extra: Any) -> JSONResponse:
    """An error in the endpoint's own shape: MLflow's for `/invocations`, the reference's else."""
    if path == MLFLOW_ENDPOINT:
        return JSONResponse({"error_code": MLFLOW_ERROR_CODES.get(status, "BAD_REQUEST"), "message": message}, status)
    return JSONResponse({"status": status, "message": message, **extra, "response": None}, status)


def too_large_message(max_body: int, max_records: int) -> str:
    return (
        f"request body larger than {max_body} bytes (BRIDGE_SERVE_MAX_BODY); "
        f"a batch holds at most {max_records} records (BRIDGE_SERVE_MAX_BATCH)"
    )


def too_many_message(count: int, max_body: int, max_records: int) -> str:
    return (
        f"records: at most {max_records} per request (BRIDGE_SERVE_MAX_BATCH), got {count}; "
        f"bodies up to {max_body} bytes (BRIDGE_SERVE_MAX_BODY)"
    )


def load_api_keys(env: Mapping[str, str] = os.environ, keys_file: str | None = None) -> tuple[bytes, ...]:
    """The accepted keys: `BRIDGE_API_KEYS` plus the lines of `keys_file`; none = keys are off."""
    keys = [k.strip() for k in env.get("BRIDGE_API_KEYS", "").split(",")]
    if keys_file:
        keys += [line.strip() for line in Path(keys_file).read_text().splitlines()]
    return tuple(k.encode() for k in keys if k)


def _presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    if key := headers.get(b"x-api-key"):
        return key.strip()
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def _key_error(headers: dict[bytes, bytes], keys: tuple[bytes, ...]) -> str | None:
    presented = _presented_key(headers)
    if presented is None:
        return "missing API key: send X-API-Key or Authorization: Bearer <key>"
    matches = [hmac.compare_digest(presented, key) for key in keys]  # every key, constant time
    return None if any(matches) else "wrong API key"


def _content_type_error(headers: dict[bytes, bytes]) -> str | None:
    declared = headers.get(b"content-type", b"").decode("latin-1")
    if declared.split(";")[0].strip().lower() == "application/json":
        return None
    return f"Content-Type must be application/json (got {declared!r})" if declared else "Content-Type must be application/json (none sent)"


class Guards:
    """ASGI middleware: 401, 415 and 413 before the handlers (the record middleware outside it
    records the refusal). Limits and keys come from the replica's service on the app's state."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (service := service_of(scope)) is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        max_body, max_records = service.settings.max_body_bytes, service.settings.max_batch_records
        path = scope["path"]
        refusal: tuple[int, str] | None = None
        if service.api_keys and path not in OPEN_PATHS and (problem := _key_error(headers, service.api_keys)):
            refusal = (401, problem)
        elif scope["method"] == "POST" and (problem := _content_type_error(headers)):
            refusal = (415, problem)
        elif (declared := headers.get(b"content-length")) is not None and (not declared.isdigit() or int(declared) > max_body):
            refusal = (413, too_large_message(max_body, max_records))
        if refusal is not None:
            scope["state"]["exchange"].error = refusal[1]
            return await error_reply(path, *refusal)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body:  # FastAPI passes HTTPExceptions raised while reading through
                raise HTTPException(status_code=413, detail=too_large_message(max_body, max_records))
            return message

        await self.app(scope, limited_receive, send)
