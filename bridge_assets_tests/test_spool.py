"""The write-ahead spool: records of a SIGKILLed process reach the lake exactly once, however a
publication was interrupted and however many sweeps run."""

import signal
import subprocess
import sys
import threading

import polars as pl

from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.storage import LocalStore
from serving.interactions import InteractionLogger, record, sweep, write_spooled
from serving.spool import sweep_spools

KILLED_REPLICA = """
import os, signal, sys
from bridge_assets.lake.storage import LocalStore
from serving.interactions import InteractionLogger, record
lake, spool, name = sys.argv[1:4]
logger = InteractionLogger(lambda: LocalStore(lake), name, spool_dir=__import__("pathlib").Path(spool), flush_seconds=600)
logger.orphans_swept.wait(60)
print(logger.stats["swept"], flush=True)  # what its start swept of the replicas that died before it
def rows(tag, n):
    return [record(request_id=f"{name}-{tag}-{i}", endpoint="/predict", status=200, model_name="m", model_version="1",
                   variant="production", latency_ms=1.0, prediction=float(i)) for i in range(n)]
logger.log(rows("published", 100))
logger.flush()
for i in range(50):
    logger.log(rows(f"spooled{i}", 1))  # one request each, as the service does
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_replica(lake, spool, name: str = "replica-k") -> int:
    """A replica (own name, own request ids) that publishes 100 records, spools 50 and is
    SIGKILLed; how many records its own start swept from dead replicas."""
    done = subprocess.run([sys.executable, "-c", KILLED_REPLICA, str(lake), str(spool), name], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return int(done.stdout.split()[0])


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
    """Three replicas die one after another; each start sweeps the one before, and four sweeps
    race for the last: every record of every replica is published once, by exactly one sweep."""
    store = LocalStore(tmp_path / "lake")
    started_sweeps = [_killed_replica(tmp_path / "lake", tmp_path / "spool", f"k{n}") for n in (1, 2, 3)]
    assert started_sweeps == [0, 50, 50]  # k2's start published k1's 50 spooled records, k3's start k2's
    results = []
    sweeps = [threading.Thread(target=lambda: results.append(sweep(store, directory=tmp_path / "spool").records)) for _ in range(4)]
    for thread in sweeps:
        thread.start()
    for thread in sweeps:
        thread.join()
    assert sorted(results) == [0, 0, 0, 50]  # k3's 50, by one of the four
    logged = read_interactions(store)
    assert logged.height == 450 and logged["request_id"].n_unique() == 450  # none twice, none lost
    per_replica = dict(logged.group_by(pl.col("request_id").str.split("-").list.first()).len().iter_rows())
    assert per_replica == {"k1": 150, "k2": 150, "k3": 150}
    assert list((tmp_path / "spool").iterdir()) == []


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
