"""MLflow tracking and registry for training rounds (steps 2, 3 and 19).

One parent run per round, one nested run per configuration. Each run logs hyperparameters,
per-epoch losses, metrics next to both linear baselines, the model's own files (a network's
weights, an estimator), the model as a pyfunc over raw housing columns (signature, input example, the core's code), and lineage tags.
The round's best run is registered as a new version of the model, marked as a candidate: the
reference's stage "None" (alias `candidate`, tag `bridge.stage=None`, an audit record); stages
and their trail live in `bridge_assets.ml.registry`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema
from pydantic import AliasChoices, Field

import bridge_assets.core as core_package
from bridge_assets.core.calibration import FILE_NAME as CALIBRATION_FILE
from bridge_assets.core.calibration import Recalibration
from bridge_assets.core.contract import COUNT_FEATURES, FEATURES, MEASURES
from bridge_assets.core.model_api import Model, load_model
from bridge_assets.core.simulator import load_seed_data
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.lake.settings import DEFAULT_PREFIX, PROJECT_ROOT, StorageSettings, bridge_home
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.ml.registry import Registry
from bridge_assets.settings import DERIVED, EnvSettings

if TYPE_CHECKING:
    from bridge_assets.ml.round import Candidate, RoundResult

DEFAULT_EXPERIMENT = "bridge-housing"
DEFAULT_MODEL_NAME = "housing-price"
DEFAULT_UI_PORT = 5000  # `make mlflow` over the embedded store (BRIDGE_MLFLOW_PORT)
_MODEL_REQUIREMENTS = ("torch", "scikit-learn", "polars", "numpy", "pandas", "pyarrow", "mlflow")
# Measures (area) are "any": MLflow refuses int64 for a double column, and clients send both 1200
# and 1200.5; the pyfunc's contract check then rejects anything that breaks the contract.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(AnyType() if name in MEASURES else "long" if name in COUNT_FEATURES else "string", name)
            for name in FEATURES
        ]
    ),
    outputs=Schema([ColSpec("double", "prediction")]),
)


class MlflowSettings(EnvSettings):
    """Where runs and models go; see the README's configuration table. Embedded default: a
    SQLite store and artifacts under BRIDGE_HOME (in the bucket when the lake is on S3); an
    http(s) `MLFLOW_TRACKING_URI` is a server, which owns the artifacts."""

    tracking_uri: str = Field(
        validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking + registry (default: SQLite under BRIDGE_HOME)",
        json_schema_extra=DERIVED,
    )
    artifact_location: str | None = Field(
        None,
        validation_alias="BRIDGE_MLFLOW_ARTIFACTS",
        description="artifact location of the experiment bridge creates (non-server stores)",
        json_schema_extra=DERIVED,
    )
    experiment: str = Field(
        DEFAULT_EXPERIMENT, validation_alias="BRIDGE_MLFLOW_EXPERIMENT", description="MLflow experiment"
    )
    model_name: str = Field(
        DEFAULT_MODEL_NAME, validation_alias="BRIDGE_MODEL_NAME", description="registered model name"
    )
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
        description="S3 endpoint for MLflow's artifact client",
    )
    browser_url: str | None = Field(
        None,
        validation_alias="BRIDGE_MLFLOW_UI_URL",
        description="where people open this store's UI (default: the server, or `make mlflow`'s)",
        json_schema_extra=DERIVED,
    )
    local_ui_port: int = Field(
        DEFAULT_UI_PORT, ge=1, le=65535, validation_alias="BRIDGE_MLFLOW_PORT", description="`make mlflow`'s port"
    )

    @classmethod
    def derive(cls, values: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
        home = bridge_home(env)
        tracking_uri = values.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        if "BRIDGE_MLFLOW_ARTIFACTS" not in values and not tracking_uri.startswith(("http://", "https://")):
            bucket = env.get("BRIDGE_S3_BUCKET")
            prefix = env.get("BRIDGE_S3_PREFIX", DEFAULT_PREFIX).strip("/")
            key = f"{prefix}/mlflow" if prefix else "mlflow"
            values["BRIDGE_MLFLOW_ARTIFACTS"] = (
                f"s3://{bucket}/{key}" if bucket else (home / "mlflow" / "artifacts").as_uri()
            )
        return values

    def activate(self) -> MlflowClient:
        """Point this process's MLflow at the store and experiment; returns a client."""
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.s3_endpoint_url:  # read by MLflow's S3 artifact repository
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", self.s3_endpoint_url)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(self.tracking_uri)
        if client.get_experiment_by_name(self.experiment) is None:
            client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        mlflow.set_experiment(self.experiment)
        return client

    @property
    def ui_url(self) -> str:
        """Where a browser sees this store: `BRIDGE_MLFLOW_UI_URL`, else the server itself, else
        `make mlflow`'s UI over a local store (on `BRIDGE_MLFLOW_PORT`)."""
        if self.browser_url:
            return self.browser_url.rstrip("/")
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return f"http://127.0.0.1:{self.local_ui_port}"

    def _ui(self, path: str) -> str:
        return f"{self.ui_url}/#/{path}"

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return self._ui(f"experiments/{experiment_id}/runs/{run_id}")

    def model_version_url(self, version: str) -> str:
        return self._ui(f"models/{self.model_name}/versions/{version}")


def git_lineage(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit the code came from and whether the work tree differed from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "bridge.git_commit": commit or "unknown",
        "bridge.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


@dataclass(frozen=True)
class RoundRecord:
    """What a logged round left in MLflow."""

    experiment_id: str
    parent_run_id: str
    run_ids: dict[str, str]
    best_name: str
    best_run_id: str
    model_name: str
    model_version: str
    new_version: bool = True  # False: an equal version existed, nothing was registered

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.model_version}"


def _code_snapshot(directory: Path) -> Path:
    """A copy of `bridge_assets.core` as a package `bridge_assets` holding only the core."""
    package = directory / "bridge_assets"
    shutil.copytree(
        Path(core_package.__file__).parent, package / "core", ignore=shutil.ignore_patterns("data", "__pycache__")
    )
    (package / "__init__.py").write_text('"""Snapshot of the bridge ML core logged with a model."""\n')
    return package


def _requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _MODEL_REQUIREMENTS]


def loss_curve_png(candidate: Candidate) -> bytes:
    """Train and validation loss per epoch, the best epoch marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = candidate.model.history
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)

    def series(key: str, first: int) -> np.ndarray:
        return np.array([h[key] for h in history[first:]], dtype=float)  # None (no loss yet) reads as NaN

    axes.plot(series("epoch", 1), series("train_loss", 1), label="train")
    axes.plot(series("epoch", 0), series("val_loss", 0), label="validation")
    axes.axvline(
        candidate.model.best_epoch, color="grey", linestyle=":", label=f"best epoch {candidate.model.best_epoch}"
    )
    axes.set(xlabel="epoch", ylabel="MSE (scaled target)", title=f"{candidate.config.name} loss")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _log_candidate(
    client: MlflowClient, candidate: Candidate, result: RoundResult, tags: dict[str, str], workdir: Path
) -> tuple[str, str]:
    """Log one configuration as a nested run; returns its run id and logged-model URI."""
    config = candidate.config
    with mlflow.start_run(
        run_name=config.name, nested=True, tags={**tags, "bridge.config_hash": config.config_hash()}
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in config.to_dict().items()})
        logged_at = int(time.time() * 1000)
        epochs = [
            Metric(key, value, logged_at, step=int(h["epoch"] or 0))
            for h in candidate.model.history
            for key, value in (("train_loss", h["train_loss"]), ("val_loss", h["val_loss"]))
            if value is not None
        ]
        for start in range(0, len(epochs), 900):
            client.log_batch(run_id, metrics=epochs[start : start + 900])
        mlflow.log_metrics({**candidate.metrics, "best_epoch": candidate.model.best_epoch})
        mlflow.log_metrics({f"{name}_{k}": v for name, scores in result.baselines.items() for k, v in scores.items()})
        mlflow.set_tags({"bridge.option": candidate.option, "bridge.trained_rows": str(candidate.trained_rows)})
        files = candidate.model.save(workdir / config.name)
        for name, path in files.items():
            if name != "model":  # the model's own files (weights, an estimator), beside the pyfunc's copy
                mlflow.log_artifact(str(path), name)
        mlflow.log_dict(config.to_dict(), "config.json")
        calibration = None
        if candidate.calibration is not None:
            calibration = candidate.calibration.save(files["model"].parent / CALIBRATION_FILE)
            mlflow.log_params(
                {"calibration_kind": candidate.calibration.kind, "calibration_rows": candidate.calibration.rows}
            )
            mlflow.log_metrics(
                {"calibration_offset": candidate.calibration.offset, "calibration_slope": candidate.calibration.slope}
            )
            mlflow.set_tag("bridge.calibration", candidate.calibration.describe()[:5000])
        curve = workdir / f"{config.name}-loss_curve.png"
        curve.write_bytes(loss_curve_png(candidate))
        mlflow.log_artifact(str(curve))
        logged = log_pyfunc(files, workdir / f"{config.name}-code", calibration)
    return run_id, logged.model_uri


def log_pyfunc(
    files: Mapping[str, Path], workdir: Path, calibration: Path | None = None
) -> mlflow.models.model.ModelInfo:
    """Log a saved model (the files its `save` wrote, `model` its description) and its
    recalibration stage, if any, as the pyfunc `model` of the active run."""
    artifacts = {name: str(path) for name, path in files.items()}
    if calibration is not None:
        artifacts["calibration"] = str(calibration)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(core_package.__file__).parent / "pyfunc_entry.py"),
        artifacts=artifacts,
        code_paths=[str(_code_snapshot(workdir))],
        signature=MODEL_SIGNATURE,
        input_example=load_seed_data().select(FEATURES).head(3).to_pandas(),
        pip_requirements=_requirements(),
    )


def log_round(
    settings: MlflowSettings,
    result: RoundResult,
    *,
    feature_version: str,
    dagster_run_id: str | None = None,
    store: ObjectStore | None = None,
) -> RoundRecord:
    """Log a round as parent + nested runs and register its best model as a candidate."""
    client = settings.activate()
    tags = {
        **git_lineage(),
        "bridge.feature_version": feature_version,
        "bridge.split": result.split,
        "bridge.dagster_run_id": dagster_run_id or "none",
    }
    run_ids: dict[str, str] = {}
    model_uris: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bridge-round-") as scratch,
        mlflow.start_run(run_name=f"round {feature_version}", tags={**tags, "bridge.kind": "training_round"}) as parent,
    ):
        for candidate in result.candidates:
            name = candidate.config.name
            run_ids[name], model_uris[name] = _log_candidate(client, candidate, result, tags, Path(scratch))
        best = result.best
        mlflow.log_metrics({f"best_{k}": v for k, v in best.metrics.items()})
        mlflow.log_metrics({f"{name}_{k}": v for name, scores in result.baselines.items() for k, v in scores.items()})
        mlflow.set_tags(
            {
                "bridge.best_config": best.config.name,
                "bridge.best_run_id": run_ids[best.config.name],
                **round_tags(result),
            }
        )
        mlflow.log_text(result.choice_table(), "round_choice.md")
        mlflow.log_dict(
            {
                **result.policy.to_dict(),
                "incumbent": result.incumbent,
                "validation": result.validation,
                "rows": result.rows,
                "skipped": result.skipped,
            },
            "round.json",
        )
        experiment_id = parent.info.experiment_id
        parent_id = parent.info.run_id
    version_tags = {
        **tags,
        **round_tags(result),
        "bridge.config_hash": best.config.config_hash(),
        "bridge.run_id": run_ids[best.config.name],
    }
    existing = equal_version(client, settings.model_name, version_tags)
    if existing is not None:  # same data and configuration: nothing new to register
        client.set_tag(parent_id, "bridge.registered", f"nothing new: equals version {existing}")
        logging.getLogger("bridge.tracking").warning(
            "nothing new registered: %s v%s has the same data and configuration", settings.model_name, existing
        )
        return RoundRecord(
            experiment_id,
            parent_id,
            run_ids,
            best.config.name,
            run_ids[best.config.name],
            settings.model_name,
            existing,
            new_version=False,
        )
    version = register_candidate(client, settings.model_name, model_uris[best.config.name], version_tags, store)
    return RoundRecord(
        experiment_id, parent_id, run_ids, best.config.name, run_ids[best.config.name], settings.model_name, version
    )


def load_registered(model_name: str, version: str) -> tuple[Model, Recalibration | None]:
    """A registered version's model (by the loader its description names) and its recalibration
    stage, read fully from its artifacts (the files the pyfunc loads) in the active MLflow store,
    without pandas or the pyfunc wrapper."""
    with tempfile.TemporaryDirectory(prefix="bridge-model-") as scratch:  # read fully, then gone
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model_name}/{version}/artifacts", dst_path=scratch
            )
        )
        return load_model(local), Recalibration.load_optional(local)


def unseen_batches(
    client: MlflowClient, model_name: str, version: str, features: FeatureStore, batch_ids: list[str]
) -> list[str] | None:
    """The batches of `batch_ids` a registered version never trained on (not in its feature
    version, tag `bridge.feature_version`): the world since it was made. None if unknown."""
    trained_on = client.get_model_version(model_name, str(version)).tags.get("bridge.feature_version")
    try:
        seen = set(features.load(trained_on).batch_ids) if trained_on else None
    except (FileNotFoundError, KeyError, ValueError):
        seen = None
    return None if seen is None else sorted(set(batch_ids) - seen)


EQUALITY_TAGS = ("bridge.feature_version", "bridge.split", "bridge.config_hash", "bridge.option_hash")


def round_tags(result: RoundResult) -> dict[str, str]:
    """What the gates and the monitor need to judge the best candidate as its round did: the
    option, the recency its baselines must share, and the version whose unseen batches count as
    recent (`bridge.incumbent`)."""
    best = result.best
    tags = {
        "bridge.option": best.option,
        "bridge.option_hash": best.option_hash(result.policy, result.incumbent),
        "bridge.recency": json.dumps(result.policy.recency.to_dict(), sort_keys=True),
        "bridge.validation": result.validation,
        "bridge.choice": result.reason()[:5000],
    }
    if result.incumbent is not None:
        tags["bridge.incumbent"] = result.incumbent
    if best.calibration is not None:
        tags["bridge.calibration"] = best.calibration.describe()[:5000]
    return tags


def equal_version(client: MlflowClient, model_name: str, tags: Mapping[str, str]) -> str | None:
    """A registered version trained on the same data (feature version and split) with the same
    configuration (its hash includes the seed): registering again would add a duplicate, e.g.
    when a retrain is requested before any new data has reached the feature table."""
    for version in client.search_model_versions(f"name='{model_name}'"):
        if all(version.tags.get(k) == tags.get(k) for k in EQUALITY_TAGS):
            return str(version.version)
    return None


def register_candidate(
    client: MlflowClient, model_name: str, model_uri: str, tags: dict[str, str], store: ObjectStore | None = None
) -> str:
    """Register a logged model as a new version: alias `candidate`, tag `bridge.stage=None`, and
    a `register` record in the audit trail of the lake (`store`, else the environment's)."""
    return Registry(client, model_name, store or StorageSettings.from_env().open()).register(model_uri, tags)
