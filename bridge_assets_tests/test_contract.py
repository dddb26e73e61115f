import polars as pl
import pytest

from bridge_assets.core.contract import COLUMNS, ContractError, validate

REFERENCE_REQUEST = {
    "mainroad": "yes", "guestroom": "no", "basement": "yes", "hotwaterheating": "no",
    "airconditioning": "yes", "prefarea": "no", "furnishingstatus": "furnished",
    "area": 1200, "bedrooms": 3, "bathrooms": 2, "stories": 2, "parking": 1,
}  # fmt: skip


def rows(*changes: dict) -> pl.DataFrame:
    records = [{"row_id": f"r{i}", **REFERENCE_REQUEST, "price": 4_000_000, **change} for i, change in enumerate(changes)]
    return pl.DataFrame(records)


def test_reference_example_request_is_valid_although_its_area_is_below_the_data():
    checked = validate(rows({}))
    assert checked.quarantined.is_empty()
    assert checked.valid.columns == list(COLUMNS)
    assert checked.valid["area"].item() == 1200.0


def test_categories_in_any_case_and_padding_normalise_to_one_spelling():
    checked = validate(rows({"mainroad": " YES ", "basement": "No", "furnishingstatus": "  Semi-Furnished"}))
    assert checked.quarantined.is_empty()
    row = checked.valid.row(0, named=True)
    assert (row["mainroad"], row["basement"], row["furnishingstatus"]) == ("yes", "no", "semi-furnished")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"bedrooms": 10}, "bedrooms outside 0-9"),
        ({"stories": 5}, "stories outside 1-4"),
        ({"stories": 0}, "stories outside 1-4"),
        ({"parking": -1}, "parking outside 0-9"),
        ({"area": 0}, "area must be > 0"),
        ({"area": 100_001}, "area above 100000"),
        ({"price": -5}, "price must be > 0"),
        ({"price": None}, "price is missing"),
        ({"mainroad": "Y"}, "mainroad not one of yes/no"),
        ({"furnishingstatus": "partly"}, "furnishingstatus not one of furnished/semi-furnished/unfurnished"),
        ({"bathrooms": 1.5}, "bathrooms is not a whole number"),
    ],
)
def test_each_violation_is_quarantined_with_its_reason(change, reason):
    checked = validate(rows({}, change))
    assert checked.valid["row_id"].to_list() == ["r0"]
    assert checked.quarantined["row_id"].to_list() == ["r1"]
    assert checked.quarantined["reason"].item() == reason


def test_text_that_is_not_a_number_is_quarantined_with_the_value_kept():
    frame = rows({}, {}).with_columns(pl.all().cast(pl.String))
    frame = frame.with_columns(pl.when(pl.col("row_id") == "r1").then(pl.lit("abc")).otherwise(pl.col("area")).alias("area"))
    checked = validate(frame)
    assert checked.quarantined["reason"].to_list() == ["area is not a number"]
    assert checked.quarantined["area"].to_list() == ["abc"]
    assert checked.reason_counts() == {"area is not a number": 1}


def test_duplicate_row_ids_are_quarantined_after_the_first():
    frame = rows({}, {}).with_columns(pl.lit("same").alias("row_id"))
    checked = validate(frame)
    assert checked.valid.height == 1
    assert checked.quarantined["reason"].to_list() == ["duplicate row_id"]


def test_price_may_be_absent_when_labels_are_withheld_but_not_when_required():
    unlabelled = rows({}).drop("price")
    assert validate(unlabelled, require_target=False).valid["price"].to_list() == [None]
    with pytest.raises(ContractError, match="price"):
        validate(unlabelled)


def test_missing_feature_column_fails_the_whole_batch():
    with pytest.raises(ContractError, match="bedrooms"):
        validate(rows({}).drop("bedrooms"))


def test_non_finite_and_unreadable_numbers_are_quarantined_with_their_reasons():
    frame = rows({}, {"area": float("nan")}, {"area": float("inf")}, {"price": float("inf")}, {"bedrooms": float("nan")})
    text = rows({}, {"bathrooms": "2.5"}, {"stories": " 3 "}).with_columns(pl.all().cast(pl.String))
    assert validate(frame).quarantined["reason"].to_list() == [
        "area must be > 0", "area must be > 0", "price must be > 0", "bedrooms is not a whole number; bedrooms outside 0-9"
    ]
    checked = validate(text)
    assert checked.valid["row_id"].to_list() == ["r0", "r2"] and checked.valid["stories"].to_list() == [2, 3]
    assert checked.quarantined["reason"].to_list() == ["bathrooms is not a whole number"]
