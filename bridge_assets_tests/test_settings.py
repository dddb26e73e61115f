"""Settings are declared once per variable: read from the mapping given (never the process
environment behind it), refused with the variable named, and documented with their defaults."""

import re
from pathlib import Path

import pytest

from bridge_assets.cadence_settings import CadenceSettings
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.container import TrainingSettings
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.tracking import MlflowSettings
from bridge_assets.monitoring.settings import MonitorSettings
from bridge_assets.settings import EnvSettings
from serving.deploy import ServingSettings
from serving.guards import ApiKeySettings
from serving.spool import SpoolSettings

ROOT = Path(__file__).resolve().parents[1]
DECLARED: list[type[EnvSettings]] = [  # serving: the cluster's too
    StorageSettings, MlflowSettings, MonitorSettings, PromotionSettings, ServingSettings, TrainingSettings, CadenceSettings,
    ApiKeySettings, SpoolSettings,
]  # fmt: skip


def test_values_are_typed_from_the_mapping_given_and_defaults_fill_the_rest(monkeypatch):
    monkeypatch.setenv("BRIDGE_MONITOR_WINDOW_SECONDS", "7")  # the process environment is not read
    settings = MonitorSettings.from_env({"BRIDGE_RETRAIN_WINDOW_HOURS": "off", "BRIDGE_RETRAIN_POLICY": "automatic",
                                         "BRIDGE_DRIFT_THRESHOLDS": '{"area": {"ks": 0.04}}', "BRIDGE_DECAY_TOLERANCE": " "})  # fmt: skip
    assert (settings.window_seconds, settings.retrain_window_hours, settings.retrain_policy) == (3600, None, "automatic")
    assert settings.drift.for_column("area").ks == 0.04 and settings.decay_tolerance == 0.10  # blank counts as unset
    assert MonitorSettings().window_seconds == 3600 and MonitorSettings(window_seconds=5).window_seconds == 5
    promotion = PromotionSettings.from_env({"BRIDGE_APPROVERS": "alice, bob,", "BRIDGE_REQUIRE_APPROVAL": "yes"})
    assert promotion.approvers == ("alice", "bob") and promotion.require_approval is True
    serving = ServingSettings.from_env({"BRIDGE_SERVE_HAPROXY": "0", "BRIDGE_RAY_TMPDIR": "relative/ray", "BRIDGE_SERVE_PORT": "8123"})
    assert serving.haproxy is False and serving.temp_dir.startswith("/") and serving.url == "http://127.0.0.1:8123"
    assert ServingSettings.from_env(serving.to_env()) == serving  # what a Dagster run or a replica is handed
    mlflow = MlflowSettings.from_env({"BRIDGE_HOME": "/nowhere", "AWS_ENDPOINT_URL_S3": "http://s3", "BRIDGE_S3_BUCKET": "b"})
    assert (mlflow.tracking_uri, mlflow.artifact_location) == ("sqlite:////nowhere/mlflow/mlflow.db", "s3://b/bridge/mlflow")
    assert mlflow.s3_endpoint_url == "http://s3" and MlflowSettings.from_env(mlflow.to_env()) == mlflow  # the alternative


@pytest.mark.parametrize(
    ("cls", "env", "message"),
    [
        (MonitorSettings, {"BRIDGE_MONITOR_WINDOW_SECONDS": "0"}, "BRIDGE_MONITOR_WINDOW_SECONDS: Input should be greater than 0 (got '0')"),
        (MonitorSettings, {"BRIDGE_RETRAIN_POLICY": "sometimes"}, "BRIDGE_RETRAIN_POLICY: Input should be 'manual' or 'automatic'"),
        (MonitorSettings, {"BRIDGE_RETRAIN_HALF_LIFE_HOURS": "-2"}, "BRIDGE_RETRAIN_HALF_LIFE_HOURS: Input should be greater than 0"),
        (PromotionSettings, {"BRIDGE_GATE_LATENCY_CALLS": "many"}, "BRIDGE_GATE_LATENCY_CALLS: Input should be a valid integer"),
        (PromotionSettings, {"BRIDGE_REQUIRE_APPROVAL": "maybe"}, "BRIDGE_REQUIRE_APPROVAL: Input should be a valid boolean"),
        (PromotionSettings, {"BRIDGE_AB_ALPHA": "1.5"}, "BRIDGE_AB_ALPHA: Input should be less than 1"),
        (PromotionSettings, {"BRIDGE_GUARDRAIL_CANARY_SHARE": "0.7"}, "BRIDGE_GUARDRAIL_CANARY_SHARE must be in (0, 0.5]"),
        (ServingSettings, {"BRIDGE_SERVE_MODEL_PLACEMENT": "gpu"}, "BRIDGE_SERVE_MODEL_PLACEMENT: Input should be 'ingress' or 'deployment'"),
        (ServingSettings, {"BRIDGE_SERVE_PORT": "http"}, "BRIDGE_SERVE_PORT: Input should be a valid integer"),
        (MlflowSettings, {"BRIDGE_MLFLOW_PORT": "99999"}, "BRIDGE_MLFLOW_PORT: Input should be less than or equal to 65535"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_variable(cls: type[EnvSettings], env: dict[str, str], message: str):
    with pytest.raises(ValueError) as refused:
        cls.from_env(env)
    assert str(refused.value).startswith(message), refused.value


def _documented(value: object) -> set[str]:
    """A default as the README's table may write it."""
    if value is None or value == ():
        return {"none", "unset"}
    if isinstance(value, bool):
        return {"1", "on"} if value else {"0", "off"}
    if isinstance(value, float) and value.is_integer():
        return {str(int(value))}
    return {str(value)}


def test_the_readme_table_lists_every_declared_variable_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme[readme.index("## Configuration") :].splitlines() if line.startswith("| `")]
    checked = 0
    for cls in DECLARED:
        for variable in cls.variables():
            (row,) = [r for r in rows if f"`{variable.name}`" in r.split("|")[1]] or [None]
            assert row is not None, f"{variable.name} ({cls.__name__}) is not in the README's configuration table"
            assert variable.description, f"{cls.__name__}.{variable.field} has no description"
            computed = cls.model_fields[variable.field].default_factory is not None  # e.g. the machine's cores
            if not (computed or variable.derived):  # derived: from other settings, described in words
                default_cell = row.split("|")[2]
                spellings = _documented(variable.default) | set(variable.alternatives)  # unset: the alternative's value
                assert any(re.search(rf"(?<![\d.]){re.escape(text)}", default_cell) for text in spellings), (
                    f"README gives {default_cell.strip()} as the default of {variable.name}; the code says {variable.default!r}"
                )
                checked += 1
    assert checked >= 40  # every default of the classes above but the computed ones was compared
