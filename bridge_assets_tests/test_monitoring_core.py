"""Monitoring maths without servers: the fast whylogs path against stock whylogs, drift
effect sizes on simulated shifts, and the label-free error estimate."""

import json

import numpy as np
import pandas as pd
import polars as pl
import pytest

from bridge_assets.core.contract import FEATURES, TARGET
from bridge_assets.core.simulator import Drift
from bridge_assets.monitoring.alarms import Alarm
from bridge_assets.monitoring.decay import error_stats, judge_realised
from bridge_assets.monitoring.drift import DriftSettings, profile_drift
from bridge_assets.monitoring.profiles import MONITORED_COLUMNS, PREDICTION
from bridge_assets.monitoring.retrain import FULL_ROUND, RetrainAttempt, decide_retrain, plan_retrain
from bridge_assets.monitoring.settings import drift_settings_from_json
from bridge_assets.monitoring.whylogs_compat import profile_frame, stock_profile
from bridge_assets_tests.monitoring_support import rmse, trained, window_frame

EXACT_SUMMARY = ("counts/", "types/", "cardinality/", "frequent_items/", "distribution/mean", "distribution/stddev", "distribution/n", "distribution/max", "distribution/min", "ints/")


def summaries_match(ours, stock, frame: pl.DataFrame) -> None:
    """Counts, types, cardinality, frequent items, mean/sd/min/max exactly; quantiles within
    the KLL sketch's rank error (its compaction is randomised: two stock runs differ too)."""
    left, right = ours.to_pandas().sort_index(), stock.to_pandas().sort_index()
    assert list(left.index) == list(right.index)
    exact = [c for c in right.columns if c.startswith(EXACT_SUMMARY)]
    pd.testing.assert_frame_equal(left[exact].astype(str), right[exact].astype(str))
    for column in frame.columns:
        values = frame[column].drop_nulls()
        if values.dtype != pl.Float64 or values.is_empty():
            continue
        ordered = np.sort(values.to_numpy())
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            estimate = left.loc[column, f"distribution/q_{int(q * 100):02d}" if q != 0.5 else "distribution/median"]
            rank = np.searchsorted(ordered, estimate, side="right") / len(ordered)
            assert abs(rank - q) < 0.03, (column, q, rank)


def test_fast_profiles_equal_stock_whylogs_and_read_back_with_stock_deserialize():
    from whylogs.core.view.dataset_profile_view import DatasetProfileView as StockView

    frame = window_frame(4000, seed=11).select(FEATURES).with_columns(pl.col(pl.Enum).cast(pl.String), pl.lit(1.5).alias(PREDICTION))
    frame = frame.with_columns(pl.Series(PREDICTION, np.linspace(1e6, 9e6, frame.height)))
    # Columns off the fast path still go through stock code: nulls, long text, infinities.
    odd = frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(None).otherwise(pl.col("mainroad")).alias("mainroad"),
        pl.when(pl.int_range(pl.len()) % 5 == 0).then(None).otherwise(pl.col("area")).alias("area"),
        pl.when(pl.int_range(pl.len()) % 11 == 0).then(float("inf")).otherwise(pl.col(PREDICTION)).alias(PREDICTION),
        (pl.lit("x" * 200) + pl.col("furnishingstatus")).alias("long_text"),
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(None).otherwise(pl.col("bedrooms")).alias("bedrooms"),
    )
    for data in (frame, odd):
        ours = profile_frame(data)
        summaries_match(ours, stock_profile(data), data)
        read_back = StockView.deserialize(ours.serialize())
        pd.testing.assert_frame_equal(read_back.to_pandas().sort_index(), ours.to_pandas().sort_index())
    counts = profile_frame(odd).get_column(PREDICTION).get_metric("counts")
    assert counts.inf.value == len(range(0, odd.height, 11))


@pytest.fixture(scope="module")
def reference():
    return trained()[1]


def window_profile(model, rows: int, seed: int, drift: Drift | None = None):
    frame = window_frame(rows, seed, drift)
    return profile_frame(frame.select(FEATURES).with_columns(pl.Series(PREDICTION, model.predict(frame)))), frame


def test_covariate_shift_is_flagged_on_its_feature_and_a_plain_window_is_not(reference):
    model = trained()[0]
    settings = DriftSettings()
    plain, _ = window_profile(model, 3000, seed=21)
    assert [d.column for d in profile_drift(reference.profile, plain, list(MONITORED_COLUMNS), settings) if d.drifted] == []

    shifted, _ = window_profile(model, 3000, seed=22, drift=Drift(area_factor=1.35))
    drift = {d.column: d for d in profile_drift(reference.profile, shifted, list(MONITORED_COLUMNS), settings)}
    assert [c for c, d in drift.items() if d.drifted and c in FEATURES] == ["area"]
    assert drift["area"].ks > 0.15 and drift["area"].psi > drift["bedrooms"].psi
    assert drift[PREDICTION].ks > drift["bedrooms"].ks  # larger houses, higher predicted prices

    furnished, _ = window_profile(model, 3000, seed=23, drift=Drift(category_weights={"furnishingstatus": {"furnished": 0.8, "semi-furnished": 0.1, "unfurnished": 0.1}}))
    assert [d.column for d in profile_drift(reference.profile, furnished, list(FEATURES), settings) if d.drifted] == ["furnishingstatus"]


def test_thresholds_come_from_configuration(reference):
    model = trained()[0]
    shifted, _ = window_profile(model, 3000, seed=22, drift=Drift(area_factor=1.35))
    lenient = drift_settings_from_json('{"area": {"ks": 0.9, "psi": 50}}')
    assert not any(d.drifted for d in profile_drift(reference.profile, shifted, ["area"], lenient))


def test_loss_estimate_tracks_realised_rmse_under_covariate_shift(reference):
    model = trained()[0]
    for seed, drift in ((31, Drift(shift={"area": 0.8})), (32, Drift(shift={"bathrooms": 1.0, "stories": 0.5}))):
        frame = window_frame(5000, seed, drift)
        predictions = model.predict(frame)
        realised = rmse(predictions, frame[TARGET].to_numpy())
        estimated = reference.estimator.estimate_rmse(frame, predictions)
        assert estimated == pytest.approx(realised, rel=0.15)
    # and it moved with the shift: the shifted windows' error is not the held-out error
    assert abs(realised / reference.metrics["rmse"] - 1) > 0.02


def test_realised_decay_needs_enough_labels_and_a_confident_excess():
    rng = np.random.default_rng(0)
    few = error_stats(rng.normal(0, 3.0, 50))
    assert not judge_realised(few, baseline_rmse=1.0, min_labels=200, tolerance=0.1).judged
    worse = error_stats(rng.normal(0, 1.5, 2000))
    same = error_stats(rng.normal(0, 1.0, 2000))
    assert judge_realised(worse, 1.0, 200, 0.1).decayed and not judge_realised(same, 1.0, 200, 0.1).decayed
    assert same.rmse_ci[0] < 1.0 < same.rmse_ci[1]


def test_retrain_policy_never_storms():
    alarms = [Alarm("1", "production", "realised decay", "live RMSE 3,000,000 > test RMSE 1,000,000 +10%")]
    assert decide_retrain("manual", alarms, open_retrains=0, seconds_since_last_request=None, cooldown_seconds=60).action == "alert"
    assert decide_retrain("automatic", alarms, open_retrains=0, seconds_since_last_request=None, cooldown_seconds=60).action == "request"
    assert decide_retrain("automatic", alarms, open_retrains=1, seconds_since_last_request=None, cooldown_seconds=60).action == "skip"
    assert decide_retrain("automatic", alarms, open_retrains=0, seconds_since_last_request=10, cooldown_seconds=60).action == "skip"
    assert decide_retrain("automatic", [], open_retrains=0, seconds_since_last_request=None, cooldown_seconds=60).action == "skip"


def test_the_retrain_plan_recalibrates_first_and_escalates_only_when_that_did_not_fix_it():
    decayed = [Alarm("1", "production", "realised decay", "live RMSE 3,000,000 > test RMSE 1,000,000 +10%")]
    first = plan_retrain(decayed, None)
    assert (first.action, first.options) == ("recalibrate", ("recalibrate",))
    drifted = Alarm("1", "production", "feature drift", "KS 0.2", column="area")
    assert plan_retrain([drifted], None).options == FULL_ROUND  # no labels to fit on

    def attempt(**changes) -> RetrainAttempt:
        return RetrainAttempt(**{"version": "3", "option": "recalibrate", "gates_passed": True, "served": True, "decayed": False, **changes})

    assert plan_retrain(decayed, attempt(gates_passed=None)).action == "skip"  # its gates decide first
    handled = plan_retrain(decayed, attempt())
    assert handled.action == "skip" and "no realised decay of its own" in handled.reason
    for outcome, why in ((attempt(gates_passed=False, served=False), "blocked by its gates"), (attempt(decayed=True), "decays too")):
        escalated = plan_retrain(decayed + [Alarm("3", "staging", "realised decay", "…")], outcome)
        assert (escalated.action, escalated.options) == ("full", FULL_ROUND) and why in escalated.reason


def test_an_alarm_is_data_for_code_and_a_sentence_for_people():
    """retrain_sensor reads alarms back from metadata as records; people read the sentence."""
    drifted = Alarm("1", "production", "feature drift", "KS 0.21 > 0.1", column="area")
    assert drifted.text == "v1/production: feature drift in area (KS 0.21 > 0.1)" and drifted.family == "drift"
    decayed = Alarm("12", "staging", "realised decay", "live RMSE 3.0M")
    assert decayed.text == "v12/staging: realised decay (live RMSE 3.0M)" and decayed.family == "decay"
    assert [Alarm.from_dict(json.loads(json.dumps(a.to_dict()))) for a in (drifted, decayed)] == [drifted, decayed]
