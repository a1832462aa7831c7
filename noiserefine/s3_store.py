"""The S3 store (s3fs): one PUT per published file, ranged GETs, conditional PUTs for the locks and manifest.

Every call goes through :func:`retries.retry_policy` (s3fs's and botocore's own retries are off).
See ``storage.py`` for the interface and the semantics it shares with a local directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .retries import StorageUnavailable, read_chunk_bytes, retry_policy, s3_status
from .storage import ObjectPath, Store

T = TypeVar("T")


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (``If-None-Match``) or changed (``If-Match``)."""


def _precondition_failed(error: BaseException) -> bool:
    """S3's 412 (s3fs raises FileExistsError for If-None-Match, OSError(EINVAL) caused by the ClientError for
    If-Match)."""
    if isinstance(error, FileExistsError):
        return True
    chain = [error, error.__cause__, error.__context__]
    return any(e is not None and ("PreconditionFailed" in str(e) or "pre-conditions you specified" in str(e))
               for e in chain)


class BucketNotFoundError(ValueError):
    """The location's bucket does not exist (or these credentials cannot see it): a configuration error, never
    an empty cache."""


def _missing_bucket(error: BaseException) -> bool:
    return s3_status(error)[0] == "NoSuchBucket"


def _named(what: str, location: ObjectPath, error: BaseException) -> BaseException:
    """``error`` (s3fs's, often naming neither the object nor the bucket) as the same kind of error naming the
    operation, the object and the cause."""
    code, status = s3_status(error)
    cause = f"{code or type(error).__name__}{f' (HTTP {status})' if status else ''}: {error}"
    if code == "NoSuchBucket":
        return BucketNotFoundError(f"{what}: bucket {location.bucket!r} does not exist (or is not visible to these "
                                   "credentials); create it or correct the location (data.cache_root / "
                                   "data.cache_dir)")
    if isinstance(error, PermissionError):
        return PermissionError(errno.EACCES, f"{what}: access denied ({cause}); check the credentials (AWS_PROFILE, "
                                             "AWS_ACCESS_KEY_ID, the instance profile) and the bucket's policy")
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{what}: no such object ({cause})")
    if isinstance(error, OSError):
        return OSError(error.errno, f"{what}: {cause}")
    return error


_filesystems: dict[int, object] = {}  # pid -> s3fs filesystem (a forked DataLoader worker makes its own)
_fs_guard = threading.Lock()
# One attempt of a call is one request, ended by the server's answer or by these timeouts: a call costs at most
# attempts * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S) plus the backoff sleeps (RetryPolicy.delays); with the
# defaults (data.io_retries=5, data.io_backoff_s=1) 6 * 65 s + 31 s, about 7 minutes for a server that never answers.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


def s3_filesystem():
    """This process's s3fs filesystem: one client, no retries of its own (botocore's ``total_max_attempts=1``:
    its ``max_attempts`` counts *retries*, so 1 there meant two requests per attempt; s3fs's loop: one pass):
    every retry is :class:`RetryPolicy`'s, bounded and logged."""
    pid = os.getpid()
    with _fs_guard:
        fs = _filesystems.get(pid)
        if fs is None:
            import s3fs
            from aiobotocore.session import AioSession
            from botocore.handlers import add_expect_header

            session = AioSession()
            # No "Expect: 100-continue" on PUTs: aiohttp waits for the 100 without any timeout, so a server that
            # never answers held a PUT forever (and aiohttp then sent it again), past READ_TIMEOUT_S.
            session.unregister("before-call.s3", add_expect_header)
            fs = s3fs.S3FileSystem(session=session, skip_instance_cache=True, use_listings_cache=False,
                                   config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"},
                                                  "connect_timeout": CONNECT_TIMEOUT_S,
                                                  "read_timeout": READ_TIMEOUT_S})
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
        """``call`` under the retry policy; an error that is not transient names ``what`` (operation and object)."""
        try:
            return retry_policy().run(what, call)
        except (StorageUnavailable, PreconditionFailed):
            raise
        except Exception as error:  # noqa: BLE001 - re-raised, same kind, naming the object
            named = _named(what, self.location, error)
            if named is error:
                raise
            raise named from error

    def info(self, name: str) -> dict | None:
        def call():
            try:
                return self.fs.info(self._key(name))
            except FileNotFoundError as error:
                if _missing_bucket(error):  # HEAD 404 could mean either: s3fs's LIST fallback tells them apart
                    raise
                return None
        info = self._retry(f"HEAD {self.path(name)}", call)
        return info if info is None or info.get("type") == "file" else None

    def size(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else int(info["size"])

    def _entries(self) -> list[dict]:
        def call():
            try:
                return self.fs.ls(self.location.fs_path, detail=True, refresh=True)
            except FileNotFoundError as error:
                if _missing_bucket(error):  # not an empty prefix: an error
                    raise
                return []
        return self._retry(f"LIST {self.location}", call)

    def names(self) -> list[str]:
        """Objects and sub-prefixes directly under the location (a sub-prefix is content, as a subdirectory is)."""
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._entries())

    def sizes(self) -> dict[str, int]:
        return {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in self._entries() if e.get("type") == "file"}

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
            part = self.read_range(name, offset, min(offset + read_chunk_bytes(), size))
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
                if etag is not None and isinstance(error, FileNotFoundError) and not _missing_bucket(error):
                    # If-Match on an object that is gone (S3: 404 NoSuchKey): the version we held no longer exists
                    raise PreconditionFailed(f"{self.path(name)} no longer exists") from None
                raise
        response = self._retry(f"conditional PUT {self.path(name)}", call)
        return (response or {}).get("ETag") or self.info(name)["ETag"]

    def delete(self, name: str) -> None:
        def call():
            try:
                self.fs.rm_file(self._key(name))
            except FileNotFoundError as error:
                if _missing_bucket(error):
                    raise
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
