"""Faults of the object-store cache: the S3 server restarted or down in the middle of a generation job and of
a training epoch, and the job lock's lease (a second job, a killed job, a job that lost its lease).

The server is moto's, on 127.0.0.1, in this process (``helpers_s3``): a restart keeps its objects and
refuses connections while it is down, as a real endpoint would.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time

import pytest

from helpers_cache import REPO, tiny_config, tiny_overrides
from helpers_s3 import run_job_in_process, s3_url, upload_dir
from noiserefine import retries, s3_store, storage
from noiserefine.shards import read_manifest
from noiserefine.storage import StorageUnavailable, store_for
from noiserefine.targets.cache import cache_dir_for, hold_cache, record_shards
from noiserefine.targets.lock import CacheLockedError, LeaseLostError
from noiserefine.train.stream import TeacherStream

pytestmark = pytest.mark.slow
LATENT = (1, 16, 16)


@pytest.fixture
def io_settings():
    """Restore the process's retry policy and chunk size after a test changes them."""
    saved = (retries._policy, retries._chunk_bytes)
    yield
    retries._policy, retries._chunk_bytes = saved


def configure(cfg) -> None:
    storage.configure(cfg.data)


# --- generation -----------------------------------------------------------------------------------------

def test_server_restarted_mid_job_the_job_completes_with_nothing_lost(s3_server, tiny_root, tiny_teacher,
                                                                      tiny_cache, monkeypatch):
    """The server goes down for 1.5 s right after the job's second shard arrives: the job's next requests are
    retried with backoff, it completes, and the cache is the disk cache byte for byte, each shard once."""
    from moto.s3.models import S3Backend

    original, fired = S3Backend.put_object, threading.Event()

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        result = original(self, bucket_name, key_name, *args, **kwargs)
        if key_name.endswith("/shard-000001.tar") and not fired.is_set():
            fired.set()
            s3_server.restart_in_background(down_s=1.5)
        return result

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    root = s3_url("restart-mid-job")
    code, stdout, stderr = run_job_in_process(["--config", str(REPO / "configs" / "digits.yaml"),
                                               *tiny_overrides(tiny_root, tiny_teacher), f"data.cache_root={root}",
                                               "pipeline.num_workers=0", "data.io_retries=8",
                                               "data.io_backoff_s=0.25"])
    assert code == 0, (stdout + stderr)[-4000:]
    assert fired.is_set() and "retry 1/8" in stderr, stderr[-3000:]  # it did see the server go
    cache = cache_dir_for(tiny_config(tiny_root, tiny_teacher, [f"data.cache_root={root}"]))
    store = store_for(cache)
    shards = sorted(n for n in store.names() if n.startswith("shard-"))
    assert shards == sorted(p.name for p in tiny_cache.glob("shard-*.tar"))  # each shard once, no leftovers
    for name in shards:
        assert store.read_bytes(name) == (tiny_cache / name).read_bytes(), name
    assert read_manifest(cache) == read_manifest(tiny_cache)


def test_server_down_the_job_fails_after_bounded_retries_naming_the_object(s3_server, tiny_root, tiny_teacher,
                                                                          io_settings):
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_root={s3_url('down')}", "data.io_retries=2",
                                                "data.io_backoff_s=0.05"])
    configure(cfg)
    s3_server.stop()
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            with hold_cache(cfg):
                pass
    finally:
        s3_server.start()
    message = str(caught.value)
    assert str(cache_dir_for(cfg)) in message and "failed 3 times" in message and "data.io_retries" in message
    assert time.monotonic() - started < 30


# --- training: streaming shards ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_cache(s3_server, tiny_cache) -> str:
    return upload_dir(tiny_cache, s3_url("stream", tiny_cache.name))


def streams(tiny_root, tiny_teacher, cache: str, local) -> tuple[TeacherStream, TeacherStream]:
    """The same rank's stream over the S3 copy and over the disk cache (rank 1 of 2, global batch 8)."""
    configure(tiny_config(tiny_root, tiny_teacher, ["data.io_retries=8", "data.io_backoff_s=0.2",
                                                    "data.io_chunk_bytes=4096"]))
    manifest = read_manifest(local)

    def make(where) -> TeacherStream:  # the disk cache's directory name is its teacher key
        return TeacherStream(where, manifest, teacher_key=local.name, seed=0, rank=1, world_size=2,
                             global_batch_size=8, latent_shape=LATENT)

    return make(cache), make(local)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return [x["sample_id"] for x in a] == [y["sample_id"] for y in b] and all(
        (x["target"] == y["target"]).all() and (x["noise"] == y["noise"]).all() for x, y in zip(a, b))


def test_server_restarted_mid_epoch_the_read_resumes_at_the_offset_reached(s3_server, s3_cache, tiny_root,
                                                                            tiny_teacher, tiny_cache, io_settings,
                                                                            monkeypatch):
    """Each shard is read in ranged GETs of 4 KiB; the server goes down in the middle of the second shard's read
    and is back 1 s later: the read is retried with backoff from the chunk it had reached, the epoch's batches
    are those of the disk cache, and the sha256/fingerprint checks passed on every sample."""
    remote, local = streams(tiny_root, tiny_teacher, s3_cache, tiny_cache)
    fs = s3_store.s3_filesystem()
    calls, original = [], fs.cat_file

    def cat_file(path, start=None, end=None, **kwargs):
        calls.append((path.rsplit("/", 1)[-1], start))
        shard_reads = [c for c in calls if c[0].startswith("shard-")]
        if len(shard_reads) == 18:  # 13 chunks per shard: the 5th chunk of the second shard read
            s3_server.stop()
            threading.Timer(1.0, s3_server.start).start()
        return original(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(fs, "cat_file", cat_file)
    got = list(remote.epoch_batches(0))
    assert same_batches(got, list(local.epoch_batches(0)))
    shard_reads = [c for c in calls if c[0].startswith("shard-")]
    failed = shard_reads[17]
    assert failed[1] > 0 and shard_reads[18] == failed, shard_reads[12:22]  # retried at that offset, not at 0
    assert shard_reads.count((failed[0], 0)) == 1  # the shard was not read again from its start


def test_server_down_mid_epoch_the_stream_fails_naming_the_shard(s3_server, s3_cache, tiny_root, tiny_teacher,
                                                                tiny_cache, io_settings, monkeypatch):
    remote, _ = streams(tiny_root, tiny_teacher, s3_cache, tiny_cache)
    retries._policy = retries.RetryPolicy(attempts=3, backoff_s=0.05)
    batches = remote.batches()
    next(batches)  # the first shard was read
    s3_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match=r"s3://.*/shard-\d+\.tar.*failed 3 times"):
            list(itertools.islice(batches, 20))
        assert time.monotonic() - started < 30
    finally:
        s3_server.start()


# --- the job lock's lease ---------------------------------------------------------------------------------

def lease_config(tiny_root, tiny_teacher, name: str, ttl: float = 120.0):
    return tiny_config(tiny_root, tiny_teacher, [f"data.cache_root={s3_url(name)}", f"pipeline.lock_ttl_s={ttl}"])


def test_a_second_job_is_refused_naming_the_first(s3_server, tiny_root, tiny_teacher):
    cfg = lease_config(tiny_root, tiny_teacher, "lease-busy")
    errors = []

    def second_job():
        try:
            with hold_cache(cfg):
                errors.append(None)
        except CacheLockedError as error:
            errors.append(str(error))

    with hold_cache(cfg) as cache:
        assert ".lock" in store_for(cache).names()
        thread = threading.Thread(target=second_job)  # another thread is another job
        thread.start()
        thread.join()
    assert errors and errors[0] is not None and f"pid {os.getpid()}" in errors[0] and "lease expires in" in errors[0]
    assert ".lock" not in store_for(cache).names()  # released at the end


def test_a_killed_jobs_lease_expires_and_is_taken_over(s3_server, tiny_root, tiny_teacher, capsys):
    cfg = lease_config(tiny_root, tiny_teacher, "lease-killed")
    cache = cache_dir_for(cfg)
    stale = {"pid": 4242, "host": "gone", "started": "2026-01-01T00:00:00Z", "token": "dead", "ttl_s": 5.0,
             "renewed": time.time() - 60}
    store_for(cache).write_bytes(".lock", json.dumps(stale).encode())  # what a SIGKILLed job leaves behind
    with hold_cache(cfg):
        held = json.loads(store_for(cache).read_bytes(".lock"))
        assert held["pid"] == os.getpid() and held["token"] != "dead"
    assert "took over the expired lease of pid 4242 on host gone" in capsys.readouterr().err
    fresh = {**stale, "renewed": time.time()}  # a live job's lease is not taken over
    store_for(cache).write_bytes(".lock", json.dumps(fresh).encode())
    with pytest.raises(CacheLockedError, match="pid 4242 on host gone"):
        with hold_cache(cfg):
            pass


def test_a_job_that_lost_its_lease_stops_writing(s3_server, tiny_root, tiny_teacher, tiny_cache):
    """The job stalled past its TTL and another job took the lease over: its next manifest update raises."""
    cfg = lease_config(tiny_root, tiny_teacher, "lease-lost", ttl=0.8)
    row = next(iter(read_manifest(tiny_cache).values()))
    with pytest.raises(LeaseLostError, match="another job took over the lease"):
        with hold_cache(cfg) as cache:
            store = store_for(cache)
            info = store.info(".lock")
            taker = {"pid": 1, "host": "other", "started": "x", "token": "other", "ttl_s": 60, "renewed": time.time()}
            store.put_if(".lock", json.dumps(taker).encode(), etag=info["ETag"])  # the takeover
            time.sleep(0.6)  # the heartbeat (every ttl/4) finds its lease gone
            record_shards(cache, [row])
    assert read_manifest(cache) == {}  # nothing was recorded by the job that lost its lease
    assert json.loads(store.read_bytes(".lock"))["token"] == "other"  # and it did not delete the taker's lease


# --- issue 21: conditional-write conflicts, a deleted lease, foreign prefixes, errors that are not transient ----

CONFLICT = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code><Message>A '
            'conflicting conditional operation is currently in progress against this resource.</Message></Error>')


@pytest.fixture
def conflict_once(monkeypatch):
    """The server answers the first conditional PUT of each key whose name is in the returned set with
    409 ConditionalRequestConflict (what S3 answers when conditional writes race), then serves normally."""
    from moto.s3.responses import S3Response

    original, names, answered = S3Response.put_object, set(), []

    def put_object(self):
        conditional = self.headers.get("If-Match") or self.headers.get("If-None-Match")
        name = self.path.rsplit("/", 1)[-1].split("?")[0]
        if conditional and name in names and name not in answered:
            answered.append(name)
            return 409, {"Content-Type": "application/xml"}, CONFLICT
        return original(self)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    yield names
    assert sorted(answered) == sorted(names)  # the conflict was served


def test_a_409_conflict_on_the_lease_or_the_manifest_is_retried_not_an_error(s3_server, conflict_once):
    from noiserefine.shards import ShardInfo

    cache = s3_url("conflict")
    conflict_once.update({".lock", "manifest.parquet"})
    store = store_for(cache)
    row = ShardInfo("shard-000000.tar", 1, 10, "0" * 64)
    with store.job_lock(60.0):
        assert json.loads(store.read_bytes(".lock"))["pid"] == os.getpid()
        record_shards(cache, [row])
    assert read_manifest(cache) == {row.name: row} and ".lock" not in store.names()


def test_a_lease_deleted_by_the_job_that_took_over_is_lost_not_renewed_forever(s3_server, capsys):
    """Job A stalled past its TTL, job B took over, finished and deleted the lock: A's renewal meets a 404
    (If-Match on a missing object). A has lost its lease: its next manifest update raises, nothing is written,
    and it creates no lock of its own."""
    from noiserefine.shards import ShardInfo

    cache = s3_url("lease-deleted")
    store = store_for(cache)
    with pytest.raises(LeaseLostError, match="lease"):
        with store.job_lock(0.8):
            store.delete(".lock")  # B's takeover and its release at the end, as A sees them
            time.sleep(0.6)  # A's heartbeat (every ttl/4) renews against the missing object
            record_shards(cache, [ShardInfo("shard-000000.tar", 1, 10, "0" * 64)])
    assert store.names() == []  # no manifest written, no lock re-created
    assert "retrying" not in capsys.readouterr().err


def test_a_renewal_whose_put_landed_but_whose_answer_was_lost_keeps_the_lease(s3_server, monkeypatch):
    """The renewal's PUT reached the server, the connection broke before the answer; the retried PUT meets
    412 (the ETag changed: by our own write). The lease is still ours (its token): not lost."""
    from noiserefine.shards import ShardInfo

    cache = s3_url("lease-landed")
    store = store_for(cache)
    original, dropped = s3_store.S3Store.put_if, []

    def put_if(self, name, data, *, etag):
        result = original(self, name, data, etag=etag)
        if name == ".lock" and etag is not None and not dropped:
            dropped.append(etag)
            raise s3_store.PreconditionFailed("the retried PUT found its own write")
        return result

    monkeypatch.setattr(s3_store.S3Store, "put_if", put_if)
    with store.job_lock(0.8):
        time.sleep(0.6)
        record_shards(cache, [ShardInfo("shard-000000.tar", 1, 10, "0" * 64)])
    assert dropped and list(read_manifest(cache)) == ["shard-000000.tar"]


def test_a_prefix_holding_only_a_sub_prefix_is_foreign(s3_server, tiny_root, tiny_teacher):
    """``sub/nested.csv`` under the prefix is content (a local directory with a subdirectory is refused too)."""
    prefix = s3_url("foreign-nested")
    store_for(prefix + "/sub").write_bytes("nested.csv", b"a,b\n")
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_dir={prefix}"])
    with pytest.raises(ValueError, match=r"not a teacher cache of ours.*holds sub"):
        with hold_cache(cfg):
            pass
    assert store_for(prefix).names() == ["sub"]  # nothing written beside it


def test_a_missing_bucket_is_an_error_naming_it_not_an_empty_cache(s3_server, tiny_root, tiny_teacher):
    url = "s3://no-such-bucket-21/cache"
    store = store_for(url)
    for call in (store.names, lambda: store.size("teacher.yaml"), lambda: store.read_bytes("teacher.yaml")):
        with pytest.raises(ValueError, match=r"bucket 'no-such-bucket-21' does not exist"):
            call()
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_root={url}"])
    with pytest.raises(ValueError, match=r"s3://no-such-bucket-21/cache.*bucket 'no-such-bucket-21' does not exist"):
        with hold_cache(cfg):
            pass


def test_access_denied_names_the_operation_and_the_object(s3_server, monkeypatch):
    from moto.s3.responses import S3Response

    denied = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied'
              '</Message></Error>')
    monkeypatch.setattr(S3Response, "put_object", lambda self: (403, {"Content-Type": "application/xml"}, denied))
    url = s3_url("denied")
    with pytest.raises(PermissionError) as caught:
        store_for(url).write_bytes("teacher.yaml", b"x")
    message = str(caught.value)
    assert f"PUT {url}/teacher.yaml" in message and "AccessDenied" in message and "credentials" in message
