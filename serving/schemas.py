"""What the API accepts: the BridgeAI house (validated field by field by pydantic) and MLflow's
four scoring shapes, both held to the data contract's fields, bounds and levels.

Types are strict where a lax parse would change the meaning: a boolean is not a count, a
string is not a number (`"bedrooms": true` and `"area": "1200"` are refused, an integral
`3.0` is a count), and a field the contract does not know is refused by name, not ignored.
Categories keep their case folding (`" YES"` is `yes`)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from bridge_assets.core.contract import AREA_MAX, COUNT_BOUNDS, FEATURES


def _normalised(value: Any) -> Any:
    """The contract's one spelling of a category: stripped and lower-cased."""
    return value.strip().lower() if isinstance(value, str) else value


def _a_number(value: Any) -> Any:
    """JSON numbers only: pydantic's lax mode would read `true` as 1 and `"1200"` as 1200."""
    if isinstance(value, bool | str):
        kind = "boolean" if isinstance(value, bool) else "string"
        raise PydanticCustomError("number_type", "must be a JSON number, not a {kind}", {"kind": kind})
    return value


YesNo = Annotated[Literal["yes", "no"], BeforeValidator(_normalised)]
Furnishing = Annotated[Literal["furnished", "semi-furnished", "unfurnished"], BeforeValidator(_normalised)]
# Bounds go on the fields (not inside `Annotated` after the validator), so OpenAPI says them in
# JSON Schema's words (minimum, exclusiveMinimum, maximum) for clients and schema-driven fuzzers.
Area = Annotated[float, BeforeValidator(_a_number)]


Count = Annotated[int, BeforeValidator(_a_number)]


def _count(name: str) -> Any:
    """The contract's bounds of one count feature, as the field's constraints."""
    low, high = COUNT_BOUNDS[name]
    return Field(ge=low, le=high, description=f"{low}–{high}")


class HouseFeatures(BaseModel):
    """One house, as the BridgeAI clients send it (yes/no in any case)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "mainroad": "yes",
                "guestroom": "no",
                "basement": "yes",
                "hotwaterheating": "no",
                "airconditioning": "yes",
                "prefarea": "no",
                "furnishingstatus": "furnished",
                "area": 1200,
                "bedrooms": 3,
                "bathrooms": 2,
                "stories": 2,
                "parking": 1,
            }
        },
    )
    mainroad: YesNo
    guestroom: YesNo
    basement: YesNo
    hotwaterheating: YesNo
    airconditioning: YesNo
    prefarea: YesNo
    furnishingstatus: Furnishing
    area: Area = Field(gt=0, le=AREA_MAX, allow_inf_nan=False, description=f"0 < area ≤ {AREA_MAX:.0f}")
    bedrooms: Count = _count("bedrooms")
    bathrooms: Count = _count("bathrooms")
    stories: Count = _count("stories")
    parking: Count = _count("parking")


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
