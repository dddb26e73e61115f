"""A trainer named by an entry point: scikit-learn's gradient boosting, the second built-in, goes
where bridge's network goes — a round with recency, fine-tuning and recalibration, Pipes,
MLflow, the registry, the pyfunc and the serving loader — and bad names fail before training."""

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from bridge_assets.core.boosting import BoostedModel, train_boosting
from bridge_assets.core.contract import FEATURES, TARGET, validate
from bridge_assets.core.metrics import LinearModel
from bridge_assets.core.model_api import CannotContinue, EntryPointError, Model, load_model, trainer_of
from bridge_assets.core.presets import BOOSTING_TRAINER, TrainConfig, preset
from bridge_assets.core.simulator import Simulator
from bridge_assets.core.training import TrainedModel, train_model
from bridge_assets.defs.training import TrainingRoundConfig
from bridge_assets.lake.feature_store import FeatureStore
from bridge_assets.ml.registry import CANDIDATE_ALIAS
from bridge_assets.ml.round import Incumbent, RoundPolicy, run_round
from bridge_assets.ml.tracking import MlflowSettings, load_registered
from bridge_assets_tests.test_training_mlflow import prepare_features, train_through_dagster
from serving.model import ServedModel

QUICK = preset("boosting", max_epochs=120)


def _rows(count: int, seed: int, batch: str, price_factor: float = 1.0) -> pl.DataFrame:
    rows = pl.concat(Simulator.fit().generate(count, seed=seed, batch_id=batch))
    rows = validate(rows.with_columns(pl.col(TARGET) * price_factor)).valid
    return rows.with_columns(pl.lit(batch).alias("batch_id"))


@pytest.fixture(scope="module")
def splits() -> dict[str, pl.DataFrame]:
    return {"train": _rows(1500, 1, "a"), "validation": _rows(400, 2, "b"), "test": _rows(400, 3, "c")}


def test_boosting_keeps_the_tree_count_validation_favours_and_loads_back_as_it_predicts(splits, tmp_path):
    model = train_boosting(splits["train"], splits["validation"], QUICK)
    again = train_boosting(splits["train"], splits["validation"], QUICK)
    assert isinstance(model, Model)
    val_losses = [h["val_loss"] for h in model.history]
    assert model.estimator.n_iter_ == model.best_epoch > 0  # refitted to the count it kept
    assert val_losses[model.best_epoch] == pytest.approx(min(val_losses), rel=QUICK.min_improvement)
    assert model.history[0]["train_loss"] is None and val_losses[model.best_epoch] < val_losses[0] / 2
    np.testing.assert_array_equal(model.predict(splits["test"]), again.predict(splits["test"]))  # from the seed

    files = model.save(tmp_path / "saved")
    assert set(files) == {"estimator", "model"}
    loaded = load_model(tmp_path / "saved")  # by the loader model.json names
    assert isinstance(loaded, BoostedModel) and loaded.config == QUICK
    np.testing.assert_array_equal(loaded.predict(splits["test"]), model.predict(splits["test"]))
    # It learned the signal: far better than the mean, near the log-linear model (which the
    # simulator's log-linear prices favour).
    actual = splits["test"][TARGET].to_numpy()
    mae = np.abs(model.predict(splits["test"]) - actual).mean()
    linear = LinearModel.fit(model.preprocessor.transform(splits["train"]), splits["train"][TARGET].to_numpy(), log_target=True)
    assert mae < 0.7 * np.abs(splits["train"][TARGET].mean() - actual).mean()
    assert mae < 1.15 * np.abs(linear.predict(model.preprocessor.transform(splits["test"])) - actual).mean()


def test_the_network_saves_its_loader_and_keeps_its_configuration_hash(splits, tmp_path):
    network = train_model(splits["train"], splits["validation"], preset("default", max_epochs=3))
    network.save(tmp_path / "net")
    loaded = load_model(tmp_path / "net")
    assert isinstance(loaded, TrainedModel)
    np.testing.assert_allclose(loaded.predict(splits["test"]), network.predict(splits["test"]), rtol=1e-6)
    # The network's configuration reads as before trainers were named: same dict, same hash.
    assert "trainer" not in preset("default").to_dict()
    assert TrainConfig.from_dict(preset("default").to_dict()) == preset("default")
    assert TrainConfig.from_dict(QUICK.to_dict()) == QUICK and QUICK.to_dict()["trainer"] == BOOSTING_TRAINER
    assert QUICK.config_hash() != preset("default", trainer=BOOSTING_TRAINER, max_epochs=120).config_hash()


def test_a_round_after_a_price_rise_recalibrates_fine_tunes_and_retrains_a_boosting_model(splits):
    old = run_round(pl.concat([splits["train"], splits["validation"], splits["test"]]).with_columns(
        pl.Series("split", ["train"] * 1500 + ["validation"] * 400 + ["test"] * 400)
    ), [QUICK]).best
    risen = _rows(1800, 4, "risen", price_factor=1.5)
    shares = ["train"] * 1000 + ["validation"] * 400 + ["test"] * 400
    rows = pl.concat([
        splits["train"].with_columns(pl.lit("train").alias("split")),
        risen.with_columns(pl.Series("split", shares)),
    ])  # fmt: skip
    policy = RoundPolicy(("recalibrate", "finetune", "scratch"), recent_batches=frozenset({"risen"}))
    result = run_round(rows, [QUICK], policy=policy, incumbent=Incumbent("1", old.model))
    by_option = {c.option: c for c in result.candidates}
    assert set(by_option) == {"recalibrate", "finetune", "scratch"} and result.validation == "recent"
    assert by_option["recalibrate"].model is old.model and by_option["recalibrate"].calibration is not None
    finetuned = by_option["finetune"].model
    assert isinstance(finetuned, BoostedModel) and finetuned.estimator.n_iter_ >= old.model.estimator.n_iter_
    before = float(np.sqrt(np.mean(np.square(old.model.predict(risen.tail(400)) - risen.tail(400)[TARGET].to_numpy()))))
    assert result.best.metrics["recent_test_rmse"] < 0.8 * before  # the round heals what the rise broke


def test_a_bad_trainer_name_fails_before_anything_trains():
    with pytest.raises(ValueError, match="trainer"):
        TrainingRoundConfig(trainer="not an entry point")
    with pytest.raises(EntryPointError, match="cannot import no_such_module"):
        trainer_of(preset("default", trainer="no_such_module:train"))
    with pytest.raises(EntryPointError, match="has no 'missing'"):
        trainer_of(preset("default", trainer="bridge_assets.core.boosting:missing"))
    with pytest.raises(CannotContinue, match="only continue a boosting model"):
        train_boosting(pl.DataFrame(), pl.DataFrame(), QUICK, warm_start=object())


@pytest.mark.parametrize("lake_env", ["local"], indirect=True)  # the S3 lake's artifacts: test_training_mlflow
def test_bridge_trainer_trains_the_round_through_pipes_and_the_registry_serves_it(store, lake_env, monkeypatch):
    """BRIDGE_TRAINER names the trainer: the round in its Pipes process boosts, MLflow keeps the
    estimator, and the registered version loads as a boosting model in the pyfunc and in the
    serving loader (what a Ray Serve replica runs), predicting alike."""
    feature_version = prepare_features(store)
    monkeypatch.setenv("BRIDGE_TRAINER", BOOSTING_TRAINER)
    result, metadata = train_through_dagster({"ops": {"candidate_model": {"config": {"presets": ["default"], "max_epochs": 80}}}})
    assert result.success
    client: MlflowClient = MlflowSettings.from_env().activate()
    run_id = metadata["mlflow_run_id"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")["trainer"] == BOOSTING_TRAINER
    assert [a.path for a in client.list_artifacts(run_id, "estimator")] == ["estimator/estimator.pkl"]

    version = metadata["model_version"]
    model, _ = load_registered("housing-price", version)
    assert isinstance(model, BoostedModel)
    sample = FeatureStore(store).scan(feature_version).head(40).collect()
    pyfunc = mlflow.pyfunc.load_model(f"models:/housing-price@{CANDIDATE_ALIAS}")
    as_sent = sample.select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String))
    np.testing.assert_allclose(pyfunc.predict(as_sent.to_pandas()), model.predict(sample), rtol=1e-9)
    served = ServedModel.load(client, "housing-price", version)
    np.testing.assert_allclose(served.predict_records(as_sent.to_dicts()), model.predict(sample), rtol=1e-9)
    assert served.info()["config"]["trainer"] == BOOSTING_TRAINER


def scratch_only(train_rows, validation_rows, config, preprocessor=None, *, sample_weights=None, warm_start=None):
    """A team's own trainer, outside bridge: boosting that never fine-tunes."""
    if warm_start is not None:
        raise CannotContinue("this trainer always starts from scratch")
    return train_boosting(train_rows, validation_rows, config, preprocessor, sample_weights=sample_weights)


def test_a_trainer_of_your_own_is_named_by_its_entry_point_and_may_decline_to_fine_tune(splits):
    own = preset("boosting", name="own", max_epochs=30, trainer=f"{__name__}:scratch_only")
    first = run_round(pl.concat([splits["train"].with_columns(pl.lit("train").alias("split")),
                                 splits["validation"].with_columns(pl.lit("validation").alias("split")),
                                 splits["test"].with_columns(pl.lit("test").alias("split"))]), [own]).best  # fmt: skip
    assert first.model.config.trainer == own.trainer
    later = _rows(600, 5, "later")
    rows = pl.concat([
        splits["train"].with_columns(pl.lit("train").alias("split")),
        later.with_columns(pl.Series("split", ["train"] * 200 + ["validation"] * 200 + ["test"] * 200)),
    ])  # fmt: skip
    policy = RoundPolicy(("finetune", "scratch"), recent_batches=frozenset({"later"}))
    result = run_round(rows, [own], policy=policy, incumbent=Incumbent("1", first.model))
    assert [c.option for c in result.candidates] == ["scratch"]
    assert result.skipped == {"finetune": "this trainer always starts from scratch"}
