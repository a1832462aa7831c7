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
with POSIX locks), between machines; it does not exist on object stores. There (``s3://``):

- ``.lock`` is a *lease* object (:func:`lease_lock`): created with a conditional PUT
  (``If-None-Match: *``: exactly one creator wins), renewed every ``ttl/4`` by a heartbeat
  thread with ``If-Match: <its ETag>``, deleted at the end. A killed job cannot delete it: the
  next job waits for the lease to expire (``pipeline.lock_ttl_s`` after its last renewal, by
  the wall clocks of the two machines: keep them in NTP sync) and then takes it over with
  ``If-Match`` on the expired lease's ETag (of two jobs taking over at once, one wins). A job
  whose renewal fails because another job took over (it stalled past its TTL) has *lost* the
  lease: its next manifest update or rename raises instead of writing.
- The manifest needs no lock object: ``Store.read_modify_write`` does a compare-and-swap
  (PUT ``If-Match`` the ETag it read), so concurrent recorders never lose each other's rows.
- Only the lease holder deletes or moves anything (rejected shards); shards themselves are
  deterministic and only ever appear complete, so a duplicate writer could only write the
  same bytes again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
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


# --- object stores: a lease object -------------------------------------------------------------------

DEFAULT_LEASE_TTL_S = 120.0
_leases: dict[tuple[str, int], "_Lease"] = {}  # (location, thread id) -> the lease this thread holds


class LeaseLostError(CacheLockedError):
    """This job's lease on an object-store cache was taken over by another job (it stalled past its TTL)."""


def _describe(holder: dict, now: float) -> str:
    try:
        left = float(holder["renewed"]) + float(holder["ttl_s"]) - now
        return (f"pid {holder['pid']} on host {holder['host']}, since {holder['started']}; its lease expires in "
                f"{max(left, 0):.0f} s unless renewed")
    except (KeyError, TypeError, ValueError):
        return "holder unknown: its lease object is unreadable"


class _Lease:
    def __init__(self, store, ttl_s: float):
        self.store, self.ttl_s = store, float(ttl_s)
        self.token = secrets.token_hex(8)
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.etag: str | None = None
        self.lost: str | None = None
        self.renewed_at = time.monotonic()  # of the last write of the lease that the store confirmed
        self.depth = 1
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                            "token": self.token, "renewed": time.time(), "ttl_s": self.ttl_s}) + "\n").encode()

    def acquire(self) -> None:
        from ..s3_store import PreconditionFailed

        where = self.store.location
        for _ in range(20):
            try:
                self.etag = self.store.put_if(LOCK_FILE, self.record(), etag=None)
                self.renewed_at = time.monotonic()
                return
            except PreconditionFailed:
                pass
            data, etag = self.store.read_with_etag(LOCK_FILE)
            if data is None:
                continue  # released in between: try again
            try:
                holder = json.loads(data.decode())
                expired = time.time() > float(holder["renewed"]) + float(holder["ttl_s"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                holder, expired = {}, True  # not a lease of ours: treated as expired
            if holder.get("token") == self.token:  # our retried PUT had landed
                self.etag, self.renewed_at = etag, time.monotonic()
                return
            if not expired:
                raise CacheLockedError(f"another job ({_describe(holder, time.time())}) is writing this cache {where}; "
                                       "wait for it to end (a killed job's lease expires after pipeline.lock_ttl_s) "
                                       "or use another data.cache_root")
            try:
                self.etag = self.store.put_if(LOCK_FILE, self.record(), etag=etag)
                self.renewed_at = time.monotonic()
            except PreconditionFailed:
                continue  # another job took it over first, or it was renewed: look again
            print(f"warning: {where}: took over the expired lease of {_describe(holder, time.time())} "
                  "(that job was killed or stalled)", file=sys.stderr, flush=True)
            return
        raise CacheLockedError(f"{where}: could not take the job lock (its lease object kept changing)")

    def _heartbeat(self) -> None:
        from ..s3_store import PreconditionFailed

        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._guard:
                    self.etag = self.store.put_if(LOCK_FILE, self.record(), etag=self.etag)
                    self.renewed_at = time.monotonic()
            except PreconditionFailed:
                # The lease object changed or is gone (404 on If-Match: a job that took over finished and
                # deleted it). Ours still only if it holds our token (a retried renewal that had landed).
                if self._still_ours():
                    continue
                self.lost = ("another job took over the lease, or took it and released it (this one stalled "
                             "past pipeline.lock_ttl_s)")
                print(f"ERROR: {self.store.location}: {self.lost}; this job stops writing", file=sys.stderr,
                      flush=True)
                return
            except Exception as error:  # noqa: BLE001 - the store is down: keep trying while the lease lasts
                print(f"warning: {self.store.location}: lease renewal failed ({error}); retrying until the lease "
                      "expires", file=sys.stderr, flush=True)

    def _still_ours(self) -> bool:
        """Re-read the lease: if it carries our token, adopt its current ETag (our own write) and keep it."""
        try:
            data, etag = self.store.read_with_etag(LOCK_FILE)
            ours = data is not None and json.loads(data.decode()).get("token") == self.token
        except Exception:  # noqa: BLE001 - unreadable or unreachable: not known to be ours
            return False
        if ours:
            with self._guard:
                self.etag, self.renewed_at = etag, time.monotonic()
        return ours

    def expired(self) -> bool:
        """No confirmed renewal for a whole TTL: another job may have taken the lease over by now."""
        return time.monotonic() - self.renewed_at > self.ttl_s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="noiserefine-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None:
            with contextlib.suppress(Exception):  # best effort: an unreleased lease expires by itself
                info = self.store.info(LOCK_FILE)
                if info is not None and info["ETag"] == self.etag:
                    self.store.delete(LOCK_FILE)


def check_lease(where) -> None:
    """Raise :class:`LeaseLostError` if this thread held a lease on ``where`` and lost it (no-op otherwise)."""
    lease = _leases.get((str(where), threading.get_ident()))
    if lease is None:
        return
    lost = lease.lost or (f"its lease could not be renewed for pipeline.lock_ttl_s={lease.ttl_s:g} s (another job "
                          "may have taken it over)" if lease.expired() else None)
    if lost:
        raise LeaseLostError(f"{where}: {lost}; nothing more is written by this job. Re-run the same "
                             "command: it skips every complete shard")


@contextlib.contextmanager
def lease_lock(store, ttl_s: float | None = None) -> Iterator[None]:
    """Hold the lease object ``.lock`` of an object-store cache (see the module docstring); re-entrant per thread."""
    key = (str(store.location), threading.get_ident())
    with _registry:
        lease = _leases.get(key)
        if lease is not None:
            lease.depth += 1
    if lease is not None:
        try:
            yield
        finally:
            with _registry:
                lease.depth -= 1
        return
    lease = _Lease(store, DEFAULT_LEASE_TTL_S if ttl_s is None else ttl_s)
    lease.acquire()
    lease.start()
    with _registry:
        _leases[key] = lease
    try:
        yield
    finally:
        with _registry:
            _leases.pop(key, None)
        lease.release()

