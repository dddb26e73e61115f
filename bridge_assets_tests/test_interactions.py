"""The interaction logger on its own: batching into files, bounds and drop counting when storage fails."""

import socket

import boto3
import polars as pl

from bridge_assets.lake.storage import LocalStore, S3Store
from serving.interactions import InteractionLogger, read_interactions, record


def rows(count: int, tag: str) -> list[dict]:
    return [
        record(
            request_id=f"{tag}-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
            variant="production", latency_ms=1.0, features={"area": 1000.0 + i, "bedrooms": 3, "mainroad": "yes"},
            prediction=1.0 + i,
        )  # fmt: skip
        for i in range(count)
    ]


def test_records_are_written_in_batches_not_per_request(tmp_path):
    store = LocalStore(tmp_path)
    logger = InteractionLogger(lambda: store, "replica-a", flush_rows=1000, flush_seconds=60)
    for i in range(50):
        logger.log(rows(2, f"r{i}"))
    stats = logger.close()
    assert stats == {"written": 100, "dropped": 0, "files": 1, "flush_errors": 0}
    logged = read_interactions(store)
    assert logged.height == 100 and logged["request_id"].n_unique() == 100
    assert logged.filter(pl.col("request_id") == "r7-1")["area"].item() == 1001.0


def test_storage_down_keeps_answering_bounds_the_buffer_and_counts_drops():
    with socket.socket() as sock:  # a port nobody listens on: every write fails for real
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = boto3.client(
        "s3", endpoint_url=dead, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y",
        config=boto3.session.Config(retries={"max_attempts": 1}, connect_timeout=1),
    )  # fmt: skip
    logger = InteractionLogger(lambda: S3Store(client, "down"), "replica-b", flush_rows=10, flush_seconds=60, max_buffered=25)
    for i in range(4):
        logger.log(rows(10, f"b{i}"))  # returns at once, whatever storage does
    logger.flush()
    assert logger.stats["flush_errors"] >= 1 and logger.stats["written"] == 0
    stats = logger.close(attempts=1)
    assert stats["written"] == 0
    assert stats["dropped"] == 40  # 15 over the bound while buffered, 25 unwritten at shutdown


def test_rejected_requests_with_any_values_still_make_writable_records(tmp_path):
    store = LocalStore(tmp_path)
    logger = InteractionLogger(lambda: store, "replica-c", flush_rows=100, flush_seconds=60)
    odd = {"area": float("nan"), "bedrooms": 1e20, "bathrooms": float("inf"), "stories": 10**30, "parking": True, "mainroad": 3}
    logger.log([record(request_id="odd", endpoint="/predict", status=422, model_name="m", model_version="1",
                       variant="production", latency_ms=1.0, features=odd, error="bad")])  # fmt: skip
    assert logger.close()["written"] == 1
    (row,) = read_interactions(store).select("area", "bedrooms", "bathrooms", "stories", "parking", "mainroad").rows()
    assert row == (None,) * 6
