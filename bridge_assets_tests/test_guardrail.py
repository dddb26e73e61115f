"""The post-deploy guardrail's judgement on interaction records as the service writes them (one
record per request, per row for batches): the new version against the previous one over the same
seconds. The canary against the real Ray Serve, and the rollback it triggers, are in
test_promotion_serving.py."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from bridge_assets.lake.interactions import SCHEMA
from bridge_assets.ml.guardrail import Watch, WatchTally, judge, watch_of
from bridge_assets.ml.promotion_settings import PromotionSettings
from bridge_assets.ml.registry import PRODUCTION, AuditRecord
from serving.interactions import record

START = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WATCH = Watch("2", "1", START, START + timedelta(minutes=30))
SETTINGS = PromotionSettings()  # 50 requests a side, +2% errors, p95 model time × 1.5 + 1 ms, alpha 0.01


def _requests(version: str, count: int, model_ms: float | np.ndarray, errors: int = 0, client_errors: int = 0,
              rows: int = 1, start: datetime = START, variant: str | None = None) -> list[dict]:  # fmt: skip
    """`count` requests a second apart: the first `errors` are 503s, the next `client_errors` 422s."""
    times = np.broadcast_to(np.asarray(model_ms, dtype=float), (count,))
    out = []
    for i in range(count):
        status = 503 if i < errors else 422 if i < errors + client_errors else 200
        for row in range(rows):
            out.append(record(request_id=f"{version}-{start:%H%M}-{i}", endpoint="/predict" if rows == 1 else "/predict/batch",
                              status=status, model_name="m", model_version=version,
                              variant=variant or ("production" if version == "2" else "previous"), latency_ms=50.0,
                              model_ms=float(times[i]) if status < 400 else None, row_index=row, timestamp=start + timedelta(seconds=i)))  # fmt: skip
    return out


def _tally(*records: list[dict]) -> WatchTally:
    tally = WatchTally(WatchTally.key(WATCH))
    tally.add(pl.DataFrame([r for part in records for r in part], schema=SCHEMA), WATCH)
    return tally


def _verdict(*records: list[dict], settings: PromotionSettings = SETTINGS):
    return judge(_tally(*records), WATCH, settings)


rng = np.random.default_rng(7)
CONTROL = _requests("1", 120, rng.lognormal(np.log(0.4), 0.3, 120), errors=1)


def test_a_version_as_healthy_as_its_predecessor_passes():
    verdict = _verdict(CONTROL, _requests("2", 1000, rng.lognormal(np.log(0.4), 0.3, 1000), errors=10))
    assert verdict.decided and not verdict.breach and verdict.reason.startswith("healthy")


def test_both_slowed_by_a_busy_machine_is_no_breach_but_one_slower_over_the_same_seconds_is():
    busy = 6.0  # a CPU hog beside the service: every model pass takes six times as long, for both
    slowed = _verdict(_requests("1", 120, busy * rng.lognormal(np.log(0.4), 0.3, 120)), _requests("2", 1000, busy * rng.lognormal(np.log(0.4), 0.3, 1000)))
    assert slowed.decided and not slowed.breach, slowed.reason
    heavier = _verdict(CONTROL, _requests("2", 1000, rng.lognormal(np.log(9.0), 0.3, 1000)))
    assert heavier.breach and "p95 model time" in heavier.reason and "Mann-Whitney" in heavier.reason
    assert "v2: 1000 requests" in heavier.reason and "v1: 120 requests" in heavier.reason  # both versions' figures


def test_more_server_errors_is_a_breach_only_beyond_the_margin_and_beyond_chance():
    worse = _verdict(CONTROL, _requests("2", 1000, 0.4, errors=80))  # 8% against 0.8%
    assert worse.breach and "server-error rate 8.0% against 0.8%" in worse.reason and "Fisher" in worse.reason
    assert not _verdict(CONTROL, _requests("2", 1000, 0.4, errors=25)).breach  # +1.7%: within the 2% margin
    # 3 errors in 60 control requests, 5 in 60 new ones: +3.3% is past the margin, but chance explains it
    chance = _verdict(_requests("1", 60, 0.4, errors=3), _requests("2", 60, 0.4, errors=5))
    assert chance.decided and not chance.breach, chance.reason


def test_too_few_requests_on_either_side_decide_nothing():
    verdict = _verdict(_requests("1", 20, 0.4), _requests("2", 1000, 0.4, errors=1000))
    assert not verdict.decided and not verdict.breach and "too few requests" in verdict.reason


def test_client_errors_and_batch_rows_do_not_count_against_the_model():
    # 100 requests refused as malformed (422), and 60 batch requests of 10 rows, one failing
    tally = _tally(CONTROL, _requests("2", 160, 0.4, errors=1, client_errors=100, rows=10))
    assert (tally.new.requests, tally.new.server_errors, tally.new.timed) == (60, 1, 0)  # batches: no model time compared
    assert not judge(tally, WATCH, SETTINGS).breach


def test_records_before_the_watch_or_of_other_variants_are_ignored():
    before = _requests("2", 100, 0.4, errors=100, start=START - timedelta(hours=1))
    staging = _requests("2", 100, 0.4, errors=100, variant="staging")
    tally = _tally(CONTROL, _requests("2", 100, 0.4), before, staging)
    assert (tally.new.requests, tally.new.server_errors, tally.previous.requests) == (100, 0, 120)


def test_a_tally_added_in_parts_equals_one_read_at_once_and_survives_its_cursor():
    new = _requests("2", 300, rng.lognormal(np.log(0.5), 0.5, 300), errors=4)
    whole = _tally(CONTROL, new)
    parts = WatchTally.from_json(_tally(CONTROL[:50], new[:100]).to_json())
    parts.add(pl.DataFrame(CONTROL[50:] + new[100:], schema=SCHEMA), WATCH)
    assert parts.to_json() == whole.to_json()
    assert whole.new.timed == 296 and abs(whole.new.p95_ms() - np.quantile([r["model_ms"] for r in new[4:]], 0.95)) < 0.05 * whole.new.p95_ms()


def _move(version: str, action: str, previous: str | None, at: datetime) -> AuditRecord:
    return AuditRecord(at.isoformat(), "tester", "m", version, "Staging", PRODUCTION, action, "test",
                       {"previous_production": previous} if previous else {})  # fmt: skip


def test_a_watch_runs_after_a_bridge_move_from_another_version_and_ends_on_time():
    history = [_move("1", "promote", None, START - timedelta(days=1)), _move("2", "promote", "1", START)]
    assert watch_of(history, "2", SETTINGS, START + timedelta(minutes=29)) == WATCH
    assert watch_of(history, "2", SETTINGS, START + timedelta(minutes=30)) is None  # over
    assert watch_of(history, "1", SETTINGS, START) is None  # not the version moved last
    assert watch_of([*history, _move("1", "rollback", "2", START + timedelta(minutes=1))], "1", SETTINGS, START + timedelta(minutes=2)) is None
    assert watch_of(history[:1], "1", SETTINGS, START - timedelta(days=1)) is None  # no predecessor
    assert watch_of(history, "2", PromotionSettings(guardrail_seconds=0), START) is None  # off
