"""The post-deploy guardrail's judgement on interaction records as the service writes them
(one record per request, per row for batches); the rollback it triggers against the real Ray
Serve is in test_promotion_serving.py."""

from datetime import UTC, datetime, timedelta

import polars as pl

from bridge_assets.ml.gates import PromotionSettings
from bridge_assets.ml.guardrail import judge, traffic_health
from serving.interactions import SCHEMA, record

SWITCH = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SETTINGS = PromotionSettings()  # 50 requests, +2% errors, p95 × 1.5 + 25 ms


def _requests(version: str, start: datetime, count: int, latency_ms: float, errors: int = 0, client_errors: int = 0, rows: int = 1) -> list[dict]:
    """`count` requests a second apart: the first `errors` are 503s, the next `client_errors` 422s."""
    out = []
    for i in range(count):
        status = 503 if i < errors else 422 if i < errors + client_errors else 200
        for row in range(rows):
            out.append(record(request_id=f"{version}-{start:%H%M}-{i}", endpoint="/predict", status=status, model_name="m",
                              model_version=version, variant="production", latency_ms=latency_ms, row_index=row,
                              timestamp=start + timedelta(seconds=i)))  # fmt: skip
    return out


def _verdict(before: list[dict], after: list[dict]):
    records = pl.DataFrame(before + after, schema=SCHEMA)
    new = traffic_health(records, "2", SWITCH, SWITCH + timedelta(hours=1))
    previous = traffic_health(records, "1", SWITCH - timedelta(hours=1), SWITCH)
    return judge(new, previous, SETTINGS)


BASELINE = _requests("1", SWITCH - timedelta(minutes=10), 200, latency_ms=12.0, errors=2)


def test_a_version_as_healthy_as_its_predecessor_passes():
    verdict = _verdict(BASELINE, _requests("2", SWITCH, 100, latency_ms=14.0, errors=2))
    assert verdict.decided and not verdict.breach and verdict.reason.startswith("healthy")


def test_more_server_errors_than_the_margin_is_a_breach():
    verdict = _verdict(BASELINE, _requests("2", SWITCH, 100, latency_ms=12.0, errors=5))  # 5% > 1% + 2%
    assert verdict.breach and "server-error rate 5.0% > 3.0% allowed" in verdict.reason


def test_slower_than_the_latency_budget_is_a_breach():
    verdict = _verdict(BASELINE, _requests("2", SWITCH, 100, latency_ms=60.0))  # 60 > 12 × 1.5 + 25
    assert verdict.breach and "p95 latency 60 ms > 12 ms" in verdict.reason
    assert not _verdict(BASELINE, _requests("2", SWITCH, 100, latency_ms=40.0)).breach  # within 43 ms


def test_too_few_requests_decide_nothing():
    verdict = _verdict(BASELINE, _requests("2", SWITCH, 20, latency_ms=12.0, errors=20))
    assert not verdict.decided and not verdict.breach and "too few requests" in verdict.reason


def test_client_errors_and_batch_rows_do_not_count_against_the_model():
    # 100 requests refused as malformed (422) and 60 batch requests of 10 rows, one failing.
    after = _requests("2", SWITCH, 160, latency_ms=12.0, errors=1, client_errors=100, rows=10)
    records = pl.DataFrame(BASELINE + after, schema=SCHEMA)
    health = traffic_health(records, "2", SWITCH, SWITCH + timedelta(hours=1))
    assert (health.requests, health.server_errors) == (60, 1)
    assert not judge(health, traffic_health(records, "1", SWITCH - timedelta(hours=1), SWITCH), SETTINGS).breach


def test_without_a_baseline_errors_are_judged_against_none_and_latency_not_at_all():
    verdict = _verdict([], _requests("2", SWITCH, 100, latency_ms=500.0, errors=3))
    assert verdict.breach and "server-error rate 3.0% > 2.0% allowed" in verdict.reason and "latency" not in verdict.reason.split("(")[0]
    assert not _verdict([], _requests("2", SWITCH, 100, latency_ms=500.0, errors=1)).breach


def test_records_outside_the_spans_are_ignored():
    late_errors = _requests("2", SWITCH + timedelta(hours=2), 100, latency_ms=12.0, errors=100)
    verdict = _verdict(BASELINE, _requests("2", SWITCH, 100, latency_ms=12.0) + late_errors)
    assert not verdict.breach
