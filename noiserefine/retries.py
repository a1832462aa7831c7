"""How object-store calls are retried (``data.io_retries``, ``data.io_backoff_s``) and what is worth retrying.

:class:`RetryPolicy` runs a call up to ``attempts`` times with bounded, jittered exponential backoff,
logging each retry, then raises :class:`StorageUnavailable` naming the object and the attempts.
:func:`is_transient` classifies an error: by type, by the S3 error code and HTTP status s3fs keeps
as ``__cause__``, and by errno (never by digits in a message). :func:`configure` also sets the
read chunk size (``data.io_chunk_bytes``) of whole-object reads.
"""

from __future__ import annotations

import errno
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class StorageUnavailable(OSError):
    """The object store kept failing with transient errors for every allowed attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries of a transient-failing call, sleeping ``backoff_s * 2**i`` (capped, jittered) between."""

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.backoff_s * 2 ** i, self.max_backoff_s) for i in range(self.attempts - 1)]

    def run(self, what: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except Exception as error:  # noqa: BLE001 - classified below
                if not is_transient(error):
                    raise
                if attempt == self.attempts:
                    raise StorageUnavailable(
                        f"{what}: the object store failed {attempt} times in {time.monotonic() - started:.1f} s "
                        f"(last: {type(error).__name__}: {error}); check that it is reachable, or raise "
                        "data.io_retries / data.io_backoff_s") from error
                delay = self.delays()[attempt - 1] * (0.5 + random.random() / 2)
                print(f"warning: {what}: {type(error).__name__}: {error}; retry {attempt}/{self.attempts - 1} "
                      f"in {delay:.1f} s", file=sys.stderr, flush=True)
                time.sleep(delay)
        raise AssertionError("unreachable")


_policy = RetryPolicy()
_chunk_bytes = 8 << 20


def configure(data_cfg) -> None:
    """Take the retry policy and read chunk size from ``data.io_*`` (entry points and workers call it)."""
    global _policy, _chunk_bytes
    _policy = RetryPolicy(attempts=int(data_cfg.io_retries) + 1, backoff_s=float(data_cfg.io_backoff_s))
    _chunk_bytes = int(data_cfg.io_chunk_bytes)


def retry_policy() -> RetryPolicy:
    return _policy


# ConditionalRequestConflict (409): conditional writes raced; S3 documents it as retryable.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException", "ConditionalRequestConflict"}
_TRANSIENT_CLASSES = {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                      "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError", "ClientPayloadError",
                      "ServerDisconnectedError", "ClientConnectionError", "FSTimeoutError", "TimeoutError",
                      "ConnectionError", "IncompleteRead", "ProtocolError"}


def s3_status(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ClientError (s3fs keeps it as ``__cause__``)."""
    for e in (error, error.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code, status
    return None, None


def is_transient(error: BaseException) -> bool:
    """Connection refused/reset/closed, timeouts, a body cut short, 5xx, throttling, a conditional-write conflict:
    worth retrying.
    Not: missing objects, permissions, failed preconditions, other 4xx."""
    if {cls.__name__ for cls in type(error).__mro__} & _TRANSIENT_CLASSES:
        return True
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)):
        return False
    code, status = s3_status(error)
    if code in _TRANSIENT_CODES or (status is not None and status >= 500):
        return True
    return isinstance(error, OSError) and error.errno in {errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET,
                                                          errno.ECONNREFUSED, errno.EAGAIN}


def read_chunk_bytes() -> int:
    return _chunk_bytes
