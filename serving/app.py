"""The Ray Serve application: a FastAPI ingress around one registered model version.

Endpoints (OpenAPI at /docs):
- `POST /predict` — the BridgeAI request and reply, plus `model_name`/`model_version`;
- `GET /health` — exactly the reference's reply;
- `POST /predict/batch` — `{"records": [...]}`, up to `max_batch_records` rows;
- `POST /invocations` — MLflow's scoring protocol (`dataframe_split`, `dataframe_records`,
  `instances`, `inputs`) with MLflow's `{"predictions": …}` and `{"error_code", "message"}`;
- `GET /model` — name, version, alias, run id, feature version.

Every request gets an id (the client's `X-Request-ID`, else Serve's), echoed once in the reply
(by Serve) and written with the interaction record. Client errors are 4xx naming what is wrong:
422 naming the field or the JSON error, 415 without a JSON content type, 413 over the body or
batch limit (naming both); a failing model is a 503, logged. `/invocations` answers errors in
MLflow's `{"error_code", "message"}` shape.
"""

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import polars as pl
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from ray import serve

from bridge_assets.core.contract import COUNT_BOUNDS, FEATURES
from bridge_assets.core.pyfunc import InvalidInput
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.tracking import MlflowSettings
from serving.interactions import InteractionLogger, record
from serving.model import ServedModel

log = logging.getLogger("bridge.serving")
REQUEST_ID = "X-Request-ID"
DEFAULT_MAX_BATCH = 10_000
DEFAULT_MAX_BODY = 4 * 1_048_576  # 10,000 records of the widest house, even indented, fit (tested)
MLFLOW_ENDPOINT = "/invocations"


def _normalised(value: Any) -> Any:
    """The contract's one spelling of a category: stripped and lower-cased."""
    return value.strip().lower() if isinstance(value, str) else value


YesNo = Annotated[Literal["yes", "no"], BeforeValidator(_normalised)]
Furnishing = Annotated[Literal["furnished", "semi-furnished", "unfurnished"], BeforeValidator(_normalised)]


def _count(name: str) -> Any:
    low, high = COUNT_BOUNDS[name]
    return Field(ge=low, le=high, description=f"{low}–{high}")


class HouseFeatures(BaseModel):
    """One house, as the BridgeAI clients send it (yes/no in any case)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
                "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
                "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
            }  # fmt: skip
        }
    )
    mainroad: YesNo
    guestroom: YesNo
    basement: YesNo
    hotwaterheating: YesNo
    airconditioning: YesNo
    prefarea: YesNo
    furnishingstatus: Furnishing
    area: float = Field(gt=0, allow_inf_nan=False)
    bedrooms: int = _count("bedrooms")
    bathrooms: int = _count("bathrooms")
    stories: int = _count("stories")
    parking: int = _count("parking")


class BatchRequest(BaseModel):
    records: list[HouseFeatures] = Field(min_length=1)


@dataclass(frozen=True)
class ServiceSettings:
    """What a replica needs; passed as the deployment's init argument."""

    model_name: str
    model_version: str
    alias: str | None
    environment: dict[str, str]  # lake + MLflow variables (StorageSettings/MlflowSettings.to_env)
    variant: str = "production"
    unit: str = "GBP(£)"
    max_batch_records: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_flush_seconds: float = 10.0
    log_flush_rows: int = 5_000
    log_max_buffered: int = 200_000


api = FastAPI(
    title="bridge house-price prediction",
    description="BridgeAI-compatible prediction API served by Ray Serve.",
    version="1",
)


def _request_id(request: Request) -> str:
    """The client's `X-Request-ID`, else the one Serve's proxy assigned (Serve echoes it in the
    reply, so the app never sets the header itself)."""
    return request.headers.get(REQUEST_ID) or uuid.uuid4().hex


def _reply(body: dict[str, Any], status: int) -> JSONResponse:
    return JSONResponse(body, status_code=status)


MLFLOW_ERROR_CODES = {413: "REQUEST_LIMIT_EXCEEDED", 422: "BAD_REQUEST", 503: "TEMPORARILY_UNAVAILABLE"}


def _error_reply(path: str, status: int, message: str, **extra: Any) -> JSONResponse:
    """An error in the endpoint's own shape: MLflow's for `/invocations`, the reference's else."""
    if path == MLFLOW_ENDPOINT:
        return _reply({"error_code": MLFLOW_ERROR_CODES.get(status, "BAD_REQUEST"), "message": message}, status)
    return _reply({"status": status, "message": message, **extra, "response": None}, status)


def _service(app: Any) -> "PredictionService | None":
    """This replica's service, for the app-level hooks. Serve ships the ingress class by value
    (a module global set in one copy is not seen by the other), so it lives on the app's state."""
    return getattr(app.state, "service", None)


def _log_rejection(request: Request, status: int, error: str, features: Any = None) -> None:
    service = _service(request.app)
    if service is not None:
        service.log_interactions(
            _request_id(request), request.url.path, status, request.state.started, [features], error=error
        )


def _limits(app: Any) -> tuple[int, int]:
    service = _service(app)
    settings = service.settings if service else None
    return (settings.max_body_bytes, settings.max_batch_records) if settings else (DEFAULT_MAX_BODY, DEFAULT_MAX_BATCH)


def _too_large_message(max_body: int, max_records: int) -> str:
    return (
        f"request body larger than {max_body} bytes (BRIDGE_SERVE_MAX_BODY); "
        f"a batch holds at most {max_records} records (BRIDGE_SERVE_MAX_BATCH)"
    )


def _too_many_message(count: int, max_body: int, max_records: int) -> str:
    return (
        f"records: at most {max_records} per request (BRIDGE_SERVE_MAX_BATCH), got {count}; "
        f"bodies up to {max_body} bytes (BRIDGE_SERVE_MAX_BODY)"
    )


def _not_json(scope: dict) -> str | None:
    """Why a POST's declared content type is not JSON, or None if it is."""
    declared = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
    if declared.split(";")[0].strip().lower() == "application/json":
        return None
    return f"Content-Type must be application/json (got {declared!r})" if declared else "Content-Type must be application/json (none sent)"


class LimitBody:
    """ASGI middleware: 415 for a POST that is not JSON; 413 for bodies over the limit, by header
    or as they stream in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_body, max_records = _limits(scope["app"]) if "app" in scope else (DEFAULT_MAX_BODY, DEFAULT_MAX_BATCH)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        request = Request(scope)
        request.state.started = time.perf_counter()
        if scope["method"] == "POST" and (wrong_type := _not_json(scope)):
            return await self._refuse(scope, receive, send, 415, wrong_type)
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return await self._refuse(scope, receive, send, 413, _too_large_message(max_body, max_records))
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_body:  # FastAPI passes HTTPExceptions raised while reading through
                raise HTTPException(status_code=413, detail=_too_large_message(max_body, max_records))
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        request = Request(scope)
        _log_rejection(request, status, message)
        await _error_reply(request.url.path, status, message)(scope, receive, send)


api.add_middleware(LimitBody)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Errors raised as HTTPException (a streamed body over the limit): the endpoint's shape, logged."""
    message = str(error.detail)
    _log_rejection(request, error.status_code, message)
    return _error_reply(request.url.path, error.status_code, message)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """What is wrong, in words: the JSON syntax error, or the fields at fault."""
    broken = next((e for e in errors if e["type"] == "json_invalid"), None)
    if broken is not None:
        position = broken["loc"][-1]
        return f"body is not valid JSON: {broken.get('ctx', {}).get('error', broken['msg'])} at character {position}"
    fields = sorted({".".join(str(p) for p in e["loc"][1:]) or "body" for e in errors})
    return f"invalid input: {', '.join(fields)}"


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming every field at fault (FastAPI's `detail` list), recorded as an interaction."""
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in error.errors()]
    message = _validation_message(list(error.errors()))
    body = getattr(error, "body", None)
    _log_rejection(request, 422, message, body if isinstance(body, dict) else None)
    return _error_reply(request.url.path, 422, message, detail=detail)


SCORING_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def scoring_frame(payload: Any) -> pl.DataFrame:
    """Rows from an MLflow scoring request; exactly one of the four input keys."""
    if not isinstance(payload, dict):
        raise ValueError("the request body must be a JSON object")
    keys = [k for k in SCORING_KEYS if k in payload]
    if len(keys) != 1:
        raise ValueError(f"the request must have exactly one of {', '.join(SCORING_KEYS)}; got {keys or 'none'}")
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or "columns" not in data or "data" not in data:
            raise ValueError("dataframe_split needs 'columns' and 'data'")
        records = [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]
    elif isinstance(data, dict):  # inputs/instances as columns: {"area": [...], ...}
        lengths = {len(v) if isinstance(v, list) else 1 for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{keys[0]}: every column needs the same number of values")
        records = [dict(zip(data, values, strict=True)) for values in zip(*(v if isinstance(v, list) else [v] for v in data.values()), strict=True)]
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        records = data
    else:
        raise ValueError(f"{keys[0]} must be a list of records or an object of columns")
    if not records:
        raise ValueError(f"{keys[0]} holds no rows")
    missing = sorted({f for r in records for f in FEATURES if f not in r})
    if missing:
        raise KeyError(f"missing field(s): {', '.join(missing)}")
    return pl.DataFrame([{f: r[f] for f in FEATURES} for r in records], schema_overrides={"area": pl.Float64}, strict=False)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=32,
    health_check_period_s=5,
    graceful_shutdown_timeout_s=30,
    max_surge_percent=100,
    max_constructor_retry_count=2,
)
@serve.ingress(api)
class PredictionService:
    """One model version behind the BridgeAI API, logging every interaction."""

    def __init__(self, settings: ServiceSettings) -> None:
        os.environ.update(settings.environment)
        self.settings = settings
        client = MlflowSettings.from_env().activate()
        self.model = ServedModel.load(client, settings.model_name, settings.model_version, settings.alias)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (unit use)
            replica = uuid.uuid4().hex[:8]
        self.interactions = InteractionLogger(
            StorageSettings.from_env().open,
            replica,
            flush_rows=settings.log_flush_rows,
            flush_seconds=settings.log_flush_seconds,
            max_buffered=settings.log_max_buffered,
        )
        api.state.service = self

    def __del__(self) -> None:  # Serve calls this on graceful shutdown: flush what is buffered
        interactions = getattr(self, "interactions", None)
        if interactions is not None:
            log.info("interaction log on shutdown: %s", interactions.close())

    def check_health(self) -> None:
        """Unhealthy (and replaced by Serve) if the interaction logger has died."""
        if not self.interactions.alive:
            raise RuntimeError("interaction logger thread is not running")

    def log_interactions(
        self,
        request_id: str,
        endpoint: str,
        status: int,
        started: float,
        rows: list[dict[str, Any] | None],
        predictions: list[float] | None = None,
        error: str | None = None,
    ) -> None:
        latency = (time.perf_counter() - started) * 1000
        self.interactions.log(
            [
                record(
                    request_id=request_id,
                    row_index=index,
                    endpoint=endpoint,
                    status=status,
                    model_name=self.model.name,
                    model_version=self.model.version,
                    variant=self.settings.variant,
                    latency_ms=latency,
                    features=row,
                    prediction=predictions[index] if predictions else None,
                    error=error,
                )
                for index, row in enumerate(rows)
            ]
        )

    def _predict(self, rows: list[dict[str, Any]]) -> list[float]:
        """Predictions for rows `HouseFeatures` validated, through the version's preprocessing
        and network (the contract's checks already held: bounds and levels are the contract's)."""
        frame = pl.DataFrame(rows, schema_overrides={"area": pl.Float64})
        return self.model.predict(frame, checked=True).tolist()

    def _prediction_reply(self, request_id: str, **result: Any) -> JSONResponse:
        """The reference's success body, with the model that answered."""
        response = {**result, "unit": self.settings.unit, "model_name": self.model.name, "model_version": self.model.version}
        return _reply({"status": 200, "message": "House price prediction successful", "response": response}, 200)

    def _model_failure(self, request: Request, request_id: str, endpoint: str, rows: list, error: Exception) -> JSONResponse:
        log.exception("model failure on %s (request %s)", endpoint, request_id)
        message = f"model unavailable: {type(error).__name__}"
        self.log_interactions(request_id, endpoint, 503, request.state.started, rows, error=message)
        return _error_reply(endpoint, 503, message)

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        return {"status": 200, "message": "success", "response": None}

    @api.get("/model")
    def model_info(self) -> dict[str, Any]:
        return {"status": 200, "message": "success", "response": {**self.model.info(), "variant": self.settings.variant}}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _predict_batched(self, rows: list[dict[str, Any]]) -> list[float]:
        """Concurrent single-row requests encoded and predicted together (one Polars pass)."""
        return self._predict(rows)

    @api.post("/predict")
    async def predict(self, features: HouseFeatures, request: Request) -> JSONResponse:
        request_id = _request_id(request)
        row = features.model_dump()
        try:
            prediction = await self._predict_batched(row)
        except Exception as error:  # noqa: BLE001 - any model error is a 503, never a 500
            return self._model_failure(request, request_id, "/predict", [row], error)
        self.log_interactions(request_id, "/predict", 200, request.state.started, [row], [prediction])
        return self._prediction_reply(request_id, prediction=prediction)

    @api.post("/predict/batch")
    def predict_batch(self, batch: BatchRequest, request: Request) -> JSONResponse:
        request_id = _request_id(request)
        rows = [r.model_dump() for r in batch.records]
        if len(rows) > self.settings.max_batch_records:
            message = _too_many_message(len(rows), self.settings.max_body_bytes, self.settings.max_batch_records)
            self.log_interactions(request_id, "/predict/batch", 413, request.state.started, [None], error=message)
            return _error_reply("/predict/batch", 413, message)
        try:
            predictions = self._predict(rows)
        except Exception as error:  # noqa: BLE001
            return self._model_failure(request, request_id, "/predict/batch", rows, error)
        self.log_interactions(request_id, "/predict/batch", 200, request.state.started, rows, predictions)
        return self._prediction_reply(request_id, predictions=predictions)

    @api.post("/invocations")
    async def invocations(self, request: Request) -> JSONResponse:
        """MLflow's scoring protocol, over the same model and contract."""
        request_id = _request_id(request)
        try:
            try:
                payload = json.loads(await request.body())
            except json.JSONDecodeError as error:
                raise ValueError(f"body is not valid JSON: {error}") from error
            frame = scoring_frame(payload)
        except (ValueError, TypeError, KeyError, pl.exceptions.PolarsError) as error:
            message = str(error)
            self.log_interactions(request_id, "/invocations", 400, request.state.started, [None], error=message)
            return _reply({"error_code": "BAD_REQUEST", "message": message}, 400)
        rows = frame.to_dicts()
        if len(rows) > self.settings.max_batch_records:
            message = _too_many_message(len(rows), self.settings.max_body_bytes, self.settings.max_batch_records)
            self.log_interactions(request_id, "/invocations", 413, request.state.started, [None], error=message)
            return _error_reply("/invocations", 413, message)
        try:
            predictions = (await asyncio.to_thread(self.model.predict, frame)).tolist()  # keep /predict flowing
        except InvalidInput as error:
            self.log_interactions(request_id, "/invocations", 400, request.state.started, rows, error=str(error))
            return _reply({"error_code": "INVALID_PARAMETER_VALUE", "message": str(error)}, 400)
        except Exception as error:  # noqa: BLE001
            return self._model_failure(request, request_id, "/invocations", rows, error)
        self.log_interactions(request_id, "/invocations", 200, request.state.started, rows, predictions)
        return _reply({"predictions": predictions}, 200)


def application(settings: ServiceSettings, replicas: int = 1) -> serve.Application:
    return PredictionService.options(num_replicas=replicas).bind(settings)
