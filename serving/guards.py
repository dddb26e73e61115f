"""What a request must pass before a handler sees it, and error replies in each endpoint's shape.

ASGI middleware, in order: an API key (when keys are configured) on every path but `/health`
and the docs — 401; a JSON content type on POSTs to the prediction endpoints — 415 (a POST
elsewhere is the router's 404 or 405); the body size, by header or as it
streams in — 413 naming both the body and the batch limit. `/invocations` answers errors in
MLflow's `{"error_code", "message"}` shape, every other endpoint in the reference's.

API keys are set where the service is deployed (`BRIDGE_API_KEYS`, comma-separated, and/or a
file named by `BRIDGE_API_KEYS_FILE`, one key a line) and take effect on every deploy: the
replicas receive only salted HMAC-SHA256 digests (`ApiKeys`), since Ray stores init arguments.
Keys in the Ray node's own environment (inherited from `ray start`) are accepted too. Presented
keys are digested and compared in constant time; keys are never logged or recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, Field

from bridge_assets.settings import EnvSettings, comma_separated

MLFLOW_ENDPOINT = "/invocations"
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
BODY_PATHS = frozenset({"/predict", "/predict/batch", MLFLOW_ENDPOINT})  # the POST endpoints: JSON bodies
MLFLOW_ERROR_CODES = {
    401: "UNAUTHENTICATED",
    413: "REQUEST_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "TEMPORARILY_UNAVAILABLE",
}


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


class ApiKeySettings(EnvSettings):
    """The API keys the prediction endpoints accept; none = keys are off. Secrets: read where
    the service is deployed (and from a Ray node's environment), never stored or shown."""

    keys: Annotated[tuple[str, ...], BeforeValidator(comma_separated)] = Field(
        (), validation_alias="BRIDGE_API_KEYS", description="API keys (comma-separated)", repr=False
    )
    keys_file: Path | None = Field(
        None, validation_alias="BRIDGE_API_KEYS_FILE", description="a file of API keys, one a line"
    )

    def load(self) -> tuple[bytes, ...]:
        """The keys and the lines of the keys file. A named file that cannot be read is an
        error, never a silently open service."""
        keys = list(self.keys)
        if self.keys_file is not None:
            try:
                keys += [line.strip() for line in self.keys_file.read_text().splitlines()]
            except OSError as error:
                raise ValueError(
                    f"BRIDGE_API_KEYS_FILE={self.keys_file} cannot be read: {error.strerror or error}"
                ) from error
        return tuple(key.encode() for key in keys if key)


def load_api_keys(env: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """The keys `env` sets (`BRIDGE_API_KEYS`, `BRIDGE_API_KEYS_FILE`)."""
    return ApiKeySettings.from_env(env).load()


def _digest(salt: bytes, key: bytes) -> bytes:
    return hmac.new(salt, key, hashlib.sha256).digest()


@dataclass(frozen=True)
class ApiKeys:
    """Accepted keys as salted digests: what may travel in init arguments (Ray stores them).
    Empty means keys are off. `sources` says where the keys came from, for operators."""

    salt: str = ""
    digests: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @classmethod
    def of(cls, keys: Iterable[bytes], source: str, salt: str | None = None) -> ApiKeys:
        keys = tuple(keys)
        if not keys:
            return cls(salt=salt or "")
        salt = salt or secrets.token_hex(16)
        digests = tuple(sorted({_digest(bytes.fromhex(salt), key).hex() for key in keys}))
        return cls(salt, digests, (source,))

    def including(self, keys: Iterable[bytes], source: str) -> ApiKeys:
        """These keys and `keys` (under this salt), e.g. the node's own besides the deployed ones."""
        added = ApiKeys.of(keys, source, self.salt or None)
        if not added.digests:
            return self
        return ApiKeys(added.salt, tuple(sorted({*self.digests, *added.digests})), (*self.sources, source))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, presented: bytes) -> bool:
        """Constant time per key, and every key is compared (no early exit on a match)."""
        candidate = _digest(bytes.fromhex(self.salt), presented)
        matches = [hmac.compare_digest(candidate, bytes.fromhex(digest)) for digest in self.digests]
        return any(matches)

    def describe(self) -> str:
        """One line for operators: whether keys are enforced, how many, from where."""
        if not self:
            return "API keys: OFF (no BRIDGE_API_KEYS or BRIDGE_API_KEYS_FILE): every endpoint is open to whoever reaches it"
        return f"API keys: enforced ({len(self.digests)} key(s) from {' and '.join(self.sources)}); send X-API-Key or Authorization: Bearer"


def _presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    if key := headers.get(b"x-api-key"):
        return key.strip()
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def _key_error(headers: dict[bytes, bytes], keys: ApiKeys) -> str | None:
    presented = _presented_key(headers)
    if presented is None:
        return "missing API key: send X-API-Key or Authorization: Bearer <key>"
    return None if keys.accepts(presented) else "wrong API key"


def _content_type_error(headers: dict[bytes, bytes]) -> str | None:
    declared = headers.get(b"content-type", b"").decode("latin-1")
    if declared.split(";")[0].strip().lower() == "application/json":
        return None
    return (
        f"Content-Type must be application/json (got {declared!r})"
        if declared
        else "Content-Type must be application/json (none sent)"
    )


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
        elif scope["method"] == "POST" and path in BODY_PATHS and (problem := _content_type_error(headers)):
            refusal = (415, problem)
        elif (declared := headers.get(b"content-length")) is not None and (
            not declared.isdigit() or int(declared) > max_body
        ):
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
