"""A replica's write-ahead spool of interaction records, and publishing spools to the lake.

Each replica appends every record to its own local file before the reply is sent (one
`write()` per request, no fsync: the page cache keeps what a SIGKILLed process wrote). The
interaction logger publishes the file's new bytes to the lake as Parquet; objects are named by
the spool file and the byte range they hold, so publishing the same range twice overwrites one
object instead of duplicating records. Before writing a range, its end is recorded in a mark
file beside the spool, so whoever publishes next (the replica, or a sweep after it died) cuts
the same range again.

A live replica holds an exclusive `flock` on its spool; the kernel drops it when the process
dies. `sweep_spools` — run by every starting replica, and callable by `make stop` or a Dagster
sensor — publishes spools nobody holds (and that belong to the same lake), then deletes them.

Directory: `BRIDGE_SERVE_SPOOL_DIR`, default `$BRIDGE_HOME/serve-spool`. It is per host: a
replica's orphan is swept by replicas (or sweeps) on the same host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from pydantic import Field

from bridge_assets.lake.settings import bridge_home
from bridge_assets.lake.storage import ObjectStore
from bridge_assets.settings import DERIVED, EnvSettings

SPOOL_SUFFIX = ".spool"
MARK_SUFFIX = ".mark"
log = logging.getLogger("bridge.spool")


class SpoolSettings(EnvSettings):
    """Where replicas on a host keep their spools."""

    directory: Path = Field(
        validation_alias="BRIDGE_SERVE_SPOOL_DIR",
        description="the replicas' write-ahead spool, a local path on every node (default: `$BRIDGE_HOME/serve-spool`)",
        json_schema_extra=DERIVED,
    )

    @classmethod
    def derive(cls, values: dict[str, str], env: Mapping[str, str]) -> dict[str, str]:
        values.setdefault("BRIDGE_SERVE_SPOOL_DIR", str(bridge_home(env) / "serve-spool"))
        return values


def spool_directory(env: Mapping[str, str] = os.environ) -> Path:
    """Where replicas on this host keep their spools (`BRIDGE_SERVE_SPOOL_DIR`)."""
    return SpoolSettings.from_env(env).directory


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value - EPOCH) // timedelta(microseconds=1)
    raise TypeError(f"cannot spool {type(value).__name__}")


def encode_records(records: list[dict[str, Any]]) -> bytes:
    """JSON lines; datetimes as epoch microseconds."""
    return b"".join(json.dumps(r, default=_encode, allow_nan=False).encode() + b"\n" for r in records)


@dataclass
class Published:
    """What one publication did: records written to the lake, objects, records dropped."""

    records: int = 0
    files: int = 0
    dropped: int = 0

    def __iadd__(self, other: Published) -> Self:
        self.records += other.records
        self.files += other.files
        self.dropped += other.dropped
        return self


# Writes one range's lines to the lake as objects named by the spool's stem and the range;
# returns how many objects it wrote.
RangeWriter = Callable[[ObjectStore, str, int, int, bytes], int]


def _mark_path(path: Path) -> Path:
    return path.with_suffix(MARK_SUFFIX)


def _read_mark(path: Path, header_end: int) -> tuple[int, int | None]:
    try:
        mark = json.loads(_mark_path(path).read_text())
        return mark["committed"], mark.get("publishing")
    except FileNotFoundError:
        return header_end, None


def _remove(path: Path) -> None:
    """Spool first, mark second: a spool never outlives its mark (it would be published again
    from its start); a mark left alone is harmless and swept."""
    path.unlink(missing_ok=True)
    _mark_path(path).unlink(missing_ok=True)


def _write_mark(path: Path, committed: int, publishing: int | None) -> None:
    scratch = _mark_path(path).with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
    scratch.write_text(json.dumps({"committed": committed, "publishing": publishing}))
    os.replace(scratch, _mark_path(path))


def _read_range(fd: int, start: int, end: int | None = None) -> bytes:
    """Bytes from `start` to `end`, or to the last complete line when `end` is None."""
    size = os.fstat(fd).st_size if end is None else end
    data = os.pread(fd, max(size - start, 0), start)
    return data if end is not None else data[: data.rfind(b"\n") + 1]


def _header_end(fd: int) -> tuple[int, dict[str, Any]]:
    first = os.pread(fd, 4096, 0)
    newline = first.find(b"\n")
    return newline + 1, json.loads(first[:newline])


def publish_pending(
    path: Path,
    fd: int,
    store: ObjectStore,
    write_range: RangeWriter,
    max_pending: int | None = None,
    done: Published | None = None,
) -> Published:
    """Publish the spool's unpublished complete lines (the caller holds the spool's lock);
    counts go to `done`, which keeps them when a write raises.

    A range recorded as being published is published again first, with the same bounds, so an
    interrupted publication ends as exactly one copy. Past `max_pending` lines, the oldest are
    dropped and counted.
    """
    done = Published() if done is None else done
    header_end, _ = _header_end(fd)
    committed, publishing = _read_mark(path, header_end)
    if publishing is not None:
        data = _read_range(fd, committed, publishing)
        done.files += write_range(store, path.stem, committed, publishing, data)
        done.records += data.count(b"\n")
        committed = publishing
        _write_mark(path, committed, None)
    data = _read_range(fd, committed)
    if not data:
        return done
    lines = data.count(b"\n")
    if max_pending is not None and lines > max_pending:
        cut = 0
        for _ in range(lines - max_pending):
            cut = data.index(b"\n", cut) + 1
        done.dropped += lines - max_pending
        log.error("interaction spool over %d records: dropped the %d oldest", max_pending, lines - max_pending)
        committed, data = committed + cut, data[cut:]
        _write_mark(path, committed, None)
    end = committed + len(data)
    _write_mark(path, committed, end)
    done.files += write_range(store, path.stem, committed, end, data)
    done.records += data.count(b"\n")
    _write_mark(path, end, None)
    return done


class Spool:
    """This replica's spool file: appended on the request path, locked while the replica lives."""

    def __init__(self, directory: Path, replica: str, lake: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.replica, self.lake = directory, replica.replace("/", "_"), lake
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        self.path = self.directory / f"{self.replica}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SPOOL_SUFFIX}"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._write(json.dumps({"lake": self.lake, "pid": os.getpid()}).encode() + b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def append(self, records: list[dict[str, Any]]) -> None:
        """Before the reply: the records reach the page cache (one write, under a lock)."""
        data = encode_records(records)
        with self._lock:
            self._write(data)

    def publish(self, store: ObjectStore, write_range: RangeWriter, max_pending: int, done: Published) -> Published:
        return publish_pending(self.path, self._fd, store, write_range, max_pending, done)

    def rotate(self, limit_bytes: int) -> bool:
        """Continue in a fresh file once this one is over `limit_bytes` and fully published, so
        a long-lived replica's spool stays bounded on disk."""
        with self._lock:
            size = os.fstat(self._fd).st_size
            if size < limit_bytes or _read_mark(self.path, -1)[0] != size:
                return False
            old_path, old_fd = self.path, self._fd
            self._open()
        _remove(old_path)
        os.close(old_fd)
        return True

    def close(self, *, published: bool) -> None:
        """Release the spool: deleted when everything is published, else left for a sweep."""
        if published:
            _remove(self.path)
        os.close(self._fd)  # releases the lock


def sweep_spools(store: ObjectStore, write_range: RangeWriter, directory: Path, lake: str) -> Published:
    """Publish and delete the spools of dead replicas that logged to `lake` (exactly once,
    however many sweeps run at the same time); returns what was published."""
    done = Published()
    if not directory.is_dir():
        return done
    for mark in directory.glob(f"*{MARK_SUFFIX}"):
        if not mark.with_suffix(SPOOL_SUFFIX).exists():
            mark.unlink(missing_ok=True)  # its spool was published and removed
    for path in sorted(directory.glob(f"*{SPOOL_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live replica (or another sweep) holds it
            if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
                continue  # swept and deleted while we waited
            if _header_end(fd)[1].get("lake") != lake:
                continue  # another lake's spool: its own instance sweeps it
            done += publish_pending(path, fd, store, write_range)
            _remove(path)
            log.info("published orphaned interaction spool %s", path.name)
        except (OSError, ValueError):
            log.exception("sweeping interaction spool %s failed; it stays for the next sweep", path.name)
        finally:
            os.close(fd)
    return done
