"""The two ways bridge waits on the world: poll a condition until a deadline, and try an
action again after a failure. One definition of each, used by the local Ray's and the stack's
supervisors, the deploy path, the alerts and the demo."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(found: Callable[[], T], timeout: float, every: float = 0.5) -> T | None:
    """`found()`'s first truthy value within `timeout` seconds (checked at least once), else
    None: the caller says what it waited for. `found` may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(every)


def retried(
    action: Callable[[], T],
    attempts: int,
    retry_on: type[Exception] | tuple[type[Exception], ...] = Exception,
    backoff: float = 0.0,
) -> T:
    """`action()`'s result, tried up to `attempts` times while it raises `retry_on`; the waits
    between attempts double from `backoff` seconds. The last error propagates. An action that
    can fail half-done cleans up inside itself, so its last attempt leaves nothing behind either."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    attempt = 1
    while True:
        try:
            return action()
        except retry_on:
            if attempt >= attempts:
                raise
            time.sleep(backoff * 2 ** (attempt - 1))
            attempt += 1
