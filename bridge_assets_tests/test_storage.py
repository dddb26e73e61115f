"""Object storage against the local default and moto's S3 server over HTTP."""

import os
import signal
import subprocess
import sys

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
