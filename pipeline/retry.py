"""Retries with backoff for the storage errors that go away on their own.

Object stores throttle (503 SlowDown), fail now and then (500), and drop
connections under load. botocore retries some of these inside s3fs, but not
every filesystem does, and a busy bucket can outlast its budget; a map file or
an image read lost to one of them would be a lost result. Missing objects,
denied access and bad data are not transient and fail at once.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

RETRY_ATTEMPTS = 6
_BASE_DELAY_S = 0.1
_MAX_DELAY_S = 5.0
EREMOTEIO = getattr(errno, "EREMOTEIO", errno.EIO)
_TRANSIENT_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE, EREMOTEIO}
)
# Codes as S3-compatible stores and their clients spell them in messages.
TRANSIENT_ERROR_WORDS = (
    "SlowDown",
    "Throttl",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Connection reset",
    "Server disconnected",
)


def is_transient(error: BaseException) -> bool:
    """Whether trying again later can succeed (throttling, 5xx, dropped connections)."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if type(error).__module__.split(".")[0] in ("botocore", "aiohttp", "aiobotocore"):
        # Connection-level failures from the HTTP stack, whatever their class name.
        name = type(error).__name__
        if any(word in name for word in ("Connection", "Timeout", "Disconnected", "Payload")):
            return True
    return any(word in str(error) for word in TRANSIENT_ERROR_WORDS)


def is_storage_error(error: BaseException) -> bool:
    """A failure of the store or the network (an ``OSError``, or what the HTTP stack
    raises for a dropped connection), as opposed to a bug in the caller."""
    return isinstance(error, OSError) or is_transient(error)


def backoff_delays(attempts: int = RETRY_ATTEMPTS) -> Iterator[float]:
    """Seconds to wait before each retry: exponential with full jitter, capped.

    Jitter keeps many workers throttled at once from retrying in lockstep.
    """
    for attempt in range(attempts - 1):
        yield random.uniform(0, min(_MAX_DELAY_S, _BASE_DELAY_S * 2**attempt))


def retry_transient(call: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """``call()``, tried again after a transient error; the last error is raised."""
    delays = backoff_delays(attempts)
    while True:
        try:
            return call()
        except Exception as error:
            delay = next(delays, None)
            if delay is None or not is_transient(error):
                raise
            time.sleep(delay)
