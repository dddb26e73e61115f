"""A data set's contract is a file: the housing contract is one, and a bad file is refused
before anything runs, naming the file and the field at fault."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge_assets.core import contract
from bridge_assets.core.contract_spec import HOUSING, ContractFileError, load_contract

VALID = """
name = "tiny"
version = "1"
[target]
name = "y"
type = "number"
[features.x]
type = "number"
gt = 0
[features.colour]
type = "category"
levels = ["red", "blue"]
"""


def test_the_housing_contract_is_the_file_the_rules_come_from():
    spec = load_contract(HOUSING)
    assert contract.FEATURES == tuple(spec.features) and contract.TARGET == spec.target.name == "price"
    assert contract.COUNT_BOUNDS["stories"] == (1, 4) and contract.CONTRACT.upper_bound("area") == 100_000
    assert contract.CATEGORY_LEVELS["furnishingstatus"] == ("furnished", "semi-furnished", "unfurnished")
    assert contract.CONTRACT_VERSION == spec.version and set(contract.SLICES) <= set(contract.CATEGORY_LEVELS)


def test_a_contract_with_other_columns_loads(tmp_path: Path):
    path = tmp_path / "tiny.toml"
    path.write_text(VALID)
    spec = load_contract(path)
    assert list(spec.features) == ["x", "colour"] and spec.row_id == "row_id"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('levels = ["red", "blue"]', 'levels = ["red", "Blue "]'), "features.colour: levels must be lower-case"),
        (("gt = 0", 'gt = "zero"'), "features.x.gt: Input should be a valid number"),
        (('type = "category"', 'type = "text"'), "features.colour: Input tag 'text' found using 'type'"),
        (('version = "1"', 'version = "1"\nslices = ["x"]'), "slices must name category features: ['x']"),
        (('name = "y"', 'name = "x"'), "a column is named twice (row id, time, target or feature): ['x']"),
        (('version = "1"', 'version = "1"\ncolour = "red"'), "colour: Extra inputs are not permitted"),
        (("gt = 0", "gt = 5\nle = 2"), "features.x: the lower bound 5 is not below le = 2"),
        (('version = "1"', "version = [1"), "not valid TOML"),
        (
            ('version = "1"', 'version = "1"\n[simulation]\ncorruptions = [{ column = "z" }]'),
            "simulation.corruptions name columns that are not the target or a feature: ['z']",
        ),
    ],
)
def test_a_bad_contract_file_is_refused_naming_the_file_and_the_field(tmp_path: Path, change, message):
    path = tmp_path / "bad.toml"
    path.write_text(VALID.replace(*change, 1))
    with pytest.raises(ContractFileError) as refused:
        load_contract(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value), refused.value


def test_a_missing_contract_file_is_named(tmp_path: Path):
    with pytest.raises(ContractFileError, match=r"missing\.toml: cannot be read"):
        load_contract(tmp_path / "missing.toml")


def test_the_request_schema_is_the_contracts():
    """Every feature is a request field with the contract's bounds or levels, and nothing else is."""
    from serving.schemas import HouseFeatures

    schema = HouseFeatures.model_json_schema()
    fields, spec = schema["properties"], load_contract(HOUSING)
    assert set(fields) == set(spec.features) == set(schema["required"])
    assert (fields["stories"]["minimum"], fields["stories"]["maximum"]) == (1, 4)
    assert (fields["area"]["exclusiveMinimum"], fields["area"]["maximum"]) == (0, 100_000)
    assert fields["furnishingstatus"]["enum"] == list(spec.features["furnishingstatus"].levels)
    assert schema["additionalProperties"] is False and schema["example"] == spec.example


def test_a_second_data_set_is_validated_and_quarantined_by_its_own_contract():
    """The diabetes data (shipped with its contract) passes whole; rows breaking its rules are
    quarantined with reasons in its own column names, none dropped."""
    import polars as pl

    from bridge_assets.core.contract import Contract
    from bridge_assets.core.contract_spec import CONTRACTS

    diabetes = Contract(load_contract(CONTRACTS / "diabetes.toml"))
    rows = pl.read_csv(HOUSING.parents[1] / "data" / "diabetes.csv").with_row_index("row_id")
    rows = rows.with_columns(pl.col("row_id").cast(pl.String))
    checked = diabetes.validate(rows)
    assert checked.valid.height == 442 and checked.quarantined.is_empty()
    assert checked.valid.columns == ["row_id", *diabetes.features, "progression"]
    assert checked.valid.schema["sex"] == pl.Enum(["1", "2"]) and checked.valid.schema["age"] == pl.Int64
    broken = rows.head(4).with_columns(
        pl.Series("sex", ["3", " 1", "2", "2"]),
        pl.Series("bmi", [20.0, 21.0, -1.0, None]),
        pl.Series("age", [40, 40, 40, 130]),
    )
    checked = diabetes.validate(broken)
    assert checked.valid["row_id"].to_list() == ["1"] and checked.valid["sex"].to_list() == ["1"]
    assert checked.quarantined["reason"].to_list() == [
        "sex not one of 1/2",
        "bmi must be > 0",
        "age outside 0-120; bmi is missing",
    ]


def test_a_contract_makes_its_own_request_model():
    """The API request a contract defines: its fields with its rules, strict types, nothing else."""
    from pydantic import ValidationError

    from bridge_assets.core.contract_spec import CONTRACTS
    from serving.schemas import request_model

    spec = load_contract(CONTRACTS / "diabetes.toml")
    request = request_model(spec)
    assert set(request.model_json_schema()["properties"]) == set(spec.features)
    assert request.model_validate(dict(spec.example)).model_dump()["sex"] == "2"
    for change, field in [({"sex": "3"}, "sex"), ({"age": True}, "age"), ({"bmi": "32"}, "bmi"), ({"pool": 1}, "pool")]:
        with pytest.raises(ValidationError, match=field):
            request.model_validate({**spec.example, **change})


def test_bridge_contract_checks_a_file_and_a_csv_before_anything_runs(tmp_path: Path, capsys):
    """`bridge contract`: the rules as read, a CSV's valid and quarantined rows with reasons; a bad
    file exits 2 naming the file and the field."""
    from bridge_assets.cli import main
    from bridge_assets.core.contract_spec import CONTRACTS

    data = HOUSING.parents[1] / "data"
    assert main(["contract", "--data", str(data / "HousingData.csv")]) == 0
    assert "HousingData.csv: 545 rows, 545 valid, 0 quarantined" in capsys.readouterr().out
    csv = tmp_path / "patients.csv"
    csv.write_text(
        (data / "diabetes.csv").read_text().splitlines()[0]
        + "\n59,3,32.1,101.0,157,93.2,38.0,4.0,4.8598,87,151\n40,1,x,90,150,90,40,4,4.5,80,100\n"
    )
    assert main(["contract", str(CONTRACTS / "diabetes.toml"), "--data", str(csv)]) == 0
    out = capsys.readouterr().out
    assert (
        "contract diabetes, version 1: predicts progression (number > 0)" in out
        and "  sex: category, one of 1 | 2" in out
    )
    assert "patients.csv: 2 rows, 0 valid, 2 quarantined" in out
    assert "  1 × sex not one of 1/2" in out and "  1 × bmi is not a number" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(VALID.replace("gt = 0", "gt = 5\nle = 1"))
    assert main(["contract", str(bad)]) == 2
    assert f"{bad}: features.x: the lower bound 5 is not below le = 1" in capsys.readouterr().err


def test_a_bad_bridge_contract_stops_a_command_before_it_lands_anything(tmp_path: Path):
    """`BRIDGE_CONTRACT` naming a bad file: the command exits 2 naming the file and the field,
    and the lake stays empty."""
    bad = tmp_path / "bad.toml"
    bad.write_text(VALID.replace('type = "category"', 'type = "text"'))
    home = tmp_path / "home"
    env = {**os.environ, "BRIDGE_ENV_FILE": "", "BRIDGE_HOME": str(home), "BRIDGE_CONTRACT": str(bad)}
    run = subprocess.run(
        [sys.executable, "-m", "bridge_assets.cli", "land-seed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert f"bridge: {bad}: features.colour: Input tag 'text' found using 'type'" in run.stderr
    assert not (home / "lake").exists()


def test_a_contract_in_dotenv_is_the_clis_and_refused_where_it_would_come_too_late(tmp_path: Path):
    """`.env` is read before the CLI imports bridge, so its contract is the CLI's; `make serve`
    imports bridge first and refuses it, saying so, instead of serving another contract."""
    from bridge_assets.core.contract_spec import CONTRACTS

    dotenv = tmp_path / ".env"
    dotenv.write_text(f"BRIDGE_CONTRACT={CONTRACTS / 'diabetes.toml'}\n")
    env = {**os.environ, "BRIDGE_ENV_FILE": str(dotenv), "BRIDGE_HOME": str(tmp_path / "home")}
    env.pop("BRIDGE_CONTRACT", None)
    cli = subprocess.run(
        [sys.executable, "-m", "bridge_assets.cli", "contract"], env=env, capture_output=True, text=True, check=False
    )
    assert cli.returncode == 0 and "contract diabetes, version 1" in cli.stdout, cli.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "serving.deploy"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert serve.returncode != 0
    assert f"BRIDGE_CONTRACT={CONTRACTS / 'diabetes.toml'} in {dotenv} comes after this process loaded" in serve.stderr
