"""The storage interface without a server: locations, the retry policy, error classification, local publish."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from noiserefine import retries, s3_store
from noiserefine.retries import RetryPolicy, StorageUnavailable
from noiserefine.storage import LocalStore, ObjectPath, location, store_for


def test_locations():
    where = location("s3://bucket/some/prefix/")
    assert isinstance(where, ObjectPath) and str(where) == "s3://bucket/some/prefix"
    assert str(where / "shard-000001.tar") == "s3://bucket/some/prefix/shard-000001.tar"
    assert (where / "x.tar").name == "x.tar" and (where / "x.tar").parent == where
    assert where.fs_path == "bucket/some/prefix" and location(where) is where
    assert location("~/cache") == Path.home() / "cache"
    assert isinstance(store_for("cache/x"), LocalStore) and isinstance(store_for(where), s3_store.S3Store)
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
