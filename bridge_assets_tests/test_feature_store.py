"""Versioned feature tables: immutable parts, content-derived versions, DuckDB by version id."""

import os
import subprocess
import sys
from datetime import UTC, datetime

import polars as pl
import pytest

from bridge_assets.core.simulator import Simulator
from bridge_assets.lake.feature_store import FeatureStore, build_features
from bridge_assets.lake.landing import land_batch, land_seed, landed_batches
from bridge_assets.lake.raw import validate_batch
from bridge_assets.lake.storage import ObjectStore

DIE_BEFORE_MANIFEST = """
import os
from bridge_assets.lake.feature_store import build_features
from bridge_assets.lake.settings import StorageSettings
store = StorageSettings.from_env().open()
publish = store.put_text
def die_on_manifest(key, text):
    if "/versions/" in key:
        os._exit(17)  # the process dies after writing parts, before the manifest
    publish(key, text)
store.put_text = die_on_manifest
build_features(store)
"""


def land_and_validate(store: ObjectStore, batch_id: str, rows: int, seed: int) -> None:
    land_batch(store, batch_id, Simulator.fit().generate(rows, seed=seed, batch_id=batch_id))
    validate_batch(store, next(b for b in landed_batches(store) if b.batch_id == batch_id))


def test_versions_are_immutable_and_content_derived(store: ObjectStore):
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    first = build_features(store).version
    first_bytes = {p.key: store.get_bytes(p.key) for p in first.parts}
    assert first.rows_per_split == {"train": 350, "validation": 92, "test": 103}

    assert build_features(store).version.version == first.version  # nothing new: same version
    land_and_validate(store, "sim-b", 3000, seed=1)
    second = build_features(store)
    assert second.previous == first.version and second.added_batches == ["sim-b"]
    assert second.version.parts[:1] == first.parts  # the old part is reused, not rewritten
    assert {p.key: store.get_bytes(p.key) for p in first.parts} == first_bytes

    features = FeatureStore(store)
    assert features.latest().version == second.version.version
    assert sorted(features.versions()) == sorted([first.version, second.version.version])
    pinned = features.scan(first.version).collect()
    assert pinned.height == 545 and set(pinned["batch_id"]) == {"housing-seed"}
    count = features.connect(first.version).sql("SELECT count(*) FROM features").fetchall()[0][0]
    assert count == 545
    newest = features.connect(second.version.version).sql("SELECT count(DISTINCT batch_id) FROM features")
    assert newest.fetchall()[0][0] == 2


def test_same_inputs_in_another_lake_give_the_same_version(tmp_path):
    from bridge_assets.lake.storage import LocalStore

    versions = []
    for name in ("one", "two"):
        lake = LocalStore(tmp_path / name)
        land_seed(lake)
        validate_batch(lake, landed_batches(lake)[0])
        versions.append(build_features(lake).version.version)
    assert versions[0] == versions[1]


def test_a_writer_dying_before_the_manifest_leaves_no_version(store: ObjectStore, lake_env):
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    before = build_features(store).version
    land_and_validate(store, "sim-c", 2000, seed=2)
    died = subprocess.run([sys.executable, "-c", DIE_BEFORE_MANIFEST], env={**os.environ, **lake_env})
    assert died.returncode == 17
    features = FeatureStore(store)
    assert features.versions() == [before.version] and features.latest() == before
    assert build_features(store).added_batches == ["sim-c"]  # the next build completes the job


def test_unknown_version_is_a_clear_error(store: ObjectStore):
    with pytest.raises(KeyError, match="no version"):
        FeatureStore(store).load("0123456789abcdef")


def test_every_row_knows_when_it_was_seen_and_older_parts_still_read(store: ObjectStore):
    """Rows carry `seen_at`: their own time when the batch has one (labelled traffic: the
    request's time), else their batch's landing time, kept in the manifest (so the same rows
    landed elsewhere are still the same version). A part recorded before any of this reads as
    null, so old lakes keep working."""
    land_seed(store)
    validate_batch(store, landed_batches(store)[0])
    old = build_features(store).version
    legacy = FeatureStore(store).scan(old).collect().drop("seen_at").with_columns(pl.lit("legacy").alias("batch_id"))
    legacy_part = FeatureStore(store).write_part("legacy", legacy)  # as parts were written before: no time at all
    asked = datetime(2025, 3, 1, 12, tzinfo=UTC)
    traffic = pl.concat(list(Simulator.fit().generate(300, seed=9, batch_id="traffic")))
    traffic = traffic.with_columns(pl.when(pl.int_range(pl.len()) < 200).then(pl.lit(asked)).otherwise(None).alias("seen_at"))
    land_batch(store, "traffic", [traffic])
    validate_batch(store, next(b for b in landed_batches(store) if b.batch_id == "traffic"))
    landed = store.modified("landing/batches/traffic/data.parquet")
    assert abs((landed - datetime.now(UTC)).total_seconds()) < 600  # the object's publication time

    newest = build_features(store).version
    features = FeatureStore(store)
    rows = features.scan(newest).collect()
    seed_seen = rows.filter(pl.col("batch_id") == "housing-seed")["seen_at"].unique().to_list()
    assert seed_seen == [store.modified("landing/batches/housing-seed/data.csv")]
    assert newest.parts[0].landed_at == seed_seen[0].isoformat()  # in the manifest, not in the part's bytes
    seen = rows.filter(pl.col("batch_id") == "traffic").sort("row_id")["seen_at"].to_list()
    assert seen[:200] == [asked] * 200 and all(abs((s - landed).total_seconds()) < 1 for s in seen[200:])
    mixed = features.commit([legacy_part], newest, publish=False)  # an old part beside new ones
    read = features.scan(mixed).collect()
    assert read.height == rows.height + legacy.height and read.filter(pl.col("batch_id") == "legacy")["seen_at"].null_count() == legacy.height
