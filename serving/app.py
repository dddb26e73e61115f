"""The Ray Serve application: a FastAPI ingress in front of one model version per A/B variant.

Endpoints (OpenAPI at /docs):
- `POST /predict` — the BridgeAI request and reply, plus `model_name`/`model_version`/`variant`;
- `GET /health` — exactly the reference's reply (never needs an API key);
- `POST /predict/batch` — `{"records": [...]}`, up to `max_batch_records` rows;
- `POST /invocations` — MLflow's scoring protocol (`dataframe_split`, `dataframe_records`,
  `instances`, `inputs`) with MLflow's `{"predictions": …}` and `{"error_code", "message"}`;
- `GET /model` — name, version, alias, run id, feature version, the experiment, this replica.

The ingress (`PredictionService`) validates, routes and records. The versions it serves —
production, and staging while an experiment runs — are loaded inside each ingress replica by
default, so the router picks a local model and a request never leaves the replica that parsed
it; with placement `deployment` each version runs in its own deployment
(`serving.model.ModelVariant`) behind a `DeploymentHandle` instead (see `serving.model`). The
router (`serving.router`) sends each client to one variant by weight, sticky per `X-Client-ID`
(else per request id). Every reply carries `X-Request-ID`
(echoed once, by Serve), `X-Model-Version` and `X-Variant`. Refusals and errors come from
`serving.guards` (401, 415, 413) and the handlers below (422 naming the field or the JSON error,
503 for a failing model); `serving.recording` writes exactly one record per request.
"""

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

import bridge_assets
from bridge_assets.core.contract import CONTRACT_PATH, CONTRACT_VARIABLE
from bridge_assets.core.contract_spec import HOUSING
from bridge_assets.core.pyfunc import InvalidInput
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.tracking import MlflowSettings
from serving.guards import ApiKeys, Guards, error_reply, load_api_keys, too_many_message
from serving.interactions import InteractionLogger
from serving.model import INGRESS, ROLLING, LocalVariant, ModelVariant, RemoteVariant, ServedModel, Variant
from serving.recording import Exchange, Recorder, RecordRequests, RequestMetrics, exchange_of
from serving.router import ExperimentConfig
from serving.schemas import (
    SCORING_REQUEST,
    BatchRequest,
    HouseFeatures,
    InvalidRows,
    ScoringShapeError,
    scoring_records,
    valid_rows,
)

log = logging.getLogger("bridge.serving")
DEFAULT_MAX_BATCH = 10_000
DEFAULT_MAX_BODY = 4 * 1_048_576  # 10,000 records of the widest house, even indented, fit (tested)


@dataclass(frozen=True)
class ServiceSettings:
    """What the ingress needs; its init argument, which Ray stores: nothing secret in here."""

    model_name: str
    versions: dict[str, str]  # variant -> registered version; "staging" during an experiment, "previous" during a watch
    alias: str | None
    environment: dict[str, str]  # non-secret lake + MLflow variables (credentials: node env / file)
    spool_dir: str
    api_keys: ApiKeys = field(default_factory=ApiKeys)  # digests only: Ray stores this
    unit: str = "GBP(£)"
    max_batch_records: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_flush_seconds: float = 10.0
    log_flush_rows: int = 5_000
    log_max_buffered: int = 200_000
    model_placement: str = INGRESS  # or DEPLOYMENT: see serving.model

    def alias_of(self, variant: str) -> str | None:
        """The registry alias a variant's version is served under (the previous Production
        version, kept for a post-deploy watch, has none any more)."""
        return self.alias if variant == "production" else None if variant == "previous" else variant


class ModelUnavailable(Exception):
    """The variant's model failed or could not be reached: a 503, logged."""


api = FastAPI(
    title="bridge house-price prediction",
    description="BridgeAI-compatible prediction API served by Ray Serve.",
    version="1",
)
api.add_middleware(Guards)
api.add_middleware(RecordRequests)  # outermost: it records what the guards refuse too


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Errors raised as HTTPException — a streamed body over the limit, and the router's 404 and
    405 — in the service's own shape, saying what exists."""
    message = str(error.detail)
    if error.status_code == 404:
        message = f"no endpoint {request.url.path}: see /docs for the API"
    elif error.status_code == 405:
        allowed = {name.lower(): value for name, value in (error.headers or {}).items()}.get("allow", "another method")
        message = f"{request.method} is not allowed on {request.url.path}: use {allowed}"
    exchange_of(request).error = message
    reply = error_reply(request.url.path, error.status_code, message)
    reply.headers.update(error.headers or {})
    return reply


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming the JSON syntax error, or every field at fault (FastAPI's `detail` list)."""
    errors = list(error.errors())
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    broken = next((e for e in errors if e["type"] == "json_invalid"), None)
    if broken is not None:
        message = f"body is not valid JSON: {broken.get('ctx', {}).get('error', broken['msg'])} at character {broken['loc'][-1]}"
    else:
        message = (
            f"invalid input: {', '.join(sorted({'.'.join(str(p) for p in e['loc'][1:]) or 'body' for e in errors}))}"
        )
    exchange = exchange_of(request)
    exchange.error = message
    body = getattr(error, "body", None)
    exchange.rows = [body if isinstance(body, dict) else None]
    return error_reply(request.url.path, 422, message, detail=detail)


@api.exception_handler(ModelUnavailable)
async def _model_unavailable(request: Request, error: ModelUnavailable) -> JSONResponse:
    exchange_of(request).error = str(error)
    return error_reply(request.url.path, 503, str(error))


# No access log: every request already has its interaction record, and Serve's log line per
# request cost the replica CPU on the request path.
@serve.deployment(
    ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32, logging_config={"enable_access_log": False}, **ROLLING
)
@serve.ingress(api)
class PredictionService:
    """The API: validates, routes by client to a variant's model, records every request."""

    def __init__(
        self,
        settings: ServiceSettings,
        remote: dict[str, DeploymentHandle] | None = None,
        retiring: tuple[DeploymentHandle, ...] = (),
    ) -> None:
        """`remote`: a handle per variant (placement `deployment`); None loads every version in
        this replica. `retiring`: deployments the previous ingress replicas may still call,
        bound only so that Serve keeps them until this rollout has replaced those replicas."""
        os.environ.update(settings.environment)
        self.settings = settings
        self.versions = settings.versions
        self.variants: dict[str, Variant]
        if remote is None:
            client = MlflowSettings.from_env().activate()
            self.variants = {
                name: LocalVariant(ServedModel.load(client, settings.model_name, version, settings.alias_of(name)))
                for name, version in settings.versions.items()
            }
        else:
            self.variants = {name: RemoteVariant(handle) for name, handle in remote.items()}
        self.experiment = ExperimentConfig()  # Serve calls `reconfigure` before the first request
        self.api_keys = settings.api_keys.including(load_api_keys(os.environ), "the Ray node's environment")
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # outside Serve (unit use): no replica context
            self.replica = uuid.uuid4().hex[:8]
        logger = InteractionLogger(
            StorageSettings.from_env().open,
            self.replica,
            spool_dir=Path(settings.spool_dir),
            flush_rows=settings.log_flush_rows,
            flush_seconds=settings.log_flush_seconds,
            max_buffered=settings.log_max_buffered,
        )
        self.recorder = Recorder(logger, settings.model_name, self.replica, RequestMetrics())
        api.state.service = self

    def __del__(self) -> None:  # Serve calls this on graceful shutdown: publish what is spooled
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            log.info("interaction log on shutdown: %s", recorder.logger.close())

    def reconfigure(self, experiment: dict[str, Any]) -> None:
        """The weights and salt (the deployment's `user_config`): a new weight reaches the
        running replicas without a restart; a variant this replica does not serve gets none."""
        config = ExperimentConfig(**experiment)
        self.experiment = ExperimentConfig(
            config.salt,
            config.staging_weight if "staging" in self.variants else 0.0,
            config.previous_weight if "previous" in self.variants else 0.0,
        )

    def served_versions(self) -> dict[str, str]:
        """For `deploy()` (through a handle): which version each variant runs."""
        return self.versions

    def api_key_status(self) -> str:
        """For `deploy()` (through a handle): whether this replica enforces keys, and whose."""
        return self.api_keys.describe()

    def check_health(self) -> None:
        """Unhealthy (and replaced by Serve) if the interaction logger has died."""
        if not self.recorder.logger.alive:
            raise RuntimeError("interaction logger thread is not running")

    async def _predicted(self, exchange: Exchange, method: str, payload: Any) -> Any:
        """The routed variant's predictions (its version noted); InvalidInput passes through,
        any other failure is a 503 — a non-finite price too: it is the model failing on an input
        its gates did not cover, not an answer."""
        try:
            exchange.model_version, predictions, exchange.model_ms = await getattr(
                self.variants[exchange.variant], method
            )(payload)
        except InvalidInput:
            raise
        except Exception as error:
            log.exception(
                "model failure (%s v%s, request %s)", exchange.variant, exchange.model_version, exchange.request_id
            )
            raise ModelUnavailable(
                f"model unavailable: {type(getattr(error, 'cause', None) or error).__name__}"
            ) from error
        if not np.isfinite(np.asarray(predictions, dtype=np.float64)).all():
            log.error(
                "non-finite prediction (%s v%s, request %s)",
                exchange.variant,
                exchange.model_version,
                exchange.request_id,
            )
            raise ModelUnavailable(f"model v{exchange.model_version} produced a non-finite price")
        return predictions

    def _prediction_reply(self, exchange: Exchange, **result: Any) -> JSONResponse:
        """The reference's success body, with the model and variant that answered."""
        response = {
            **result,
            "unit": self.settings.unit,
            "model_name": self.settings.model_name,
            "model_version": exchange.model_version,
            "variant": exchange.variant,
        }
        return JSONResponse({"status": 200, "message": "House price prediction successful", "response": response})

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        return {"status": 200, "message": "success", "response": None}

    @api.get("/model")
    async def model_info(self) -> dict[str, Any]:
        info = await self.variants["production"].info()
        experiment = {
            "versions": self.versions,
            "staging_weight": self.experiment.staging_weight,
            "previous_weight": self.experiment.previous_weight,
            "salt": self.experiment.salt,
        }
        return {
            "status": 200,
            "message": "success",
            "response": {
                **info,
                "variant": "production",
                "experiment": experiment,
                "placement": self.settings.model_placement,
                "replica": self.replica,
                "pid": os.getpid(),
            },
        }

    @api.post("/predict")
    async def predict(self, features: HouseFeatures, request: Request) -> JSONResponse:
        exchange = exchange_of(request)
        exchange.rows = [features.model_dump()]
        watched = self.experiment.previous_weight > 0  # a post-deploy watch compares model times
        method = "predict_alone" if watched else "predict_one"
        exchange.predictions = [await self._predicted(exchange, method, exchange.rows[0])]
        return self._prediction_reply(exchange, prediction=exchange.predictions[0])

    @api.post("/predict/batch")
    async def predict_batch(self, batch: BatchRequest, request: Request) -> JSONResponse:
        exchange = exchange_of(request)
        if len(batch.records) > self.settings.max_batch_records:
            exchange.error = too_many_message(
                len(batch.records), self.settings.max_body_bytes, self.settings.max_batch_records
            )
            return error_reply("/predict/batch", 413, exchange.error)
        exchange.rows = [r.model_dump() for r in batch.records]
        exchange.predictions = await self._predicted(exchange, "predict_valid", exchange.rows)
        return self._prediction_reply(exchange, predictions=exchange.predictions)

    @api.post("/invocations", openapi_extra=SCORING_REQUEST)
    async def invocations(self, request: Request) -> JSONResponse:
        """MLflow's scoring protocol, over the same model and request schema as /predict."""
        exchange = exchange_of(request)
        try:
            records = scoring_records(await request.json())
        except ScoringShapeError as error:
            exchange.error = str(error)
            return error_reply("/invocations", 400, exchange.error)
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            exchange.error = f"body is not valid JSON: {error}"
            return error_reply("/invocations", 400, exchange.error)
        except RecursionError:  # JSON nested deeper than Python's parser goes (found by fuzzing)
            exchange.error = "body is not valid JSON: nested too deeply"
            return error_reply("/invocations", 400, exchange.error)
        if len(records) > self.settings.max_batch_records:
            exchange.error = too_many_message(
                len(records), self.settings.max_body_bytes, self.settings.max_batch_records
            )
            return error_reply("/invocations", 413, exchange.error)
        try:
            exchange.rows = [*valid_rows(records)]
        except InvalidRows as error:  # one record for the refused request, as on every endpoint
            exchange.error = str(error)
            return JSONResponse(
                {"error_code": "INVALID_PARAMETER_VALUE", "message": exchange.error, "detail": error.detail}, 422
            )
        exchange.predictions = await self._predicted(exchange, "predict_valid", exchange.rows)
        return JSONResponse({"predictions": exchange.predictions})


def model_deployment_name(variant: str) -> str:
    """The deployment that runs a variant's version with placement `deployment`."""
    return f"Model{variant.title()}"


def application(
    settings: ServiceSettings, experiment: ExperimentConfig, replicas: int = 1, retiring: dict[str, str] | None = None
) -> serve.Application:
    """The ingress, `replicas` times; with placement `deployment`, bound to one `ModelVariant`
    deployment per variant in `settings.versions`. `retiring` (variant -> version): deployments
    of the running application that this one drops, kept bound (never called) for its rollout.

    Each deployment's version is a digest of its init arguments and of bridge's code, so a
    redeploy restarts only replicas whose model or settings changed, while the experiment
    (`user_config`) reaches running replicas through `reconfigure`."""

    def deployment(variant: str, version: str) -> serve.Application:
        init = (settings.model_name, version, settings.alias_of(variant), settings.environment)
        # `@serve.deployment` made the classes Deployments; its annotations keep them classes.
        options = ModelVariant.options(  # type: ignore[attr-defined]
            name=model_deployment_name(variant), num_replicas=replicas, **_with_contract(ModelVariant)
        )
        return options.options(version=code_version(init), _internal=True).bind(*init)

    remote = (
        None
        if settings.model_placement == INGRESS
        else {name: deployment(name, v) for name, v in settings.versions.items()}
    )
    kept = tuple(deployment(name, version) for name, version in (retiring or {}).items())
    ingress = PredictionService.options(  # type: ignore[attr-defined]
        num_replicas=replicas, user_config=asdict(experiment), **_with_contract(PredictionService)
    )
    return ingress.options(version=code_version(asdict(settings)), _internal=True).bind(settings, remote, kept)


def _with_contract(deployment: Any) -> dict[str, Any]:
    """Replicas validate and log by the deployer's contract: one other than bridge's default goes
    to them in their runtime environment, read before their code is imported (a replica's own
    environment is the Ray node's, started maybe before the contract was chosen)."""
    if CONTRACT_PATH == HOUSING.resolve():
        return {}
    contract = {"env_vars": {CONTRACT_VARIABLE: str(CONTRACT_PATH)}}
    return {"ray_actor_options": {**deployment.ray_actor_options, "runtime_env": contract}}


def code_version(init: object) -> str:
    """What Serve compares to choose between restarting a deployment's replicas and only
    reconfiguring them: a digest of the init arguments, the contract and bridge's code (Serve 2.60 keeps
    `version` internal and otherwise draws a random one on every `serve.run`, so every deploy
    restarted every replica, and a new experiment weight reloaded both models)."""
    digest = hashlib.sha256(json.dumps(init, sort_keys=True).encode())
    digest.update(CONTRACT_PATH.read_bytes())  # a new contract is new replicas too
    for package in (Path(__file__).parent, Path(bridge_assets.__file__).parent):
        for source in sorted(package.rglob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]
