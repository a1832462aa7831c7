"""The storage interface without a server: locations, the retry policy, error classification, local publish, and
a store of a new scheme registered with one line (the lease and the compare-and-swap come with it)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from noiserefine.storage import STORES, LocalStore, ObjectPath, Store, VersionConflict, is_remote, location, retries, \
    s3, store_for
from noiserefine.storage.locks import CacheLockedError, LeaseLostError, check_lease
from noiserefine.storage.retries import RetryPolicy, StorageUnavailable


def test_locations():
    where = location("s3://bucket/some/prefix/")
    assert isinstance(where, ObjectPath) and str(where) == "s3://bucket/some/prefix"
    assert str(where / "shard-000001.tar") == "s3://bucket/some/prefix/shard-000001.tar"
    assert (where / "x.tar").name == "x.tar" and (where / "x.tar").parent == where
    assert where.fs_path == "bucket/some/prefix" and location(where) is where
    assert location("~/cache") == Path.home() / "cache"
    assert isinstance(store_for("cache/x"), LocalStore) and isinstance(store_for(where), s3.S3Store)
    with pytest.raises(ValueError, match="names no bucket"):
        ObjectPath("s3:///prefix")


def test_retries_are_bounded_then_name_the_call(monkeypatch):
    sleeps = []
    monkeypatch.setattr(retries.time, "sleep", sleeps.append)
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=1.5)
    with pytest.raises(StorageUnavailable, match=r"GET s3://b/k: the object store failed 4 times .*Connection refused"):
        policy.run("GET s3://b/k", refused)
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0.5 * d <= s <= d for s, d in zip(sleeps, [0.5, 1.0, 1.5]))  # jittered, capped backoff
    flaky = iter([ConnectionResetError(), TimeoutError(), None])

    def recovers():
        error = next(flaky)
        if error is not None:
            raise error
        return "bytes"

    assert policy.run("GET", recovers) == "bytes"
    with pytest.raises(FileNotFoundError):  # not transient: raised at once
        policy.run("GET", lambda: (_ for _ in ()).throw(FileNotFoundError("gone")))


def test_transient_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    def wrapped(code: str, status: int) -> OSError:  # what s3fs raises: an OSError caused by the ClientError
        error = OSError(errno.EIO, "message")
        error.__cause__ = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")
        return error

    assert retries.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert retries.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert retries.is_transient(wrapped("SlowDown", 503)) and retries.is_transient(wrapped("InternalError", 500))
    assert not retries.is_transient(wrapped("AccessDenied", 403))
    assert not retries.is_transient(FileNotFoundError("s3://b/shard-000500.tar"))
    assert not retries.is_transient(OSError("s3://b/shard-000500.tar: something else"))
    assert not retries.is_transient(ValueError("bad bytes"))


def test_local_publish_is_all_or_nothing(tmp_path):
    store = store_for(tmp_path / "cache")
    store.write_bytes("a.tar", b"complete")
    with pytest.raises(RuntimeError):
        with store.publish("a.tar") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert store.read_bytes("a.tar") == b"complete" and store.names() == ["a.tar"]  # no temp file left
    assert store.sizes() == {"a.tar": 8} and store.read_range("a.tar", 2, 5) == b"mpl"


class MemoryStore(Store):
    """A versioned store in a dict, with generation numbers (as GCS has): what a new scheme implements.
    Objects live in ``MemoryStore.objects`` (shared: every store of a location sees the same bytes)."""

    objects: dict[str, tuple[bytes, str]] = {}
    guard = threading.Lock()

    def __init__(self, where):
        self.location = where

    def _key(self, name):
        return str(self.path(name))

    def size(self, name):
        entry = self.objects.get(self._key(name))
        return None if entry is None else len(entry[0])

    def names(self):
        prefix = str(self.location) + "/"
        return sorted({k[len(prefix):].split("/")[0] for k in self.objects if k.startswith(prefix)})

    def read_bytes(self, name):
        return self.objects[self._key(name)][0]

    def delete(self, name):
        self.objects.pop(self._key(name), None)

    def version(self, name):
        entry = self.objects.get(self._key(name))
        return None if entry is None else entry[1]

    def read_versioned(self, name):
        return self.objects.get(self._key(name), (None, None))

    def create(self, name, data):
        with self.guard:
            if self._key(name) in self.objects:
                raise VersionConflict(name)
            return self._put(name, data)

    def replace(self, name, data, version):
        with self.guard:
            if self.version(name) != version:
                raise VersionConflict(name)
            return self._put(name, data)

    def _put(self, name, data):
        generation = str(int(self.version(name) or 0) + 1)
        self.objects[self._key(name)] = (bytes(data), generation)
        return generation


@pytest.fixture
def memory_scheme(monkeypatch):
    monkeypatch.setitem(STORES, "mem", MemoryStore)
    monkeypatch.setattr(MemoryStore, "objects", {})
    return "mem://bucket/cache"


def test_a_registered_scheme_gets_the_lease_and_the_compare_and_swap(memory_scheme):
    """The lock and the manifest's compare-and-swap are written against the Store interface only: a store of a
    new scheme (versions are generation numbers here) gets both from its four conditional operations."""
    store = store_for(memory_scheme)
    assert isinstance(store, MemoryStore) and is_remote(memory_scheme) and str(store.path("x")) == memory_scheme + "/x"
    refused = []

    def second_job():
        try:
            with store_for(memory_scheme).job_lock(60.0):
                refused.append(False)
        except CacheLockedError as error:
            refused.append(str(error))

    with store.job_lock(60.0):
        assert json.loads(store.read_bytes(".lock"))["pid"] == os.getpid()
        thread = threading.Thread(target=second_job)  # another thread is another job
        thread.start()
        thread.join()
        writers = [threading.Thread(target=store.read_modify_write,
                                    args=("counter", lambda old: str(int(old or b"0") + 1).encode()))
                   for _ in range(8)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    assert refused and refused[0] and "lease expires in" in refused[0]
    assert store.read_bytes("counter") == b"8" and store.names() == ["counter"]  # no update lost; lease released


def test_a_registered_scheme_loses_a_deleted_lease(memory_scheme):
    store = store_for(memory_scheme)
    with pytest.raises(LeaseLostError):
        with store.job_lock(0.4):
            store.delete(".lock")  # the job that took over finished and released it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the heartbeat (every ttl/4) has seen it
                check_lease(store.location)
                time.sleep(0.05)
    assert store.names() == []
