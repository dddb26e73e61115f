"""Run policies shared by the assets that read and write the lake."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from bridge_assets.defs.resources import LakeStorage


@contextmanager
def storage_retries(context: dg.AssetExecutionContext, storage: LakeStorage) -> Iterator[None]:
    """A storage outage (S3 endpoint down, throttling) fails a step with the client's error;
    Dagster then retries it `storage.retries` times with exponential backoff from
    `storage.retry_delay_seconds` (the resource's settings, so nothing is read at import).
    Writes are atomic and versions are committed last, so a failed attempt leaves nothing
    half-written for the retry to trip over. A `dg.Failure` that forbids retries (bad data) ends
    the step."""
    try:
        yield
    except dg.Failure as failure:
        if not failure.allow_retries:
            raise
        raise _retry(context, storage) from failure
    except dg.RetryRequested:
        raise
    except Exception as error:
        raise _retry(context, storage) from error


def _retry(context: dg.AssetExecutionContext, storage: LakeStorage) -> dg.RetryRequested:
    delay = storage.retry_delay_seconds * 2**context.retry_number
    return dg.RetryRequested(max_retries=storage.retries, seconds_to_wait=delay)
