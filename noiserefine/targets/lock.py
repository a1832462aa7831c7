"""Locks of a teacher-cache directory: ``fcntl.flock`` on files in it, released by the kernel when
the holding process dies (a crashed or killed job leaves no stale lock behind).

- ``.lock``: the one job that writes the directory (the generator's driver) holds it for the
  whole job. A second job fails at once, naming the holder (pid, host and start time, which
  the holder writes into the file). Only the holder deletes or renames anything in the
  directory (stale temp files, rejected shards), so it never touches another job's files.
  Re-entrant within one thread; another thread of the same process is another job.
- ``.manifest.lock``: serialises the read-modify-write of ``manifest.parquet`` (blocking and
  short), so concurrent recorders (threads or processes) never lose each other's rows.

flock works between processes of one machine and, on Linux NFS clients (2.6.12+, emulated
with POSIX locks), between machines; it does not exist on object stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
MANIFEST_LOCK_FILE = ".manifest.lock"
LOCK_FILES = (LOCK_FILE, MANIFEST_LOCK_FILE)

_held: dict[tuple[str, int], list] = {}  # (real path of the directory, thread id) -> [fd, depth]
_registry = threading.Lock()


class CacheLockedError(RuntimeError):
    """Another job holds the cache directory's ``.lock``."""


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies: readable by the group
    except PermissionError:
        return os.open(path, os.O_RDONLY)  # another user's lock file: lockable, not writable


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its lock file is empty or unreadable"


def held_here(cache_dir: str | Path) -> bool:
    """Whether the calling thread holds ``cache_dir``'s job lock."""
    with _registry:
        return (os.path.realpath(cache_dir), threading.get_ident()) in _held


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold ``<cache_dir>/.lock`` (non-blocking): :class:`CacheLockedError` if another job holds it."""
    cache_dir = Path(cache_dir)
    key = (os.path.realpath(cache_dir), threading.get_ident())
    with _registry:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:  # re-entered by the holding thread
        try:
            yield
        finally:
            with _registry:
                entry[1] -= 1
        return
    fd = _open(cache_dir / LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise CacheLockedError(f"another job ({holder}) is writing this cache {cache_dir}; wait for it to end "
                               "(a killed job releases the lock at once) or use another data.cache_root") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with contextlib.suppress(OSError):  # a read-only lock file: the lock still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        with _registry:
            _held[key] = [fd, 1]
        yield
    finally:
        with _registry:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def manifest_lock(cache_dir: str | Path) -> Iterator[None]:
    """Hold ``<cache_dir>/.manifest.lock`` (blocking) around a read-modify-write of the manifest."""
    fd = _open(Path(cache_dir) / MANIFEST_LOCK_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
