"""The storage interface: a location (a local path, or ``<scheme>://bucket/prefix``) and the :class:`Store`
that every cache operation goes through. Generic: it imports no stage and no store's client library.

A store with versioned objects (S3 ETags, GCS generation numbers) implements the four conditional
operations (:meth:`Store.version`, :meth:`Store.read_versioned`, :meth:`Store.create`,
:meth:`Store.replace`); the job lock (a lease, ``locks.py``) and the manifest's compare-and-swap
(:meth:`Store.read_modify_write`) are written once, here, in terms of those four. A version is an
opaque token: only ever compared for equality and handed back to the same store.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

from .errors import VersionConflict
from .locks import lease_lock


class ObjectPath:
    """``<scheme>://bucket/key/prefix``: joins (``/``) and names (``.name``) like a path, opened only through a
    store."""

    def __init__(self, url: str):
        scheme, sep, rest = url.partition("://")
        if not sep or not scheme:
            raise ValueError(f"not an object-store URL: {url!r}")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{url!r} names no bucket (expected {scheme}://bucket/prefix)")
        self.scheme, self.bucket, self.key = scheme, bucket, key.strip("/")

    def _at(self, key: str) -> "ObjectPath":
        return ObjectPath(f"{self.scheme}://{self.bucket}/{key}")

    def __truediv__(self, name: str) -> "ObjectPath":
        name = str(name).strip("/")
        return self._at(f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1] if self.key else self.bucket

    @property
    def parent(self) -> "ObjectPath":
        return self._at(self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def fs_path(self) -> str:  # the fsspec form: bucket/key
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


Location = Union[Path, ObjectPath]


class Store:
    """A directory of named files (no subdirectories of ours): the cache's shards, manifest, teacher record, locks."""

    location: Location

    def path(self, name: str) -> Location:
        return self.location / name

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Names directly in the store, sub-directories (prefixes) included ([] if it does not exist)."""
        raise NotImplementedError

    def sizes(self) -> dict[str, int]:
        """{name: size} of every file directly in the store, from one listing ({} if it does not exist)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    @contextlib.contextmanager
    def publish(self, name: str, exclusive: bool = False) -> Iterator[Path]:
        """Yield a local temp path to write; on success it becomes ``name`` complete, in one step.
        ``exclusive``: never replace an existing ``name``; one already there must hold the same bytes (written
        by another job or an earlier attempt: nothing is written), else ``FileExistsError`` naming it."""
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

    # --- conditional writes (versioned stores) -------------------------------------------------------------

    def version(self, name: str) -> str | None:
        """The current version token of ``name`` (None if absent)."""
        raise NotImplementedError

    def read_versioned(self, name: str) -> tuple[bytes | None, str | None]:
        """The object and the version of exactly those bytes; (None, None) if absent."""
        raise NotImplementedError

    def create(self, name: str, data: bytes) -> str:
        """Write ``name`` only if it does not exist; its version. :class:`VersionConflict` if it exists."""
        raise NotImplementedError

    def replace(self, name: str, data: bytes, version: str) -> str:
        """Write ``name`` only if it still has ``version``; the new version. :class:`VersionConflict` if it
        changed or is gone."""
        raise NotImplementedError

    # --- built on the above ----------------------------------------------------------------------------------

    def job_lock(self, ttl_s: float | None = None):
        """The one-job-writes-this-cache lock (``locks.py``): here a lease object, re-entrant in its thread."""
        return lease_lock(self, ttl_s)

    def read_modify_write(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Replace ``name`` by ``change(current bytes or None)`` without losing a concurrent writer's change:
        compare-and-swap (read with its version, write only if still that version, else read and merge again)."""
        for _ in range(100):
            old, version = self.read_versioned(name)
            new = change(old)
            if new is None:
                return
            try:
                if version is None:
                    self.create(name, new)
                else:
                    self.replace(name, new, version)
                return
            except VersionConflict:
                time.sleep(random.random() * 0.2)
        raise OSError(f"{self.path(name)}: 100 concurrent updates in a row lost the compare-and-swap")
