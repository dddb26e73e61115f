import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from bridge_assets.core.contract import FEATURES, TARGET, validate
from bridge_assets.core.features import Preprocessor
from bridge_assets.core.simulator import BLOCK_ROWS, Drift, Simulator, load_seed_data, simulate

CONTRACT = [*FEATURES, TARGET]


@pytest.fixture(scope="module")
def simulator() -> Simulator:
    return Simulator.fit()


@pytest.fixture(scope="module")
def big(simulator: Simulator) -> pl.DataFrame:
    return pl.concat(simulator.generate(100_000, seed=11))


def test_a_linear_model_trained_on_simulated_rows_explains_the_real_ones(big):
    real = load_seed_data()
    encode = Preprocessor.fit(big)
    model = LinearRegression().fit(encode.transform(big), big[TARGET].to_numpy())
    assert r2_score(real[TARGET].to_numpy(), model.predict(encode.transform(real))) >= 0.66  # README: ≈ 0.68


def test_simulated_rows_are_drawn_not_resampled(big):
    real = load_seed_data()
    copies = big.select(CONTRACT).join(real.select(CONTRACT).unique(), on=CONTRACT, how="semi").height
    assert copies == 0  # README: no simulated row equals a real one
    assert big["area"].n_unique() > 5 * real["area"].n_unique()


def test_marginals_and_dependencies_resemble_the_real_data(big):
    real = load_seed_data()
    for column in ("bedrooms", "furnishingstatus", "airconditioning"):
        sim_share = big[column].value_counts(normalize=True).sort(column)["proportion"].to_numpy()
        real_share = real[column].value_counts(normalize=True).sort(column)["proportion"].to_numpy()
        np.testing.assert_allclose(sim_share, real_share, atol=0.02)
    sim_corr = big.select(pl.corr("area", "price")).item()
    real_corr = real.select(pl.corr("area", "price")).item()
    assert sim_corr == pytest.approx(real_corr, abs=0.1)


def test_every_simulated_row_is_valid_and_ids_are_unique(big):
    assert validate(big).quarantined.is_empty()
    assert big["row_id"].n_unique() == big.height


def test_deterministic_from_seed_across_blocks(simulator):
    rows = BLOCK_ROWS + 10
    first = pl.concat(simulator.generate(rows, seed=3))
    again = pl.concat(simulator.generate(rows, seed=3))
    other = pl.concat(simulator.generate(rows, seed=4))
    assert first.equals(again) and not first.equals(other)
    assert first["row_id"][-1] == f"sim-{rows - 1:09d}" and first["row_id"].is_unique().all()


def test_corrupt_rows_are_exactly_the_ones_quarantined(simulator):
    clean = pl.concat(simulator.generate(20_000, seed=5))
    dirty = pl.concat(simulator.generate(20_000, seed=5, corrupt_fraction=0.03))
    changed = dirty.join(clean, on=dirty.columns, how="anti", nulls_equal=True)
    checked = validate(dirty)
    assert 400 < changed.height < 800
    assert sorted(checked.quarantined["row_id"]) == sorted(changed["row_id"])


def test_case_noise_is_normalised_back(simulator):
    clean = pl.concat(simulator.generate(5_000, seed=6))
    noisy = pl.concat(simulator.generate(5_000, seed=6, case_noise=0.3))
    assert not noisy.equals(clean)
    assert validate(noisy).valid.equals(validate(clean).valid)


def test_drift_knobs_move_the_distribution_but_stay_in_the_domain(simulator):
    base = pl.concat(simulator.generate(50_000, seed=8))
    drift = Drift(
        shift={"bedrooms": 1.0},
        area_factor=1.3,
        category_weights={"furnishingstatus": {"furnished": 0.8, "semi-furnished": 0.2}},
        price_factor=1.2,
    )
    drifted = pl.concat(simulator.generate(50_000, seed=8, drift=drift))
    assert validate(drifted).quarantined.is_empty()
    assert drifted["bedrooms"].mean() > base["bedrooms"].mean() + 0.3
    assert drifted["area"].median() == pytest.approx(1.3 * base["area"].median(), rel=0.05)
    assert drifted["furnishingstatus"].value_counts(normalize=True).filter(
        pl.col("furnishingstatus") == "furnished"
    )["proportion"].item() == pytest.approx(0.8, abs=0.02)
    assert "unfurnished" not in drifted["furnishingstatus"].to_list()
    assert drifted["price"].median() > 1.2 * base["price"].median()


def test_concept_drift_changes_the_price_relationship_only(simulator):
    base = pl.concat(simulator.generate(50_000, seed=9))
    drifted = pl.concat(simulator.generate(50_000, seed=9, drift=Drift(concept={"airconditioning": 0.0})))
    assert drifted.drop("price").equals(base.drop("price"))

    def premium(frame: pl.DataFrame) -> float:
        means = frame.group_by("airconditioning").agg(pl.col("price").log().mean())
        return means.filter(pl.col("airconditioning") == "yes")["price"].item() - means.filter(
            pl.col("airconditioning") == "no"
        )["price"].item()

    assert premium(drifted) < premium(base) - 0.1


def test_drift_on_unknown_features_or_invalid_factors_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        Drift(shift={"garden": 1.0})
    with pytest.raises(ValueError):
        Drift(area_factor=0)


def test_simulate_convenience_returns_one_frame():
    frame = simulate(1234, seed=1, batch_id="nb")
    assert frame.height == 1234 and frame["row_id"][0] == "nb-000000000"
