"""Drift-aware training in the ML core: recency weights and windows, the recalibration stage,
warm starts, and a round that chooses among them on the rows Production never saw."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LinearRegression

from bridge_assets.core.calibration import Recalibration
from bridge_assets.core.contract import TARGET, validate
from bridge_assets.core.features import prepare_batch
from bridge_assets.core.metrics import LinearModel, regression_metrics
from bridge_assets.core.presets import OPTIONS, preset
from bridge_assets.core.recency import Recency
from bridge_assets.core.simulator import Drift, Simulator
from bridge_assets.core.training import train_model
from bridge_assets.ml.round import Candidate, Incumbent, RoundPolicy, RoundResult, clearly_better, run_round

NOW = datetime(2025, 6, 1, tzinfo=UTC)
RISE = Drift(price_factor=1.5)
QUICK = preset("default", max_epochs=40)


def rows(n: int, seed: int, batch_id: str, seen_at: datetime, drift: Drift | None = None) -> pl.DataFrame:
    """Feature rows as the feature table holds them (hash split, batch id, seen_at)."""
    frame = pl.concat(list(Simulator.fit().generate(n, seed=seed, batch_id=batch_id, drift=drift)))
    return prepare_batch(validate(frame).valid, batch_id, seen_at=seen_at).rows


def part(frame: pl.DataFrame, split: str) -> pl.DataFrame:
    return frame.filter(pl.col("split") == split)


@pytest.fixture(scope="module")
def world() -> dict[str, pl.DataFrame]:
    """3,000 rows at the old price level (last week), 400 labelled after a 50% rise (today),
    1,500 held-out post-rise rows to score on, and 3,000 post-rise rows for the oracle."""
    return {
        "old": rows(3000, 1, "old", NOW - timedelta(days=7)),
        "new": rows(400, 2, "new", NOW, RISE),
        "test": rows(1500, 3, "test", NOW, RISE),
        "oracle": rows(3000, 4, "oracle", NOW, RISE),
    }


@pytest.fixture(scope="module")
def production(world: dict[str, pl.DataFrame]):
    return train_model(part(world["old"], "train"), part(world["old"], "validation"), QUICK)


def rmse(predictions: np.ndarray, frame: pl.DataFrame) -> float:
    return regression_metrics(frame[TARGET].to_numpy(), predictions)["rmse"]


def test_weighted_least_squares_is_scikit_learns_with_sample_weights():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 4))
    target = features @ np.array([1.0, -2.0, 0.5, 3.0]) + rng.normal(size=400) + 10
    weights = rng.uniform(0.01, 1.0, 400)
    ours = LinearModel.fit(features, target, weights=weights).predict(features)
    theirs = LinearRegression().fit(features, target, sample_weight=weights).predict(features)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    # Weight 0 is the same as leaving the row out.
    kept = weights > 0.5
    np.testing.assert_allclose(
        LinearModel.fit(features, target, weights=np.where(kept, 1.0, 0.0)).predict(features),
        LinearModel.fit(features[kept], target[kept]).predict(features),
        rtol=1e-9,
    )


def test_recency_halves_a_weight_per_half_life_and_drops_rows_outside_the_window():
    seen = pl.Series([NOW, NOW - timedelta(hours=24), NOW - timedelta(hours=48), None], dtype=pl.Datetime("us", "UTC"))
    np.testing.assert_allclose(Recency(half_life_hours=24).weights(seen), [1.0, 0.5, 0.25, 0.25])  # no time: the oldest
    np.testing.assert_allclose(Recency(half_life_hours=24, window_hours=30).weights(seen), [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(Recency().weights(seen), [1.0] * 4)
    assert Recency().active is False and Recency(window_hours=1).describe() == "window 1 h"
    later = pl.Series([t + timedelta(days=30) for t in seen[:3]] + [None], dtype=pl.Datetime("us", "UTC"))
    np.testing.assert_allclose(Recency(half_life_hours=24).weights(later), Recency(half_life_hours=24).weights(seen))  # ages from the newest row
    with pytest.raises(ValueError, match="positive number of hours"):
        Recency(half_life_hours=0)


def test_sample_weights_pull_training_towards_the_weighted_rows(world):
    mixed = pl.concat([world["old"], world["new"]])
    train, validation = part(mixed, "train"), part(world["new"], "validation")
    recent = (train["batch_id"] == "new").to_numpy()
    plain = train_model(train, validation, QUICK)
    weighted = train_model(train, validation, QUICK, sample_weights=np.where(recent, 1.0, 0.01))
    test = world["test"]
    assert rmse(weighted.predict(test), test) < 0.75 * rmse(plain.predict(test), test)
    with pytest.raises(ValueError, match="one sample weight per training row"):
        train_model(train, validation, QUICK, sample_weights=np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        train_model(train, validation, QUICK, sample_weights=-np.ones(train.height))


def test_a_window_trains_from_scratch_and_fits_baselines_only_on_recent_rows(world):
    mixed = pl.concat([world["old"], world["new"]])
    policy = RoundPolicy(("scratch",), Recency(window_hours=24), frozenset({"new"}))
    result = run_round(mixed, [QUICK], policy=policy)
    recent_train = part(world["new"], "train").height
    assert result.rows["train"] == recent_train == result.candidates[0].trained_rows
    assert result.validation == "recent" and result.rows["validation"] == part(world["new"], "validation").height
    # The baselines (and preprocessing) saw the window alone: as if only the new batch existed.
    only_new = run_round(world["new"], [QUICK])
    for name in ("linear", "log_linear"):
        assert result.baselines[name]["val_rmse"] == pytest.approx(only_new.baselines[name]["val_rmse"], rel=1e-9)
    assert result.candidates[0].metrics["val_rmse"] == pytest.approx(only_new.candidates[0].metrics["val_rmse"], rel=1e-6)


def test_recalibration_recovers_a_pure_level_shift_within_2_percent_of_the_oracle(world, production):
    new_train = part(world["new"], "train")
    stage = Recalibration.fit(new_train[TARGET].to_numpy(), production.predict(new_train))
    oracle = train_model(part(world["oracle"], "train"), part(world["oracle"], "validation"), QUICK)
    test = world["test"]
    recalibrated, no_retrain, best = (rmse(p, test) for p in (stage.apply(production.predict(test)), production.predict(test), oracle.predict(test)))
    assert recalibrated <= 1.02 * best < 0.7 * no_retrain
    assert stage.kind == "log_offset" and np.exp(stage.offset) == pytest.approx(1.5, rel=0.05)
    linear = Recalibration.fit(new_train[TARGET].to_numpy(), production.predict(new_train), "log_linear")
    assert linear.kind == "log_linear" and rmse(linear.apply(production.predict(test)), test) <= 1.05 * best


def test_a_recalibration_stage_saves_and_loads_exactly(tmp_path):
    stage = Recalibration("log_linear", 0.4, 0.97, 120, "training rows of feedback-1")
    loaded = Recalibration.load(stage.save(tmp_path / "calibration.json"))
    assert loaded == stage and Recalibration.load_optional(tmp_path) == stage
    assert Recalibration.load_optional(tmp_path / "elsewhere") is None
    np.testing.assert_allclose(stage.apply(np.array([1e6])), np.exp(0.4 + 0.97 * np.log(1e6)))
    with pytest.raises(ValueError, match="at least two rows"):
        Recalibration.fit(np.array([1.0]), np.array([2.0]))


def test_warm_start_begins_at_the_incumbent_and_only_improves_on_recent_rows(world, production):
    new_train, new_validation = part(world["new"], "train"), part(world["new"], "validation")
    tuned = train_model(new_train, new_validation, preset("default", name="tuned", max_epochs=40), warm_start=production)
    assert tuned.preprocessor is production.preprocessor and (tuned.target_mean, tuned.target_std) == (production.target_mean, production.target_std)
    # Epoch 0 is the incumbent itself on the new validation rows; the kept weights are never worse.
    before = train_model(new_train, new_validation, preset("default", max_epochs=0), warm_start=production)
    np.testing.assert_allclose(before.predict(world["test"]), production.predict(world["test"]), rtol=1e-6)
    assert min(h["val_loss"] for h in tuned.history) < tuned.history[0]["val_loss"]
    assert rmse(tuned.predict(world["test"]), world["test"]) < 0.8 * rmse(production.predict(world["test"]), world["test"])
    with pytest.raises(ValueError, match="another network"):
        train_model(new_train, new_validation, preset("reference"), warm_start=production)


def test_a_round_after_a_level_shift_recalibrates_production_and_says_why(world, production):
    mixed = pl.concat([world["old"], world["new"]])
    policy = RoundPolicy(recency=Recency(half_life_hours=24), recent_batches=frozenset({"new"}), options=("recalibrate", "finetune", "scratch"))
    result = run_round(mixed, [QUICK], policy=policy, incumbent=Incumbent("1", production))
    assert [c.option for c in result.candidates] == ["recalibrate", "finetune", "scratch"]
    recalibrated = result.candidates[0]
    assert recalibrated.model is production and recalibrated.trained_rows == 0 and np.exp(recalibrated.calibration.offset) == pytest.approx(1.5, rel=0.05)
    assert result.validation == "recent" and result.incumbent == "1"
    # The choice: a costlier option only where it is clearly better than the cheaper one chosen.
    best = result.best
    cheaper = [c for c in result.candidates if OPTIONS.index(c.option) < OPTIONS.index(best.option)]
    assert all(clearly_better(best.val_errors, c.val_errors, 0.01) for c in cheaper)
    test = world["test"]
    for candidate in (recalibrated, best):
        assert rmse(candidate.predict_encoded(candidate.model.preprocessor.transform(test)), test) < 0.7 * rmse(production.predict(test), test)
    table = result.choice_table()
    assert table.count("**chosen**") == 1 and "v1-recalibrated" in table and "recent test RMSE" in table
    assert result.reason().startswith(f"{best.config.name} ({best.option}): validation RMSE")
    # Without an incumbent, the options that need one are reported as not run; without rows it
    # never saw, the round is the plain one and does not claim to replace it.
    alone = run_round(mixed, [QUICK], policy=policy)
    assert set(alone.skipped) == {"recalibrate", "finetune"} and "not run: no Production" in alone.choice_table()
    nothing_new = run_round(world["old"], [QUICK], policy=RoundPolicy(policy.options), incumbent=Incumbent("1", production))
    assert (nothing_new.incumbent, nothing_new.validation, set(nothing_new.skipped)) == (None, "all", {"recalibrate", "finetune"})


def test_a_costlier_option_wins_only_by_more_than_min_gain_and_beyond_chance(production):
    baselines = {"linear": {"val_rmse": 1e9, "val_mae": 1e9}}
    rng = np.random.default_rng(7)
    base = rng.normal(0, 100, 200)

    def candidate(option: str, errors: np.ndarray) -> Candidate:
        scores = {"val_rmse": float(np.sqrt(np.mean(errors**2))), "val_mae": float(np.mean(np.abs(errors)))}
        return Candidate(preset("default", name=f"{option}-{len(errors)}"), production, scores, option, val_errors=errors)

    recalibrated = candidate("recalibrate", base)
    policy = RoundPolicy(("recalibrate", "finetune", "scratch"), min_gain=0.01)

    def chosen(*others: Candidate, min_gain: float = 0.01) -> Candidate:
        return RoundResult([*others, recalibrated], baselines, "hash", policy=RoundPolicy(policy.options, min_gain=min_gain)).best

    assert chosen(candidate("finetune", base * 0.997)) is recalibrated  # 0.3% better: not worth it
    clearly = candidate("scratch", base * 0.9)  # 10% better on every row
    assert chosen(candidate("finetune", base * 0.997), clearly) is clearly
    assert chosen(clearly, min_gain=0.2) is recalibrated
    lucky = candidate("scratch", 0.95 * rng.permutation(base))  # 5% lower RMSE, but on other rows than it is paired with
    assert lucky.metrics["val_rmse"] < 0.99 * recalibrated.metrics["val_rmse"] and chosen(lucky) is recalibrated
    assert clearly_better(base * 0.9, base, 0.01) and not clearly_better(lucky.val_errors, base, 0.01)
