"""Where a teacher cache lives: a local directory or an S3 prefix, behind one small interface.

``location("cache/x")`` is a :class:`pathlib.Path`; ``location("s3://bucket/prefix")`` an
:class:`ObjectPath` (joins with ``/`` and has ``.name`` like a path, but is never opened as a
local file). :func:`store_for` gives the :class:`Store` of either, and the cache code only
talks to stores: exists, size, list, read (whole or a byte range), publish, delete, move, and
the two locks.

Same semantics on both:

- A file appears only complete. Local: temp name + fsync + ``os.replace``. S3: written to a
  local temp file first, then one PUT (a multipart upload above s3fs's threshold, completed
  only after every part arrived; aborted on error), so there is never a visible partial object.
- Reads retry transient errors (connection refused or reset, timeouts, 5xx, a body cut short)
  with bounded exponential backoff (:class:`RetryPolicy`, ``data.io_retries`` /
  ``data.io_backoff_s``), then raise :class:`StorageUnavailable` naming the object and the
  attempts. A whole-object read is a series of ranged GETs of ``data.io_chunk_bytes``: a read
  that breaks resumes from the offset reached, not from byte 0.
- The job lock and the manifest lock (``targets/lock.py``): ``fcntl.flock`` locally; on S3 a
  lease object written with a conditional PUT (``If-None-Match: *``) and renewed with
  ``If-Match: <ETag>``, and a manifest written by compare-and-swap (``If-Match`` the ETag read).

S3 goes through s3fs (fsspec): it passes ``IfNoneMatch``/``IfMatch`` through to PutObject,
which the locks need and ``pyarrow.fs.S3FileSystem`` cannot express, and it maps S3 errors to
Python ones. Credentials, region and endpoint come from botocore's usual chain (the
``AWS_*`` environment variables, ``~/.aws/config`` and ``credentials``, instance metadata;
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), never from our configs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, Union

from .files import atomic_path

S3_SCHEME = "s3://"
T = TypeVar("T")


class StorageUnavailable(OSError):
    """The object store kept failing with transient errors for every allowed attempt."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (``If-None-Match``) or changed (``If-Match``)."""


class ObjectPath:
    """``s3://bucket/key/prefix``: joins (``/``) and names (``.name``) like a path, opened only through a store."""

    def __init__(self, url: str):
        if not url.startswith(S3_SCHEME):
            raise ValueError(f"not an s3:// location: {url!r}")
        bucket, _, key = url[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        self.bucket, self.key = bucket, key.strip("/")

    def __truediv__(self, name: str) -> "ObjectPath":
        name = str(name).strip("/")
        return ObjectPath(f"{S3_SCHEME}{self.bucket}/{self.key + '/' if self.key else ''}{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{S3_SCHEME}{self.bucket}/{self.key.rsplit('/', 1)[0] if '/' in self.key else ''}")

    @property
    def fs_path(self) -> str:  # s3fs's form: bucket/key
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.fs_path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


Location = Union[Path, ObjectPath]


def is_remote(where) -> bool:
    return isinstance(where, ObjectPath) or str(where).startswith(S3_SCHEME)


def location(where: str | Path | ObjectPath) -> Location:
    """A configured location: ``s3://...`` -> :class:`ObjectPath`, anything else -> an expanded ``Path``."""
    if isinstance(where, ObjectPath):
        return where
    if str(where).startswith(S3_SCHEME):
        return ObjectPath(str(where))
    return Path(where).expanduser()


# --- retries ------------------------------------------------------------------------------------------

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


_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                    "Throttling", "ThrottlingException"}
_TRANSIENT_CLASSES = {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                      "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError", "ClientPayloadError",
                      "ServerDisconnectedError", "ClientConnectionError", "FSTimeoutError", "TimeoutError",
                      "ConnectionError", "IncompleteRead", "ProtocolError"}


def _s3_status(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ClientError (s3fs keeps it as ``__cause__``)."""
    for e in (error, error.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return code, status
    return None, None


def is_transient(error: BaseException) -> bool:
    """Connection refused/reset/closed, timeouts, a body cut short, 5xx and throttling: worth retrying.
    Not: missing objects, permissions, failed preconditions, other 4xx."""
    if {cls.__name__ for cls in type(error).__mro__} & _TRANSIENT_CLASSES:
        return True
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)):
        return False
    code, status = _s3_status(error)
    if code in _TRANSIENT_CODES or (status is not None and status >= 500):
        return True
    return isinstance(error, OSError) and error.errno in {errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET,
                                                          errno.ECONNREFUSED, errno.EAGAIN}


def _precondition_failed(error: BaseException) -> bool:
    """S3's 412 (s3fs raises FileExistsError for If-None-Match, OSError(EINVAL) caused by the ClientError for
    If-Match)."""
    if isinstance(error, FileExistsError):
        return True
    chain = [error, error.__cause__, error.__context__]
    return any(e is not None and ("PreconditionFailed" in str(e) or "pre-conditions you specified" in str(e))
               for e in chain)


# --- stores -------------------------------------------------------------------------------------------

class Store:
    """A directory of named files (no subdirectories): the cache's shards, manifest, teacher record, locks."""

    location: Location

    def path(self, name: str) -> Location:
        return self.location / name

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Names directly in the store ([] if it does not exist)."""
        return sorted(self.sizes())

    def sizes(self) -> dict[str, int]:
        """{name: size} of every file directly in the store, from one listing ({} if it does not exist)."""
        raise NotImplementedError

    def is_empty_or_missing(self) -> bool:
        return not self.names()

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator[Path]:
        """Yield a local temp path to write; on success it becomes ``name`` complete, in one step."""
        raise NotImplementedError
        yield  # pragma: no cover

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.publish(name) as tmp:
            tmp.write_bytes(data)

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def move(self, name: str, new_name: str) -> None:
        raise NotImplementedError

    def make(self) -> None:
        """Create the directory (locally); nothing to do on an object store."""

    def job_lock(self, ttl_s: float | None = None):
        """The one-job-writes-this-cache lock (``targets/lock.py``), re-entrant in its thread."""
        raise NotImplementedError

    def read_modify_write(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Replace ``name`` by ``change(current bytes or None)`` without losing a concurrent writer's change."""
        raise NotImplementedError


class LocalStore(Store):
    def __init__(self, root: Path):
        self.location = Path(root)

    def size(self, name: str) -> int | None:
        path = self.location / name
        return path.stat().st_size if path.is_file() else None

    def names(self) -> list[str]:
        if not self.location.is_dir():
            return []
        return sorted(p.name for p in self.location.iterdir())

    def sizes(self) -> dict[str, int]:
        if not self.location.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.location.iterdir() if p.is_file()}

    def is_dir_or_missing(self) -> bool:
        return not self.location.exists() or self.location.is_dir()

    def read_bytes(self, name: str) -> bytes:
        return (self.location / name).read_bytes()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.location / name, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator[Path]:
        with atomic_path(self.location / name, durable=True) as tmp:
            yield tmp

    def delete(self, name: str) -> None:
        (self.location / name).unlink(missing_ok=True)

    def move(self, name: str, new_name: str) -> None:
        os.rename(self.location / name, self.location / new_name)

    def make(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)

    def job_lock(self, ttl_s: float | None = None):
        from .targets.lock import cache_lock

        return cache_lock(self.location)

    def read_modify_write(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Under ``.manifest.lock`` (flock): read ``name`` (None if absent), publish ``change(old)`` unless None."""
        from .targets.lock import manifest_lock

        with manifest_lock(self.location):
            path = self.location / name
            try:
                with open(path, "rb") as handle:  # one open, one read (a rename in between: old or new file)
                    old = handle.read()
            except FileNotFoundError:
                old = None
            new = change(old)
            if new is not None:
                self.write_bytes(name, new)


_filesystems: dict[int, object] = {}  # pid -> s3fs filesystem (a forked DataLoader worker makes its own)
_fs_guard = threading.Lock()


def s3_filesystem():
    """This process's s3fs filesystem: one client, no retries of its own (s3fs's and botocore's would add an
    unbounded-looking second layer): every retry is :class:`RetryPolicy`'s, bounded and logged."""
    pid = os.getpid()
    with _fs_guard:
        fs = _filesystems.get(pid)
        if fs is None:
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                                   config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"},
                                                  "connect_timeout": 5, "read_timeout": 60})
            fs.retries = 1  # s3fs's own retry loop: one attempt
            _filesystems.clear()
            _filesystems[pid] = fs
        return fs


class S3Store(Store):
    def __init__(self, where: ObjectPath):
        self.location = where

    @property
    def fs(self):
        return s3_filesystem()

    def _key(self, name: str) -> str:
        return (self.location / name).fs_path

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        return retry_policy().run(what, call)

    def info(self, name: str) -> dict | None:
        def call():
            try:
                return self.fs.info(self._key(name))
            except FileNotFoundError:
                return None
        info = self._retry(f"HEAD {self.path(name)}", call)
        return info if info is None or info.get("type") == "file" else None

    def size(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else int(info["size"])

    def sizes(self) -> dict[str, int]:
        def call():
            try:
                return self.fs.ls(self.location.fs_path, detail=True, refresh=True)
            except FileNotFoundError:
                return []
        entries = self._retry(f"LIST {self.location}", call)
        return {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e.get("type") == "file"}

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self._retry(f"GET {self.path(name)} bytes {start}-{end - 1}",
                           lambda: self.fs.cat_file(self._key(name), start=start, end=end))

    def read_bytes(self, name: str) -> bytes:
        """The whole object by ranged GETs of ``data.io_chunk_bytes``; a broken read resumes at the offset reached."""
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(f"{self.path(name)} does not exist")
        parts, offset = [], 0
        while offset < size:
            part = self.read_range(name, offset, min(offset + _chunk_bytes, size))
            if not part:
                raise OSError(f"{self.path(name)}: empty read at offset {offset} of {size} (object changed?)")
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def read_with_etag(self, name: str) -> tuple[bytes | None, str | None]:
        """The object and the ETag of exactly those bytes (HEAD, GET, HEAD: retried until both HEADs agree)."""
        for _ in range(10):
            before = self.info(name)
            if before is None:
                return None, None
            try:
                data = self.read_bytes(name)
            except FileNotFoundError:
                continue
            after = self.info(name)
            if after is not None and after["ETag"] == before["ETag"]:
                return data, before["ETag"]
        raise OSError(f"{self.path(name)} kept changing while it was read")

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator[Path]:
        spool = Path(tempfile.mkdtemp(prefix="noiserefine-upload-"))
        try:
            tmp = spool / name
            yield tmp
            self._retry(f"PUT {self.path(name)}", lambda: self.fs.put_file(str(tmp), self._key(name)))
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    def put_if(self, name: str, data: bytes, *, etag: str | None) -> str:
        """PUT ``data`` only if ``name`` is absent (``etag`` None) or still has ``etag``; its new ETag.
        :class:`PreconditionFailed` if not (a retried PUT that already landed reads as one too)."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

        def call():
            try:
                return self.fs.pipe_file(self._key(name), data, **condition)
            except Exception as error:  # noqa: BLE001
                if _precondition_failed(error):
                    raise PreconditionFailed(str(error)) from None
                raise
        response = self._retry(f"conditional PUT {self.path(name)}", call)
        return (response or {}).get("ETag") or self.info(name)["ETag"]

    def delete(self, name: str) -> None:
        def call():
            try:
                self.fs.rm_file(self._key(name))
            except FileNotFoundError:
                pass
        self._retry(f"DELETE {self.path(name)}", call)

    def move(self, name: str, new_name: str) -> None:
        """Server-side copy, then delete (S3 has no rename)."""
        self._retry(f"COPY {self.path(name)}", lambda: self.fs.copy(self._key(name), self._key(new_name)))
        self.delete(name)

    def job_lock(self, ttl_s: float | None = None):
        from .targets.lock import lease_lock

        return lease_lock(self, ttl_s)

    def read_modify_write(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Compare-and-swap: read ``name`` with its ETag, PUT ``change(old)`` ``If-Match`` that ETag
        (``If-None-Match: *`` when absent); another writer in between makes it read and merge again."""
        for _ in range(100):
            old, etag = self.read_with_etag(name)
            new = change(old)
            if new is None:
                return
            try:
                self.put_if(name, new, etag=etag)
                return
            except PreconditionFailed:
                time.sleep(random.random() * 0.2)
        raise OSError(f"{self.path(name)}: 100 concurrent updates in a row lost the compare-and-swap")


def store_for(where: str | Path | ObjectPath) -> Store:
    where = location(where)
    return S3Store(where) if isinstance(where, ObjectPath) else LocalStore(where)
