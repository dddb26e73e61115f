"""Object storage: a local folder laid out exactly like the bucket, or any S3 endpoint.

Every write is atomic: data goes to a temporary place first and is published in one step
(a rename on disk, a completed upload on S3), so a reader never sees a half-written object,
also when the writing process is killed. An exclusive write publishes only if the key does not
exist yet — a hard link on disk, a conditional PUT (`If-None-Match: *`) on S3 — so of two
concurrent writers of one key exactly one wins. Keys are '/'-separated and relative to the
store's root (the local folder, or `s3://bucket/prefix`).
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import polars as pl

_TEMP_MARK = ".tmp-"


def _remove_stale(paths: Iterable[Path], older_than_seconds: float) -> list[str]:
    """Remove the files among `paths` untouched for `older_than_seconds` (their writers are gone:
    a live writer keeps writing, and publishing takes seconds); the paths removed."""
    cutoff = time.time() - older_than_seconds
    removed = []
    for path in paths:
        try:
            if path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed.append(str(path))
        except FileNotFoundError:  # its writer published or cleaned up meanwhile
            continue
    return removed


class ObjectStore(ABC):
    """The operations the project needs from object storage, on disk or on S3."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """Where `key` lives, as a path or `s3://` URI (for logs, metadata and readers)."""

    @abstractmethod
    def _publish(self, key: str, local_file: Path) -> None:
        """Atomically make `local_file`'s bytes the content of `key`."""

    @abstractmethod
    def _publish_exclusive(self, key: str, local_file: Path) -> None:
        """Like `_publish`, but raise FileExistsError if `key` exists (one writer wins)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (sorted), never including unpublished temporaries."""

    @abstractmethod
    def modified(self, key: str) -> datetime:
        """When `key` was last published (UTC): a batch's landing time, whoever uploaded it."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def local_copy(self, key: str) -> Any:
        """Context manager: a local file holding `key`'s bytes, valid inside the block."""

    @property
    def polars_storage_options(self) -> dict[str, str] | None:
        """Options for Polars' native readers (None for local paths)."""
        return None

    @contextmanager
    def writer(self, key: str, *, exclusive: bool = False) -> Iterator[IO[bytes]]:
        """Write `key` through a file object; published only if the block completes."""
        with self._staging(key, exclusive) as (handle, _path):
            yield handle

    @contextmanager
    def staging_path(self, key: str, *, exclusive: bool = False) -> Iterator[Path]:
        """A local path to write `key` to (e.g. with a Parquet writer); published on success."""
        with self._staging(key, exclusive) as (handle, path):
            handle.close()
            yield path

    @contextmanager
    def _staging(self, key: str, exclusive: bool = False) -> Iterator[tuple[IO[bytes], Path]]:
        directory = self._staging_dir(key)
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{_TEMP_MARK}{uuid.uuid4().hex[:8]}-", dir=directory)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, path
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
            (self._publish_exclusive if exclusive else self._publish)(key, path)
        finally:
            path.unlink(missing_ok=True)

    def _staging_dir(self, key: str) -> Path:
        return Path(tempfile.gettempdir())

    def put_bytes(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        with self.writer(key, exclusive=exclusive) as handle:
            handle.write(data)

    @abstractmethod
    def sweep_temporaries(self, older_than_seconds: float = 3600.0) -> builtins.list[str]:
        """Remove what writers killed mid-write left behind (never an object readers see); what
        was removed. Age protects writers still at work."""

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode())

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode()

    def write_parquet(self, key: str, frame: pl.DataFrame) -> None:
        """Write a frame as one Parquet object, atomically."""
        buffer = io.BytesIO()
        frame.write_parquet(buffer, statistics=True)
        self.put_bytes(key, buffer.getvalue())

    def scan_parquet(self, keys: builtins.list[str], *, schema: pl.Schema | None = None) -> pl.LazyFrame:
        """Lazily read Parquet objects without downloading them first. Their schemas must agree,
        unless `schema` is given: then a column an object lacks reads as nulls (older objects
        written before a column was added)."""
        if not keys:
            raise ValueError("no Parquet objects to scan")
        return pl.scan_parquet(
            [self.uri(k) for k in keys],
            storage_options=self.polars_storage_options,
            schema=schema,
            missing_columns="raise" if schema is None else "insert",
        )


class LocalStore(ObjectStore):
    """A folder on disk; `root/key` is the object, exactly like `s3://bucket/prefix/key`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"key escapes the store: {key!r}")
        return path

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _staging_dir(self, key: str) -> Path:
        # Same directory as the target, so the final rename is atomic (same file system).
        return self._path(key).parent

    def _publish(self, key: str, local_file: Path) -> None:
        os.replace(local_file, self._path(key))

    def _publish_exclusive(self, key: str, local_file: Path) -> None:
        try:
            os.link(local_file, self._path(key))  # atomic, and fails if the key exists
        except FileExistsError:
            raise FileExistsError(f"{self._path(key)} already exists") from None

    def sweep_temporaries(self, older_than_seconds: float = 3600.0) -> list[str]:
        return _remove_stale(self.root.rglob(f"{_TEMP_MARK}*") if self.root.is_dir() else [], older_than_seconds)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(_TEMP_MARK)
        )

    def modified(self, key: str) -> datetime:
        return datetime.fromtimestamp(self._path(key).stat().st_mtime, UTC)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no object at {path}")
        yield path


class S3Store(ObjectStore):
    """A bucket and prefix on any S3 endpoint (AWS, MinIO, moto), through a boto3 client."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        storage_options: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._storage_options = storage_options

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @property
    def polars_storage_options(self) -> dict[str, str] | None:
        return self._storage_options

    def _publish(self, key: str, local_file: Path) -> None:
        # A single PUT or a completed multipart upload is what makes the object visible;
        # a killed upload leaves nothing readers can see.
        self.client.upload_file(str(local_file), self.bucket, self._key(key))

    def _publish_exclusive(self, key: str, local_file: Path) -> None:
        # One conditional PUT (objects up to 5 GB). Real S3 evaluates If-None-Match atomically:
        # of concurrent writers exactly one gets 200, the others 412 (or 409 while one is in flight).
        from botocore.exceptions import ClientError

        try:
            with local_file.open("rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
            ):
                raise FileExistsError(f"{self.uri(key)} already exists") from error
            raise

    def sweep_temporaries(self, older_than_seconds: float = 3600.0) -> list[str]:
        """This host's staging files of killed writers, and incomplete multipart uploads under
        the prefix: a killed `upload_file` of a large object leaves its parts stored (and billed)
        until the upload is aborted. Aborted here, on any S3; on AWS a lifecycle rule
        (`AbortIncompleteMultipartUpload`) does the same for uploads nobody sweeps."""
        from botocore.exceptions import ClientError

        removed = _remove_stale(Path(tempfile.gettempdir()).glob(f"{_TEMP_MARK}*"), older_than_seconds)
        cutoff = time.time() - older_than_seconds
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._key("")
            ):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() <= cutoff:
                        self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        removed.append(f"s3://{self.bucket}/{upload['Key']} (multipart upload {upload['UploadId']})")
        except ClientError as error:  # s3rver (the local stack) cannot list uploads: nothing to abort there
            if error.response.get("Error", {}).get("Code") != "NotImplemented":
                raise
        return removed

    def get_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def modified(self, key: str) -> datetime:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["LastModified"].astimezone(UTC)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        directory = Path(tempfile.mkdtemp(prefix="bridge-s3-"))
        try:
            path = directory / Path(key).name
            self.client.download_file(self.bucket, self._key(key), str(path))
            yield path
        finally:
            shutil.rmtree(directory, ignore_errors=True)


# Whole-request limits (not idle limits, as boto3's are): long enough for a ranged GET of a
# large Parquet part over a slow link.
S3_REQUEST_TIMEOUT = "120s"
S3_CONNECT_TIMEOUT = "10s"


def polars_s3_options(
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None = None,
) -> dict[str, str]:
    """Polars/object_store options for the same endpoint and credentials as boto3.

    Polars leaves object_store's request timeout off: a connection that stops answering (a
    dropped NAT entry, a hung endpoint) would hang a feature run forever. With a timeout the
    read fails after its retries and Dagster's retry policy takes over."""
    options = {"aws_region": region, "timeout": S3_REQUEST_TIMEOUT, "connect_timeout": S3_CONNECT_TIMEOUT}
    if endpoint_url:
        options["aws_endpoint_url"] = endpoint_url
        if endpoint_url.startswith("http://"):
            options["aws_allow_http"] = "true"
    if access_key_id and secret_access_key:
        options["aws_access_key_id"] = access_key_id
        options["aws_secret_access_key"] = secret_access_key
        if session_token:
            options["aws_session_token"] = session_token
    return options
