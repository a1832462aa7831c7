"""Where a teacher cache lives: a local directory or an object-store prefix, behind one small interface.

``location("cache/x")`` is a :class:`pathlib.Path`; ``location("s3://bucket/prefix")`` an
:class:`ObjectPath` (joins with ``/`` and has ``.name`` like a path, but is never opened as a
local file). :func:`store_for` gives the :class:`Store` of either, and the cache code only
talks to stores: exists, size, list, read (whole or a byte range), publish, delete, move, the
job lock and the manifest's read-modify-write (``base.py``).

Modules: ``base.py`` the interface (and the compare-and-swap), ``locks.py`` the job lock (flock
locally, a lease on a versioned store), ``local.py`` and ``s3.py`` the stores, ``retries.py``
the retry policy, ``errors.py``. A store of another scheme is one module (a :class:`Store` with
the conditional writes ``version``/``read_versioned``/``create``/``replace``) and one line in
:data:`STORES`; nothing here imports a stage or, until a location of its scheme is used, a
store's client library.

Same semantics on every store:

- A file appears only complete. Local: temp name + fsync + ``os.replace``. S3: written to a
  local temp file first, then one PUT (a multipart upload above s3fs's threshold, completed
  only after every part arrived; aborted on error), so there is never a visible partial object.
- Reads retry transient errors (connection refused or reset, timeouts, 5xx, a body cut short)
  with bounded exponential backoff (``retries.py``'s :class:`RetryPolicy`, ``data.io_retries`` /
  ``data.io_backoff_s``), then raise :class:`StorageUnavailable` naming the object and the
  attempts. A whole-object read is a series of ranged GETs of ``data.io_chunk_bytes``: a read
  that breaks resumes from the offset reached, not from byte 0. Errors that are not transient
  (a missing bucket, access denied) name the operation, the object and the cause.
- The job lock and the manifest lock (``locks.py``): ``fcntl.flock`` locally; on a versioned
  store a lease object written by conditional create / replace, and a manifest written by
  compare-and-swap.

S3 goes through s3fs (fsspec; ``s3.py``): it passes ``IfNoneMatch``/``IfMatch`` through to PutObject,
which the locks need and ``pyarrow.fs.S3FileSystem`` cannot express, and it maps S3 errors to
Python ones. Credentials, region and endpoint come from botocore's usual chain (the
``AWS_*`` environment variables, ``~/.aws/config`` and ``credentials``, instance metadata;
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), never from our configs.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from .base import Location, ObjectPath, Store
from .errors import BucketNotFoundError, VersionConflict
from .local import LocalStore
from .retries import StorageUnavailable, configure

__all__ = ["BucketNotFoundError", "Location", "LocalStore", "ObjectPath", "STORES", "Store", "StorageUnavailable",
           "VersionConflict", "configure", "is_remote", "location", "store_for"]

# URL scheme -> its Store class, or "module:Class" imported on first use (s3fs only where an s3:// location is used).
STORES: dict[str, str | type[Store]] = {"s3": "noiserefine.storage.s3:S3Store"}

# Something that looks like a URL: ``scheme:`` then ``/`` (``gs://b``, ``S3:/b``). A registered scheme followed by
# ``:`` in any case (``s3:bucket``, ``S3:b``) is refused too.
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def _parse(where) -> Location:
    """``<scheme>://bucket/prefix`` of a registered scheme, exactly so -> :class:`ObjectPath`; a local path ->
    ``Path``; anything else that looks like a URL (``S3://b/x``, ``s3:/b/x``, ``s3:b``, ``gs://b/x`` while gs is
    not registered) -> ValueError naming it, never a local folder ``S3:``."""
    if isinstance(where, ObjectPath):
        return where
    text = str(where)
    scheme, sep, _ = text.partition("://")
    if sep and scheme in STORES:
        return ObjectPath(text)
    if _URL_LIKE.match(text) or (":" in text and text.partition(":")[0].lower() in STORES):
        served = ", ".join(f"{name}://bucket/prefix" for name in sorted(STORES))
        raise ValueError(f"storage location {text!r} is not a local path and not an object-store URL we serve: "
                         f"write {served} exactly (lower-case scheme, two slashes), or a local directory")
    return Path(where).expanduser()


def is_remote(where) -> bool:
    return isinstance(_parse(where), ObjectPath)


def location(where: str | Path | ObjectPath) -> Location:
    """A configured location: a registered ``scheme://...`` -> :class:`ObjectPath`, a local path -> an expanded
    ``Path``; a URL of another form or scheme -> ValueError naming it."""
    return _parse(where)


def store_for(where: str | Path | ObjectPath) -> Store:
    where = location(where)
    if isinstance(where, ObjectPath):
        factory = STORES[where.scheme]
        if isinstance(factory, str):
            module, _, name = factory.partition(":")
            factory = getattr(importlib.import_module(module), name)
        return factory(where)
    return LocalStore(where)
