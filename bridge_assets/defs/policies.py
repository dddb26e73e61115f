"""Run policies shared by the assets that read and write the lake."""

import os

import dagster as dg

# A storage outage (S3 endpoint down, throttling) fails a step with the client's error; Dagster
# then retries it with exponential backoff. Writes are atomic and versions are committed last,
# so a failed attempt leaves nothing half-written for the retry to trip over.
STORAGE_RETRY = dg.RetryPolicy(
    max_retries=int(os.environ.get("BRIDGE_STORAGE_RETRIES", "3")),
    delay=float(os.environ.get("BRIDGE_STORAGE_RETRY_DELAY_SECONDS", "2")),
    backoff=dg.Backoff.EXPONENTIAL,
)
