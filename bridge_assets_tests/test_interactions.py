"""The interaction logger on its own: batching into files, bounds and drop counting when storage
fails (records wait in the spool for a sweep), odd values, and readers of older files."""

import socket
from datetime import UTC, datetime, timedelta

import boto3
import polars as pl
import pytest

from bridge_assets.lake.interactions import (
    SCHEMA,
    compact_closed_hours,
    compact_partition,
    expire_interactions,
    read_interactions,
)
from bridge_assets.lake.storage import LocalStore, S3Store
from serving.interactions import InteractionLogger, lake_identity, record, sweep, write_spooled
from serving.spool import sweep_spools


def rows(count: int, tag: str, timestamp: datetime | None = None) -> list[dict]:
    return [
        record(
            request_id=f"{tag}-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
            variant="production", latency_ms=1.0, features={"area": 1000.0 + i, "bedrooms": 3, "mainroad": "yes"},
            prediction=1.0 + i, client_id="c", replica="r", timestamp=timestamp,
        )  # fmt: skip
        for i in range(count)
    ]


def test_records_are_written_in_batches_not_per_request(tmp_path):
    store = LocalStore(tmp_path / "lake")
    logger = InteractionLogger(lambda: store, "replica-a", spool_dir=tmp_path / "spool", flush_rows=1000, flush_seconds=60)
    for i in range(50):
        logger.log(rows(2, f"r{i}"))
    stats = logger.close()
    assert stats == {"written": 100, "dropped": 0, "files": 1, "flush_errors": 0, "swept": 0}
    logged = read_interactions(store)
    assert logged.height == 100 and logged["request_id"].n_unique() == 100
    assert logged.filter(pl.col("request_id") == "r7-1")["area"].item() == 1001.0
    assert set(logged["schema_version"]) == {3} and set(logged["client_id"]) == {"c"}
    assert list((tmp_path / "spool").iterdir()) == []  # all published: the spool is gone


def test_storage_down_keeps_answering_bounds_the_spool_and_leaves_the_rest_for_a_sweep(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: every write fails for real
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = boto3.client(
        "s3", endpoint_url=dead, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y",
        config=boto3.session.Config(retries={"max_attempts": 1}, connect_timeout=1),
    )  # fmt: skip
    down = S3Store(client, "down")
    logger = InteractionLogger(
        lambda: down, "replica-b", spool_dir=tmp_path / "spool", flush_rows=1000, flush_seconds=60, max_buffered=25
    )
    for i in range(4):
        logger.log(rows(10, f"b{i}"))  # returns at once, whatever storage does
    logger.flush()
    assert logger.stats["flush_errors"] >= 1 and logger.stats["written"] == 0
    stats = logger.close(attempts=1)
    assert stats["written"] == 0 and stats["dropped"] == 15  # over the bound of 25, oldest first
    up = LocalStore(tmp_path / "lake")
    assert sweep(up, directory=tmp_path / "spool").records == 0  # another lake's spool: left alone
    # Storage back: a sweep for that lake (here written to a store that works) publishes the 25 left.
    assert sweep_spools(up, write_spooled, tmp_path / "spool", lake_identity(down)).records == 25
    logged = read_interactions(LocalStore(tmp_path / "lake"))
    assert sorted(logged["request_id"]) == sorted([f"b1-{i}" for i in range(5, 10)] + [f"b{j}-{i}" for j in (2, 3) for i in range(10)])


def test_rejected_requests_with_any_values_still_make_writable_records(tmp_path):
    store = LocalStore(tmp_path)
    logger = InteractionLogger(lambda: store, "replica-c", spool_dir=tmp_path / "spool", flush_rows=100, flush_seconds=60)
    odd = {"area": float("nan"), "bedrooms": 1e20, "bathrooms": float("inf"), "stories": 10**30, "parking": True, "mainroad": 3}
    logger.log([record(request_id="odd", endpoint="/predict", status=422, model_name="m", model_version="1",
                       variant="production", latency_ms=1.0, features=odd, error="bad", prediction=float("nan"))])  # fmt: skip
    assert logger.close()["written"] == 1
    (row,) = read_interactions(store).select("area", "bedrooms", "bathrooms", "stories", "parking", "mainroad", "prediction").rows()
    assert row == (None,) * 7


def test_files_written_before_the_schema_version_column_still_read(tmp_path):
    store = LocalStore(tmp_path)
    old_columns = [c for c in SCHEMA if c not in ("schema_version", "client_id", "replica", "model_ms")]
    store.write_parquet("interactions/date=2026-01-01/hour=00/old.parquet", pl.DataFrame(rows(2, "old"), schema=SCHEMA).select(old_columns))
    logger = InteractionLogger(lambda: store, "replica-d", spool_dir=tmp_path / "spool", flush_seconds=60)
    logger.log(rows(3, "new"))
    logger.close()
    logged = read_interactions(store).sort("request_id")
    assert logged.columns == list(SCHEMA) and logged.height == 5
    assert logged["schema_version"].to_list() == [3, 3, 3, 1, 1]
    assert logged.filter(pl.col("schema_version") == 1)["client_id"].null_count() == 2
    assert logged.filter(pl.col("schema_version") == 1)["model_ms"].null_count() == 2
    assert lake_identity(store) == store.uri("interactions/")


def _hour_of_files(store: LocalStore, tmp_path, files: int, tag: str, day: int = 28) -> str:
    """`files` flushes of 10 records each into one hour; its partition."""
    logger = InteractionLogger(lambda: store, f"replica-{tag}", spool_dir=tmp_path / "spool", flush_seconds=600)
    for i in range(files):
        logger.log(rows(10, f"{tag}{i}", datetime(2026, 11, day, 21, 30, tzinfo=UTC)))
        logger.flush()
    logger.close()
    (partition,) = {"/".join(k.split("/")[1:3]) for k in store.list("interactions/")}
    return partition


class _DiesBeforeTheManifest(LocalStore):
    def put_text(self, key: str, text: str) -> None:
        raise OSError("killed before the manifest")


def test_compaction_merges_an_hour_into_one_file_and_loses_or_duplicates_nothing(tmp_path):
    store = LocalStore(tmp_path / "lake")
    partition = _hour_of_files(store, tmp_path, 4, "a")
    before = read_interactions(store).sort("request_id")
    with pytest.raises(OSError, match="manifest"):  # merged file written, not yet made visible
        compact_partition(_DiesBeforeTheManifest(tmp_path / "lake"), partition)
    assert read_interactions(store).sort("request_id").equals(before)  # each record once meanwhile
    done = compact_partition(store, partition)  # the same sources: the same merged name, rewritten
    assert (done.files, done.records, done.deleted) == (4, 40, 4)
    assert [k.rsplit("/", 1)[-1][:10] for k in store.list("interactions/")] == ["compacted-", "compacted-"]  # file + manifest
    assert read_interactions(store).sort("request_id").equals(before)

    _hour_of_files(store, tmp_path, 1, "late")  # a late spool sweep lands in the compacted hour
    assert read_interactions(store).height == 50
    again = compact_partition(store, partition)
    assert (again.files, again.records) == (2, 50) and compact_partition(store, partition) is None
    logged = read_interactions(store)
    assert logged.height == 50 and logged["request_id"].n_unique() == 50
    assert len(store.list("interactions/")) == 2


def test_closed_hours_are_compacted_and_retention_deletes_old_hours(tmp_path):
    store = LocalStore(tmp_path / "lake")
    partition = _hour_of_files(store, tmp_path, 3, "b")
    hour = datetime.strptime(partition, "date=%Y-%m-%d/hour=%H").replace(tzinfo=UTC)
    assert compact_closed_hours(store, now=hour + timedelta(minutes=90)) == []  # within the grace period
    (done,) = compact_closed_hours(store, now=hour + timedelta(hours=2))
    assert (done.partition, done.files, done.records) == (partition, 3, 30)
    assert expire_interactions(store, now=hour + timedelta(days=2), retention=timedelta(days=7)) == 0
    assert expire_interactions(store, now=hour + timedelta(days=8), retention=timedelta(days=7)) == 2
    assert read_interactions(store).is_empty()


def test_the_dagster_asset_compacts_closed_hours_and_applies_retention(tmp_path):
    import dagster as dg

    from bridge_assets.defs.resources import LakeStorage
    from bridge_assets.defs.serving_logs import interaction_logs

    store = LocalStore(tmp_path / "lake")
    _hour_of_files(store, tmp_path, 3, "d", day=1)  # an hour long closed
    storage = LakeStorage(local_root=str(tmp_path / "lake"))
    result = dg.materialize([interaction_logs], resources={"storage": storage})
    metadata = {k: v.value for k, v in result.asset_materializations_for_node("interaction_logs")[0].metadata.items()}
    assert (metadata["hours_compacted"], metadata["files_merged"], metadata["records_compacted"]) == (1, 3, 30)
    assert read_interactions(store).height == 30 and len(store.list("interactions/")) == 2
    config = {"ops": {"interaction_logs": {"config": {"retention_days": 7}}}}
    expired = dg.materialize([interaction_logs], resources={"storage": storage}, run_config=config)
    assert expired.asset_materializations_for_node("interaction_logs")[0].metadata["files_expired"].value == 2
