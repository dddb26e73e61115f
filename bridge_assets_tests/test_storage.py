"""Object storage against the local default and moto's S3 server over HTTP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from bridge_assets.lake.storage import ObjectStore

WRITE_HALF_THEN_HANG = """
import sys, time
from bridge_assets.lake.settings import StorageSettings
store = StorageSettings.from_env().open()
with store.writer(sys.argv[1]) as handle:
    handle.write(b"new" * 1_000_000)
    handle.flush()
    print("half written", flush=True)
    time.sleep(120)
"""


def test_round_trip_list_and_delete(store: ObjectStore):
    store.put_text("a/b/one.txt", "1")
    store.put_bytes("a/two.bin", b"\x00\x01")
    store.write_parquet("t/frame.parquet", pl.DataFrame({"x": [1, 2, 3]}))
    assert store.list("a/") == ["a/b/one.txt", "a/two.bin"]
    assert store.get_text("a/b/one.txt") == "1" and store.exists("a/two.bin")
    assert store.scan_parquet(["t/frame.parquet"]).collect()["x"].to_list() == [1, 2, 3]
    store.delete("a/two.bin")
    assert not store.exists("a/two.bin") and store.list("missing/") == []


def test_failed_write_publishes_nothing(store: ObjectStore):
    store.put_text("k.txt", "old")
    with pytest.raises(RuntimeError), store.writer("k.txt") as handle:
        handle.write(b"partial")
        raise RuntimeError("disk on fire")
    assert store.get_text("k.txt") == "old" and store.list("") == ["k.txt"]


def test_a_writer_killed_mid_write_leaves_the_old_object_whole(store: ObjectStore, lake_env):
    store.put_text("zone/object.bin", "old")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_HALF_THEN_HANG, "zone/object.bin"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **lake_env},
    )
    try:
        assert writer.stdout.readline().strip() == "half written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert store.get_text("zone/object.bin") == "old"
    assert store.list("zone/") == ["zone/object.bin"]


def test_keys_cannot_escape_a_local_store(tmp_path):
    from bridge_assets.lake.storage import LocalStore

    with pytest.raises(ValueError, match="escapes"):
        LocalStore(tmp_path / "lake").put_text("../outside.txt", "x")


def test_an_empty_batch_lands_nothing(store: ObjectStore):
    from bridge_assets.lake.landing import land_batch, landed_batches

    with pytest.raises(ValueError, match="no rows"):
        land_batch(store, "empty", [])
    assert landed_batches(store) == [] and store.list("") == []


def test_an_exclusive_write_never_replaces_an_object(store: ObjectStore):
    store.put_bytes("claims/one", b"first", exclusive=True)
    with pytest.raises(FileExistsError, match="claims/one"):
        store.put_bytes("claims/one", b"second", exclusive=True)
    assert store.get_bytes("claims/one") == b"first" and store.list("claims/") == ["claims/one"]


def test_of_two_concurrent_landers_of_one_batch_exactly_one_wins(store: ObjectStore):
    """Both pass the "not landed yet" check; the slower one must lose at publish, and its
    withheld labels must not replace the winner's. Made deterministic by letting the second
    lander run to the end while the first is still producing its rows."""
    from bridge_assets.core.simulator import Simulator
    from bridge_assets.lake.landing import land_batch, landed_batches, release_labels

    simulator = Simulator.fit()
    winner = pl.concat(simulator.generate(300, seed=2, batch_id="race"))

    def slow_blocks():
        yield pl.concat(simulator.generate(300, seed=1, batch_id="race"))
        land_batch(store, "race", [winner], withhold_labels=True)  # the other lander, meanwhile

    with pytest.raises(FileExistsError, match="already landed"):
        land_batch(store, "race", slow_blocks(), withhold_labels=True)
    (landed,) = landed_batches(store)
    assert store.scan_parquet([landed.key]).collect()["row_id"].to_list() == winner["row_id"].to_list()
    release_labels(store, "race")
    labels = store.scan_parquet(["landing/labels/race/labels.parquet"]).collect()
    assert labels["price"].to_list() == winner["price"].to_list()  # the winner's prices, not the loser's


HELD_AT_PUBLISH = """
import sys, time
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.lake.storage import S3Store
store = StorageSettings.from_env().open()
if isinstance(store, S3Store):  # every part of the multipart upload waits: the upload stays in flight
    store.client.meta.events.register("before-call.s3.UploadPart", lambda **_: time.sleep(600))
publish = store._publish
def announced(key, path):
    print(path, flush=True)
    if not isinstance(store, S3Store):
        time.sleep(600)  # on disk publishing is one rename: held just before it
    publish(key, path)
store._publish = announced
store.put_bytes(sys.argv[1], b"new" * 10_000_000)
"""


def _multipart_uploads(store: ObjectStore) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


def test_a_writer_killed_while_publishing_leaves_the_old_object_and_a_sweep_removes_its_remains(store: ObjectStore, lake_env):
    """Killed at the last step (a 30 MB multipart upload in flight on S3; before the rename on
    disk): readers see the old object; its staging file and, on S3, the incomplete multipart
    upload are left — and the sweep removes both, touching nothing else."""
    from bridge_assets.lake.storage import S3Store

    on_s3 = isinstance(store, S3Store)
    store.put_text("zone/big.bin", "old")
    writer = subprocess.Popen(
        [sys.executable, "-c", HELD_AT_PUBLISH, "zone/big.bin"], stdout=subprocess.PIPE, text=True, env={**os.environ, **lake_env}
    )
    try:
        staging = Path(writer.stdout.readline().strip())
        deadline = time.monotonic() + 60
        while on_s3 and not _multipart_uploads(store) and time.monotonic() < deadline:
            time.sleep(0.2)
        uploads = _multipart_uploads(store) if on_s3 else []
        assert staging.is_file() and staging.stat().st_size == 30_000_000  # the whole object, not yet published
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    if on_s3:
        assert [u["Key"] for u in uploads] == [f"{store.prefix}/zone/big.bin"]  # the upload was under way at the kill
    assert store.get_text("zone/big.bin") == "old" and store.list("zone/") == ["zone/big.bin"]
    assert staging.is_file()  # what the dead writer left

    time.sleep(1.1)
    removed = store.sweep_temporaries(older_than_seconds=1)
    assert str(staging) in removed and not staging.exists()
    if on_s3:
        assert any(f"multipart upload {uploads[0]['UploadId']}" in r for r in removed) and _multipart_uploads(store) == []
    assert store.get_text("zone/big.bin") == "old" and store.list("zone/") == ["zone/big.bin"]
    assert store.sweep_temporaries(older_than_seconds=0) == []


def test_a_sweep_spares_young_temporaries_of_writers_still_at_work(store: ObjectStore, lake_env):
    store.put_text("zone/object.bin", "old")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_HALF_THEN_HANG, "zone/object.bin"], stdout=subprocess.PIPE, text=True, env={**os.environ, **lake_env}
    )
    try:
        assert writer.stdout.readline().strip() == "half written"
        assert store.sweep_temporaries() == []  # an hour is the default age: a live writer is never swept
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert store.list("zone/") == ["zone/object.bin"] and store.get_text("zone/object.bin") == "old"
