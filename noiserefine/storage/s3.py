"""The S3 store (s3fs): one PUT per published file, ranged GETs; versions are ETags, ``create`` is a PUT with
``If-None-Match: *``, ``replace`` a PUT with ``If-Match: <ETag>`` (what the lease and the manifest's
compare-and-swap of ``base.py`` / ``locks.py`` are built on).

Every call goes through :func:`retries.retry_policy` (s3fs's and botocore's own retries are off).
See ``base.py`` for the interface and the semantics it shares with a local directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..files import same_bytes
from .base import ObjectPath, Store
from .errors import BucketNotFoundError, VersionConflict
from .retries import StorageUnavailable, read_chunk_bytes, retry_policy, s3_status

T = TypeVar("T")


def _precondition_failed(error: BaseException) -> bool:
    """S3's 412 (s3fs raises FileExistsError for If-None-Match, OSError(EINVAL) caused by the ClientError for
    If-Match)."""
    if isinstance(error, FileExistsError):
        return True
    chain = [error, error.__cause__, error.__context__]
    return any(e is not None and ("PreconditionFailed" in str(e) or "pre-conditions you specified" in str(e))
               for e in chain)


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
# defaults (data.io_retries=6, data.io_backoff_s=1) 7 * 65 s + at most 61 s: under 9 minutes for a server that
# never answers (it was ~15: two requests of up to 60 s each per attempt).
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
        except (StorageUnavailable, VersionConflict):
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

    def version(self, name: str) -> str | None:
        info = self.info(name)
        return None if info is None else info["ETag"]

    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        """The object and the ETag of exactly those bytes (HEAD, GET, HEAD: retried until both HEADs agree)."""
        for _ in range(10):
            before = self.version(name)
            if before is None:
                return None, None
            try:
                data = self.read_bytes(name)
            except FileNotFoundError:
                continue
            if self.version(name) == before:
                return data, before
        raise OSError(f"{self.path(name)} kept changing while it was read")

    @contextlib.contextmanager
    def publish(self, name: str, exclusive: bool = False) -> Iterator[Path]:
        spool = Path(tempfile.mkdtemp(prefix="noiserefine-upload-"))
        try:
            tmp = spool / name
            yield tmp
            if not exclusive:
                self._retry(f"PUT {self.path(name)}", lambda: self.fs.put_file(str(tmp), self._key(name)))
                return
            try:  # If-None-Match: * (a retried PUT that had landed answers 412 as well: same bytes)
                self._retry(f"PUT {self.path(name)}",
                            lambda: self.fs.put_file(str(tmp), self._key(name), mode="create"))
            except Exception as error:  # noqa: BLE001
                if not _precondition_failed(error):
                    raise
                if not same_bytes(tmp, self.read_bytes(name)):
                    raise FileExistsError(f"{self.path(name)} exists with other bytes; a published object is "
                                          "never replaced") from None
        finally:
            shutil.rmtree(spool, ignore_errors=True)

    def create(self, name: str, data: bytes) -> str:
        return self._put_if(name, data, etag=None)

    def replace(self, name: str, data: bytes, version: str) -> str:
        return self._put_if(name, data, etag=version)

    def _put_if(self, name: str, data: bytes, *, etag: str | None) -> str:
        """PUT ``data`` only if ``name`` is absent (``etag`` None) or still has ``etag``; its new ETag.
        :class:`VersionConflict` if not (a retried PUT that already landed reads as one too)."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

        def call():
            try:
                return self.fs.pipe_file(self._key(name), data, **condition)
            except Exception as error:  # noqa: BLE001
                if _precondition_failed(error):
                    raise VersionConflict(str(error)) from None
                if etag is not None and isinstance(error, FileNotFoundError) and not _missing_bucket(error):
                    # If-Match on an object that is gone (S3: 404 NoSuchKey): the version we held no longer exists
                    raise VersionConflict(f"{self.path(name)} no longer exists") from None
                raise
        response = self._retry(f"conditional PUT {self.path(name)}", call)
        return (response or {}).get("ETag") or self.version(name)

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
