"""Helpers shared by the tests that talk to the prediction service over HTTP."""

import json
import socket
import urllib.error
import urllib.request

import dagster as dg

from bridge_assets.definitions import build_defs

REFERENCE_REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip
MAX_BATCH = 50
MAX_BODY = 262_144  # small: over-limit bodies stay cheap to send


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, path: str, body: object = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, JSON body, headers) of one HTTP request; 4xx/5xx are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"{url}{path}", data=data, method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply), reply.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), error.headers


def deploy_through_dagster() -> dg.ExecuteInProcessResult:
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        return job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("production_deployment")], raise_on_error=False
        )
