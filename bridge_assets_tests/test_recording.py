"""The record middleware and the guards on a small ASGI app (no Ray): exactly one record per
request whatever produced the reply — a handler, a guard, an exception nobody handled, a client
that went away — and API keys that are checked, never recorded."""

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
from fastapi import FastAPI, Request

from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.storage import LocalStore
from serving.guards import ApiKeys, Guards
from serving.interactions import InteractionLogger
from serving.recording import Recorder, RecordRequests, exchange_of
from serving.router import ExperimentConfig

KEY = "s3cr3t-api-key-0123"


def _app(tmp_path: Path, api_keys: ApiKeys = ApiKeys()) -> tuple[FastAPI, InteractionLogger]:
    app = FastAPI()
    app.add_middleware(Guards)
    app.add_middleware(RecordRequests)
    logger = InteractionLogger(lambda: LocalStore(tmp_path / "lake"), "r1", spool_dir=tmp_path / "spool", flush_seconds=600)
    app.state.service = SimpleNamespace(
        experiment=ExperimentConfig("salt", 0.0), versions={"production": "7"}, api_keys=api_keys,
        recorder=Recorder(logger, "m", "r1", None), settings=SimpleNamespace(max_body_bytes=1000, max_batch_records=5),
    )  # fmt: skip

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        exchange_of(request).predictions = [1.5]
        return {"ok": True}

    @app.post("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug outside every handler's except")

    @app.post("/slow")
    async def slow() -> dict:
        await asyncio.sleep(3600)
        return {}

    @app.get("/health")
    async def health() -> dict:
        return {"status": 200}

    return app, logger


async def _call(app, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"{}"):
    sent: list[dict] = []
    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}.items()],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else await asyncio.sleep(3600)

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), json.loads(body or b"null")


def _records(logger: InteractionLogger, store_root: Path) -> pl.DataFrame:
    logger.close()
    return read_interactions(LocalStore(store_root))


def test_every_request_has_exactly_one_record_whatever_answered(tmp_path):
    app, logger = _app(tmp_path)

    async def traffic():
        assert (await _call(app, "POST", "/predict", {"X-Request-ID": "ok", "X-Client-ID": "c1"}))[0] == 200
        status, headers, body = await _call(app, "POST", "/boom", {"X-Request-ID": "boom"})
        assert status == 500 and body["message"] == "internal error: RuntimeError"
        assert headers["x-model-version"] == "7" and headers["x-variant"] == "production"
        assert (await _call(app, "POST", "/nowhere", {"X-Request-ID": "404"}))[0] == 404
        assert (await _call(app, "POST", "/predict", {"X-Request-ID": "big"}, b" " * 1001))[0] == 413
        assert (await _call(app, "POST", "/predict", {"X-Request-ID": "csv", "Content-Type": "text/csv"}))[0] == 415
        assert (await _call(app, "GET", "/health", {"X-Request-ID": "health"}))[0] == 200
        slow = asyncio.create_task(_call(app, "POST", "/slow", {"X-Request-ID": "gone"}))
        await asyncio.sleep(0.2)
        slow.cancel()  # the client went away before the reply
        await asyncio.gather(slow, return_exceptions=True)
        status, headers, _ = await _call(app, "POST", "/predict")
        assert status == 200 and len(headers["x-request-id"]) == 32  # generated and echoed once outside Serve

    asyncio.run(traffic())
    records = _records(logger, tmp_path / "lake")
    by_id = {r["request_id"]: r for r in records.to_dicts()}
    assert records.height == 7 and records["request_id"].n_unique() == 7  # not /health
    assert (by_id["ok"]["status"], by_id["ok"]["prediction"], by_id["ok"]["client_id"]) == (200, 1.5, "c1")
    assert (by_id["boom"]["status"], by_id["boom"]["error"]) == (500, "internal error: RuntimeError")
    assert (by_id["404"]["status"], by_id["404"]["error"]) == (404, "HTTP 404")
    assert by_id["big"]["status"] == 413 and "1000 bytes" in by_id["big"]["error"] and "5 records" in by_id["big"]["error"]
    assert by_id["csv"]["status"] == 415 and by_id["gone"]["status"] == 499
    assert set(records["model_version"]) == {"7"} and set(records["replica"]) == {"r1"}


def test_api_keys_refuse_missing_and_wrong_keys_leave_health_open_and_are_never_recorded(tmp_path):
    app, logger = _app(tmp_path, api_keys=ApiKeys.of((KEY.encode(), b"other-key"), "test"))

    async def traffic():
        status, _, body = await _call(app, "POST", "/predict", {"X-Request-ID": "none"})
        assert status == 401 and body["message"].startswith("missing API key")
        status, _, body = await _call(app, "POST", "/predict", {"X-Request-ID": "wrong", "X-API-Key": KEY[:-1]})
        assert status == 401 and body["message"] == "wrong API key"
        assert (await _call(app, "POST", "/predict", {"X-Request-ID": "header", "X-API-Key": KEY}))[0] == 200
        assert (await _call(app, "POST", "/predict", {"X-Request-ID": "bearer", "Authorization": f"Bearer {KEY}"}))[0] == 200
        assert (await _call(app, "GET", "/health"))[0] == 200

    asyncio.run(traffic())
    records = _records(logger, tmp_path / "lake")
    assert dict(zip(records["request_id"], records["status"], strict=True)) == {"none": 401, "wrong": 401, "header": 200, "bearer": 200}
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert KEY[:-1].encode() not in written  # neither the right key nor the wrong one
