"""What the API accepts: the BridgeAI house (validated field by field by pydantic) and MLflow's
four scoring shapes, both held to the data contract's fields, bounds and levels."""

from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from bridge_assets.core.contract import AREA_MAX, COUNT_BOUNDS, FEATURES


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
    area: float = Field(gt=0, le=AREA_MAX, allow_inf_nan=False, description=f"0 < area ≤ {AREA_MAX:.0f}")
    bedrooms: int = _count("bedrooms")
    bathrooms: int = _count("bathrooms")
    stories: int = _count("stories")
    parking: int = _count("parking")


class BatchRequest(BaseModel):
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


SCORING_REQUEST = {"requestBody": {"required": True, "content": {"application/json": {"schema": _scoring_request_schema()}}}}


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
