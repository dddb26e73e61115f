"""Settings are declared once per variable: read from the mapping given (never the process
environment behind it), refused with the variable named, and documented with their defaults."""

import re
from pathlib import Path

import pytest

from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.monitoring.settings import MonitorSettings
from bridge_assets.settings import EnvSettings

ROOT = Path(__file__).resolve().parents[1]
DECLARED: list[type[EnvSettings]] = [MonitorSettings, PromotionSettings]


def test_values_are_typed_from_the_mapping_given_and_defaults_fill_the_rest(monkeypatch):
    monkeypatch.setenv("BRIDGE_MONITOR_WINDOW_SECONDS", "7")  # the process environment is not read
    settings = MonitorSettings.from_env({"BRIDGE_RETRAIN_WINDOW_HOURS": "off", "BRIDGE_RETRAIN_POLICY": "automatic",
                                         "BRIDGE_DRIFT_THRESHOLDS": '{"area": {"ks": 0.04}}', "BRIDGE_DECAY_TOLERANCE": " "})  # fmt: skip
    assert (settings.window_seconds, settings.retrain_window_hours, settings.retrain_policy) == (3600, None, "automatic")
    assert settings.drift.for_column("area").ks == 0.04 and settings.decay_tolerance == 0.10  # blank counts as unset
    assert MonitorSettings().window_seconds == 3600 and MonitorSettings(window_seconds=5).window_seconds == 5
    promotion = PromotionSettings.from_env({"BRIDGE_APPROVERS": "alice, bob,", "BRIDGE_REQUIRE_APPROVAL": "yes"})
    assert promotion.approvers == ("alice", "bob") and promotion.require_approval is True


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
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_variable(cls: type[EnvSettings], env: dict[str, str], message: str):
    with pytest.raises(ValueError) as refused:
        cls.from_env(env)
    assert str(refused.value).startswith(message), refused.value


def _documented(value: object) -> str:
    """A default as the README's table writes it."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_readme_table_lists_every_declared_variable_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme[readme.index("## Configuration") :].splitlines() if line.startswith("| `")]
    checked = 0
    for cls in DECLARED:
        for variable in cls.variables():
            (row,) = [r for r in rows if f"`{variable.name}`" in r.split("|")[1]] or [None]
            assert row is not None, f"{variable.name} ({cls.__name__}) is not in the README's configuration table"
            assert variable.description, f"{cls.__name__}.{variable.field} has no description"
            if isinstance(variable.default, (int, float, str, tuple, type(None))):
                default_cell = row.split("|")[2]
                assert re.search(rf"(?<![\d.]){re.escape(_documented(variable.default))}", default_cell), (
                    f"README gives {default_cell.strip()} as the default of {variable.name}; the code says {variable.default!r}"
                )
                checked += 1
    assert checked >= 25  # every scalar default of the classes above was compared
