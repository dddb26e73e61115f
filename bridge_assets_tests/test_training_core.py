"""The trainer, model and metrics of the ML core (no MLflow, no Dagster)."""

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from bridge_assets.core.contract import TARGET, validate
from bridge_assets.core.features import reference_split
from bridge_assets.core.metrics import LinearModel, regression_metrics
from bridge_assets.core.presets import TrainConfig, preset
from bridge_assets.core.simulator import SEED_ROWS, load_seed_data
from bridge_assets.core.training import PriceNet, TrainedModel, train_model


@pytest.fixture(scope="module")
def splits() -> dict[str, pl.DataFrame]:
    rows = validate(load_seed_data()).valid.with_columns(pl.Series("split", reference_split(SEED_ROWS)))
    return {name: rows.filter(pl.col("split") == name) for name in ("train", "validation", "test")}


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    actual, predicted = rng.normal(5, 2, 200), rng.normal(5, 2, 200)
    scores = regression_metrics(actual, predicted)
    assert scores["mae"] == pytest.approx(mean_absolute_error(actual, predicted))
    assert scores["rmse"] == pytest.approx(np.sqrt(mean_squared_error(actual, predicted)))
    assert scores["r2"] == pytest.approx(r2_score(actual, predicted))


def test_linear_baseline_equals_scikit_learn_least_squares():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 5))
    target = features @ np.arange(1, 6) + rng.normal(size=300) + 50
    ours = LinearModel.fit(features, target).predict(features)
    theirs = LinearRegression().fit(features, target).predict(features)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_reference_preset_is_the_bridgeai_network():
    config = preset("reference")
    net = PriceNet(20, config.hidden, config.linear_skip)
    widths = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(20, 64), (64, 32), (32, 16), (16, 8), (8, 1)]
    assert (config.learning_rate, config.batch_size, config.patience, config.log_target) == (0.01, 64, 10, False)


def test_training_is_deterministic_from_the_seed(splits):
    config = preset("reference", max_epochs=30)
    first = train_model(splits["train"], splits["validation"], config)
    again = train_model(splits["train"], splits["validation"], config)
    other = train_model(splits["train"], splits["validation"], preset("reference", max_epochs=30, seed=7))
    np.testing.assert_array_equal(first.predict(splits["test"]), again.predict(splits["test"]))
    assert not np.array_equal(first.predict(splits["test"]), other.predict(splits["test"]))


def test_the_best_validation_weights_are_kept_even_without_early_stopping(splits):
    config = preset("reference", max_epochs=40, patience=1000)  # early stopping never fires
    model = train_model(splits["train"], splits["validation"], config)
    losses = [h["val_loss"] for h in model.history]
    assert len(model.history) == 41 and model.best_epoch == int(np.argmin(losses))
    net = model.network()
    x_val = torch.from_numpy(model.preprocessor.transform(splits["validation"]).astype(np.float32))
    y_val = np.log(splits["validation"][TARGET].to_numpy()) if config.log_target else splits["validation"][TARGET].to_numpy()
    scaled = torch.from_numpy(((y_val - model.target_mean) / model.target_std).astype(np.float32))
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(net(x_val), scaled)) == pytest.approx(min(losses), rel=1e-5)


def test_default_preset_starts_from_the_log_linear_baseline_and_never_does_worse_on_validation(splits):
    model = train_model(splits["train"], splits["validation"], preset("default"))
    start = train_model(splits["train"], splits["validation"], preset("default", max_epochs=0))  # before any step
    baseline = LinearModel.fit(
        model.preprocessor.transform(splits["train"]), splits["train"][TARGET].to_numpy(), log_target=True
    )
    # The network before its first step is the log-linear baseline, and it is the full run's epoch 0.
    np.testing.assert_allclose(start.predict(splits["validation"]), baseline.predict(model.preprocessor.transform(splits["validation"])), rtol=1e-6)
    assert model.history[0] == start.history[0] and model.history[0]["epoch"] == 0
    ours = regression_metrics(splits["validation"][TARGET].to_numpy(), model.predict(splits["validation"]))
    linear = regression_metrics(
        splits["validation"][TARGET].to_numpy(), baseline.predict(model.preprocessor.transform(splits["validation"]))
    )
    assert ours["rmse"] <= linear["rmse"] * 1.01


def test_saved_model_predicts_exactly_as_before(splits, tmp_path):
    model = train_model(splits["train"], splits["validation"], preset("reference", max_epochs=5))
    files = model.save(tmp_path)
    restored = TrainedModel.load(files["weights"], files["model"])
    np.testing.assert_array_equal(restored.predict(splits["test"]), model.predict(splits["test"]))
    assert restored.config == model.config and restored.history == model.history


def test_config_hash_changes_with_any_field():
    base = TrainConfig()
    assert base.config_hash() == TrainConfig.from_dict(base.to_dict()).config_hash()
    assert base.config_hash() != preset("default", learning_rate=0.004).config_hash()
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_a_round_refuses_two_configurations_with_one_name(splits):
    from bridge_assets.ml.round import run_round

    rows = pl.concat([splits["train"], splits["validation"], splits["test"]])
    with pytest.raises(ValueError, match="unique"):
        run_round(rows, [preset("default"), preset("default", hidden=(64, 32))])


def test_a_round_picks_the_best_candidate_the_baseline_gate_would_pass(splits):
    from bridge_assets.ml.round import Candidate, RoundResult

    model = train_model(splits["train"], splits["validation"], preset("default", max_epochs=2))
    baselines = {"linear": {"val_rmse": 100.0, "val_mae": 80.0}, "log_linear": {"val_rmse": 102.0, "val_mae": 78.0}}

    def candidate(name: str, rmse: float, mae: float) -> Candidate:
        return Candidate(preset("default", name=name), model, {"val_rmse": rmse, "val_mae": mae})

    lowest_rmse = candidate("lowest-rmse", 95.0, 79.0)  # worse MAE than the log-linear baseline
    beats_both = candidate("beats-both", 98.0, 77.0)
    assert RoundResult([lowest_rmse, beats_both], baselines, "hash").best is beats_both
    assert RoundResult([lowest_rmse, candidate("worse", 99.0, 79.5)], baselines, "hash").best is lowest_rmse  # none qualifies
