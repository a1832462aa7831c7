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
  with bounded exponential backoff (``retries.py``'s :class:`RetryPolicy`, ``data.io_retries`` /
  ``data.io_backoff_s``), then raise :class:`StorageUnavailable` naming the object and the
  attempts. A whole-object read is a series of ranged GETs of ``data.io_chunk_bytes``: a read
  that breaks resumes from the offset reached, not from byte 0.
- The job lock and the manifest lock (``targets/lock.py``): ``fcntl.flock`` locally; on S3 a
  lease object written with a conditional PUT (``If-None-Match: *``) and renewed with
  ``If-Match: <ETag>``, and a manifest written by compare-and-swap (``If-Match`` the ETag read).

S3 goes through s3fs (fsspec; ``s3_store.py``): it passes ``IfNoneMatch``/``IfMatch`` through to PutObject,
which the locks need and ``pyarrow.fs.S3FileSystem`` cannot express, and it maps S3 errors to
Python ones. Credentials, region and endpoint come from botocore's usual chain (the
``AWS_*`` environment variables, ``~/.aws/config`` and ``credentials``, instance metadata;
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), never from our configs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

from .files import atomic_path
from .retries import StorageUnavailable, configure

__all__ = ["Location", "LocalStore", "ObjectPath", "Store", "StorageUnavailable", "configure", "is_remote",
           "location", "store_for"]  # StorageUnavailable and configure: retries.py's, for the callers

S3_SCHEME = "s3://"
# Something that looks like a URL: ``scheme:`` followed by ``/`` (``gs://b``, ``S3:/b``), or any ``s3:`` form.
_URL_LIKE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:/|[sS]3:)")


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


def _parse(where) -> "Path | ObjectPath":
    """``s3://bucket/prefix`` (exactly so) -> :class:`ObjectPath`; a local path -> ``Path``; anything else that looks
    like a URL (``S3://b/x``, ``s3:/b/x``, ``gs://b/x``) -> ValueError naming it, never a local folder ``S3:``."""
    if isinstance(where, ObjectPath):
        return where
    text = str(where)
    if text.startswith(S3_SCHEME):
        return ObjectPath(text)
    if _URL_LIKE.match(text):
        raise ValueError(f"storage location {text!r} is not a local path and not an object-store URL we serve: "
                         f"write s3://bucket/prefix exactly (lower-case s3, two slashes), or a local directory")
    return Path(where).expanduser()


def is_remote(where) -> bool:
    return isinstance(_parse(where), ObjectPath)


def location(where: str | Path | ObjectPath) -> Location:
    """A configured location: ``s3://...`` -> :class:`ObjectPath`, a local path -> an expanded ``Path``; a URL of
    another form or scheme -> ValueError naming it."""
    return _parse(where)


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


def store_for(where: str | Path | ObjectPath) -> Store:
    where = location(where)
    if isinstance(where, ObjectPath):
        from .s3_store import S3Store  # s3fs only where a location is s3://

        return S3Store(where)
    return LocalStore(where)
