"""The write-ahead spool: records of a SIGKILLed process reach the lake exactly once, however a
publication was interrupted and however many sweeps run."""

import os
import signal
import subprocess
import sys
import threading

import polars as pl
import pytest

from bridge_assets.lake.storage import LocalStore
from serving.interactions import InteractionLogger, read_interactions, record, sweep, write_spooled
from serving.spool import sweep_spools

KILLED_REPLICA = """
import os, signal, sys
from bridge_assets.lake.storage import LocalStore
from serving.interactions import InteractionLogger, record
lake, spool = sys.argv[1:3]
logger = InteractionLogger(lambda: LocalStore(lake), "replica-k", spool_dir=__import__("pathlib").Path(spool), flush_seconds=600)
def rows(tag, n):
    return [record(request_id=f"{tag}-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
                   variant="production", latency_ms=1.0, prediction=float(i)) for i in range(n)]
logger.log(rows("published", 100))
logger.flush()
for i in range(50):
    logger.log(rows(f"spooled{i}", 1))  # one request each, as the service does
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_replica(lake, spool) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_REPLICA, str(lake), str(spool)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_killed_replicas_records_are_published_once_by_a_sweep(tmp_path):
    store = LocalStore(tmp_path / "lake")
    _killed_replica(tmp_path / "lake", tmp_path / "spool")
    assert read_interactions(store).height == 100  # only what it published before it died
    assert sweep(store, directory=tmp_path / "spool").records == 50
    assert sweep(store, directory=tmp_path / "spool").records == 0  # nothing twice
    logged = read_interactions(store)
    assert logged.height == 150 and logged["request_id"].n_unique() == 150
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_starting_replica_sweeps_orphans_but_not_live_spools(tmp_path):
    store = LocalStore(tmp_path / "lake")
    live = InteractionLogger(lambda: store, "live", spool_dir=tmp_path / "spool", flush_seconds=600)
    live.log([record(request_id="live-1", endpoint="/predict", status=200, model_name="m", model_version="1",
                     variant="production", latency_ms=1.0)])  # fmt: skip
    _killed_replica(tmp_path / "lake", tmp_path / "spool")
    starting = InteractionLogger(lambda: store, "starting", spool_dir=tmp_path / "spool", flush_seconds=600)
    starting.close()
    assert starting.stats["swept"] == 50  # the dead one's unpublished records, not the live one's
    assert "live-1" not in set(read_interactions(store)["request_id"])
    live.close()
    assert read_interactions(store).height == 151


class _DiesAfterWriting:
    """A publisher killed between writing a range's objects and recording that it did."""

    def __call__(self, *args) -> int:
        write_spooled(*args)
        raise OSError("killed after the write")


def test_an_interrupted_publication_ends_as_exactly_one_copy(tmp_path):
    store = LocalStore(tmp_path / "lake")
    _killed_replica(tmp_path / "lake", tmp_path / "spool")
    assert sweep_spools(store, _DiesAfterWriting(), tmp_path / "spool", store.uri("interactions/")).records == 0
    assert read_interactions(store).height == 150  # written, but not yet marked as published
    assert sweep(store, directory=tmp_path / "spool").records == 50  # the same range again: same objects
    logged = read_interactions(store)
    assert logged.height == 150 and logged["request_id"].n_unique() == 150


def test_concurrent_sweeps_publish_each_record_once(tmp_path):
    store = LocalStore(tmp_path / "lake")
    for _ in range(3):
        _killed_replica(tmp_path / "lake", tmp_path / "spool")
    results = []
    sweeps = [threading.Thread(target=lambda: results.append(sweep(store, directory=tmp_path / "spool").records)) for _ in range(4)]
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join()
    logged = read_interactions(store)
    assert len(results) == 4 and logged.height == 450  # (each replica's start swept the one before: racing too)
    assert logged.group_by("request_id").len()["len"].to_list() == [3] * 150  # 3 replicas, same ids, once each


def test_a_long_lived_spool_rotates_once_published(tmp_path):
    store = LocalStore(tmp_path / "lake")
    logger = InteractionLogger(lambda: store, "rotating", spool_dir=tmp_path / "spool", flush_seconds=600, rotate_bytes=1000)
    first = logger.spool.path
    for i in range(20):
        logger.log([record(request_id=f"rot-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
                           variant="production", latency_ms=1.0)])  # fmt: skip
        if i == 9:
            logger.flush()
    assert logger.spool.path != first and not first.exists()
    logger.close()
    assert sorted(read_interactions(store)["request_id"]) == sorted(f"rot-{i}" for i in range(20))
