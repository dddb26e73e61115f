"""What the API accepts: the BridgeAI house (validated field by field by pydantic) and MLflow's
four scoring shapes, both held to the data contract's fields, bounds and levels.

Types are strict where a lax parse would change the meaning: a boolean is not a count, a
string is not a number (`"bedrooms": true` and `"area": "1200"` are refused, an integral
`3.0` is a count), and a field the contract does not know is refused by name, not ignored.
Categories keep their case folding (`" YES"` is `yes`)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic_core import PydanticCustomError

from bridge_assets.core.contract import FEATURES, SPEC, plain_number
from bridge_assets.core.contract_spec import CategoryRule, ContractSpec, IntegerRule, NumberRule


def _normalised(value: Any) -> Any:
    """The contract's one spelling of a category: stripped and lower-cased."""
    return value.strip().lower() if isinstance(value, str) else value


def _a_number(value: Any) -> Any:
    """JSON numbers only: pydantic's lax mode would read `true` as 1 and `"1200"` as 1200."""
    if isinstance(value, bool | str):
        kind = "boolean" if isinstance(value, bool) else "string"
        raise PydanticCustomError("number_type", "must be a JSON number, not a {kind}", {"kind": kind})
    return value


# Bounds go on the fields (not inside `Annotated` after the validator), so OpenAPI says them in
# JSON Schema's words (minimum, exclusiveMinimum, maximum) for clients and schema-driven fuzzers.
Number = Annotated[float, BeforeValidator(_a_number)]
Count = Annotated[int, BeforeValidator(_a_number)]


def _request_field(name: str, rule: NumberRule | IntegerRule | CategoryRule) -> tuple[Any, Any]:
    """One feature of the request model: its type and constraints as the contract states them."""
    if isinstance(rule, CategoryRule):
        return Annotated[Literal.__getitem__(rule.levels), BeforeValidator(_normalised)], ...
    if isinstance(rule, IntegerRule):
        return Count, Field(ge=rule.ge, le=rule.le, description=f"{rule.ge}–{rule.le}")
    if rule.gt is not None:
        low = f"{plain_number(rule.gt)} < "
    elif rule.ge is not None:
        low = f"{plain_number(rule.ge)} ≤ "
    else:
        low = ""
    high = f" ≤ {plain_number(rule.le)}" if rule.le is not None else ""
    field = Field(gt=rule.gt, ge=rule.ge, le=rule.le, allow_inf_nan=False, description=f"{low}{name}{high}")
    return Number, field


def request_model(spec: ContractSpec) -> type[BaseModel]:
    """The request model of a contract's features: categories first, as the BridgeAI clients
    send them, then the numbers."""
    categories = [name for name, rule in spec.features.items() if isinstance(rule, CategoryRule)]
    order = [*categories, *(name for name in spec.features if name not in categories)]
    fields: dict[str, Any] = {name: _request_field(name, spec.features[name]) for name in order}
    example: dict[str, Any] | None = {"example": dict(spec.example)} if spec.example else None
    return create_model("RequestFeatures", __config__=ConfigDict(extra="forbid", json_schema_extra=example), **fields)


class HouseFeatures(request_model(SPEC)):  # type: ignore[misc]
    """One house, as the BridgeAI clients send it (categories in any case); the fields, their
    bounds and levels are the data contract's."""


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[HouseFeatures] = Field(min_length=1)


SCORING_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


def _scoring_request_schema() -> dict[str, Any]:
    """MLflow's scoring request as OpenAPI (for /docs and for fuzzing from the schema); the
    handler parses the body itself, so the same rules hold for bodies that break it."""
    records = {"type": "array", "minItems": 1, "items": HouseFeatures.model_json_schema()}
    split = {
        "type": "object",
        "required": ["columns", "data"],
        "properties": {
            "columns": {"type": "array", "items": {"type": "string", "enum": list(FEATURES)}},
            "data": {"type": "array", "items": {"type": "array"}},
        },
    }
    shapes = {"dataframe_records": records, "instances": records, "inputs": records, "dataframe_split": split}
    return {
        "oneOf": [
            {"type": "object", "required": [key], "properties": {key: shape}, "additionalProperties": False}
            for key, shape in shapes.items()
        ]
    }


SCORING_REQUEST = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": _scoring_request_schema()}}}
}


class ScoringShapeError(ValueError):
    """The body is not one of MLflow's scoring shapes (MLflow's BAD_REQUEST, 400)."""


class InvalidRows(ValueError):
    """Rows of a well-formed scoring request that break the contract (422, naming row and field)."""

    def __init__(self, error: ValidationError) -> None:
        self.detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
        faults = [
            f"row {e['loc'][0]}: {'.'.join(map(str, e['loc'][1:])) or 'row'} ({e['msg']})" for e in error.errors()
        ]
        shown = "; ".join(faults[:10]) + (f"; and {len(faults) - 10} more" if len(faults) > 10 else "")
        super().__init__(f"invalid input: {shown}")


_ROWS = TypeAdapter(list[HouseFeatures])


def scoring_records(payload: Any) -> list[dict[str, Any]]:
    """The rows of an MLflow scoring request, as sent: exactly one of the four input keys;
    ScoringShapeError saying what is malformed."""
    if not isinstance(payload, dict):
        raise ScoringShapeError("the request body must be a JSON object")
    keys = [k for k in SCORING_KEYS if k in payload]
    if len(keys) != 1:
        raise ScoringShapeError(
            f"the request must have exactly one of {', '.join(SCORING_KEYS)}; got {', '.join(keys) or 'none'}"
        )
    key, data = keys[0], payload[keys[0]]
    if key == "dataframe_split":
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("columns"), list)
            or not isinstance(data.get("data"), list)
        ):
            raise ScoringShapeError("dataframe_split needs 'columns' (a list of names) and 'data' (a list of rows)")
        columns = data["columns"]
        for index, row in enumerate(data["data"]):
            if not isinstance(row, list) or len(row) != len(columns):
                found = f"{len(row)} values" if isinstance(row, list) else "not a list"
                raise ScoringShapeError(f"dataframe_split: row {index} has {found} for {len(columns)} columns")
        records = [dict(zip(columns, row, strict=True)) for row in data["data"]]
    elif isinstance(data, dict):  # inputs/instances as columns: {"area": [...], ...}
        lengths = {len(v) if isinstance(v, list) else 1 for v in data.values()}
        if len(lengths) > 1:
            raise ScoringShapeError(f"{key}: every column needs the same number of values")
        columns = [v if isinstance(v, list) else [v] for v in data.values()]
        records = [dict(zip(data, values, strict=True)) for values in zip(*columns, strict=True)]
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        records = data
    else:
        raise ScoringShapeError(f"{key} must be a list of records or an object of columns")
    if not records:
        raise ScoringShapeError(f"{key} holds no rows")
    return records


def valid_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` held to the request schema (strict types, known fields, bounds), normalised;
    InvalidRows naming each row and field at fault."""
    try:
        return [house.model_dump() for house in _ROWS.validate_python(records)]
    except ValidationError as error:
        raise InvalidRows(error) from None
