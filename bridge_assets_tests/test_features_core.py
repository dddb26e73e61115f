import numpy as np
import polars as pl
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from bridge_assets.core.contract import CATEGORICAL_FEATURES, NUMERIC_FEATURES, validate
from bridge_assets.core.features import (
    Preprocessor,
    assign_split,
    drop_exact_duplicates,
    prepare_batch,
    reference_split,
    stable_hash64,
)
from bridge_assets.core.simulator import SEED_ROWS, load_seed_data


def fnv1a_fmix64(text: str) -> int:
    """Plain-Python reference of the split hash."""
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) % 2**64
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        value ^= value >> 33
        value = (value * multiplier) % 2**64
    return value ^ (value >> 33)


def test_split_hash_matches_a_plain_python_reference():
    ids = ["", "a", "housing-seed-0000", "sim-x-000000001", "ünïcode-✓"]
    assert stable_hash64(pl.Series(ids)).tolist() == [fnv1a_fmix64(i) for i in ids]


def test_split_never_changes_for_a_row_as_data_grows():
    ids = pl.Series([f"batch-{i:06d}" for i in range(2000)])
    alone = assign_split(ids[:100])
    within_more = assign_split(ids)[:100]
    assert alone.to_list() == within_more.to_list()


def test_split_proportions_follow_80_20_then_80_20():
    shares = assign_split(pl.Series([f"sim-{i:09d}" for i in range(200_000)])).value_counts(normalize=True)
    share = dict(zip(shares["split"], shares["proportion"]))
    assert share["train"] == pytest.approx(0.64, abs=0.005)
    assert share["validation"] == pytest.approx(0.16, abs=0.005)
    assert share["test"] == pytest.approx(0.20, abs=0.005)


def test_reference_split_reproduces_scikit_learn_twice_applied():
    labels = reference_split(SEED_ROWS)
    positions = np.arange(SEED_ROWS)
    rest, test = train_test_split(positions, test_size=0.2, random_state=42)
    train, validation = train_test_split(rest, test_size=0.2, random_state=42)
    assert (len(train), len(validation), len(test)) == (348, 88, 109)
    assert set(np.flatnonzero(labels == "test")) == set(test)
    assert set(np.flatnonzero(labels == "validation")) == set(validation)
    assert set(np.flatnonzero(labels == "train")) == set(train)


def test_exact_duplicates_go_but_same_features_with_other_price_stay():
    seed = validate(load_seed_data()).valid
    doubled = pl.concat([seed, seed.head(10).with_columns(pl.col("row_id") + "-copy")])
    kept, dropped = drop_exact_duplicates(doubled)
    assert dropped == 10 and kept.height == SEED_ROWS
    features_only = [c for c in seed.columns if c not in ("row_id", "price")]
    assert seed.select(features_only).is_duplicated().sum() == 12  # six pairs differing in price


def test_duplicates_of_earlier_batches_are_dropped_from_a_new_one():
    seed = validate(load_seed_data()).valid
    new = seed.head(5).with_columns(pl.col("row_id") + "-again")
    prepared = prepare_batch(new, "later", earlier=seed.lazy())
    assert prepared.duplicates_dropped == 5 and prepared.rows.is_empty()


def test_delayed_labels_join_by_row_id_and_unlabelled_rows_wait():
    seed = validate(load_seed_data()).valid.head(10)
    unlabelled = seed.with_columns(pl.lit(None, dtype=pl.Float64).alias("price"))
    labels = seed.head(6).select("row_id", "price")
    prepared = prepare_batch(unlabelled, "b", labels=labels)
    assert prepared.awaiting_label == 4
    assert prepared.rows["price"].to_list() == seed.head(6)["price"].to_list()


def test_preprocessor_equals_scikit_learn_column_transformer_fitted_on_train():
    seed = validate(load_seed_data()).valid
    train = seed.filter(pl.Series(reference_split(SEED_ROWS) == "train"))
    ours = Preprocessor.fit(train)
    reference = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), list(NUMERIC_FEATURES)),
            (
                "cat",
                make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
                list(CATEGORICAL_FEATURES),
            ),
        ],
        sparse_threshold=0,
    ).fit(train.to_pandas())
    names = [n.split("__", 1)[1] for n in reference.get_feature_names_out()]
    expected = reference.transform(seed.to_pandas())[:, [names.index(n) for n in ours.feature_names]]
    np.testing.assert_allclose(ours.transform(seed), expected, rtol=0, atol=1e-9)
    assert len(ours.feature_names) == 20


def test_preprocessor_state_round_trips_and_one_row_encodes_like_many():
    seed = validate(load_seed_data()).valid
    fitted = Preprocessor.fit(seed)
    restored = Preprocessor.from_dict(fitted.to_dict())
    one_row = seed.slice(7, 1).with_columns(pl.col("mainroad").cast(pl.String).str.to_uppercase() + " ")
    np.testing.assert_allclose(restored.transform(one_row), fitted.transform(seed)[7:8], rtol=1e-12)


def test_a_matrix_large_enough_to_be_mapped_encodes_like_small_ones():
    seed = validate(load_seed_data()).valid
    fitted = Preprocessor.fit(seed)
    matrix = fitted.transform(pl.concat([seed] * 60))  # 32,700 rows x 20 float64: over 4 MiB
    assert matrix.flags.f_contiguous and matrix.flags.writeable
    np.testing.assert_array_equal(matrix, np.tile(fitted.transform(seed), (60, 1)))


def test_fitting_on_an_empty_training_split_is_a_clear_error():
    empty = validate(load_seed_data()).valid.head(0)
    with pytest.raises(ValueError, match="empty training split"):
        Preprocessor.fit(empty)
