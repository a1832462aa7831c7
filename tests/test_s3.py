"""The teacher cache on an object store (``data.cache_root=s3://bucket/prefix``), against a real S3-protocol
server (moto) on 127.0.0.1: the same idempotence, byte-identity and verify behaviour as the disk cache.

The reference is the tiny disk cache of ``helpers_cache`` (4 shards of 16, generated in-process); the
S3 jobs are the real command (``pipeline/generate_targets.py``'s ``main``, in-process generation: Ray
is not what is tested here) with the same tiny config pointed at the bucket, run in this process (no
interpreter start-up; that a subprocess finds the server through the environment alone is shown by the
trainer reading an S3 cache in tests/faults/test_elastic.py).
"""

from __future__ import annotations

import hashlib
import threading

import pytest

from helpers_cache import REPO, tiny_cache, tiny_config, tiny_overrides, tiny_root, tiny_teacher  # noqa: F401
from helpers_s3 import object_etags, run_job_in_process, s3_url, upload_dir
from noiserefine.shards import read_manifest, read_shard
from noiserefine.storage import ObjectPath, store_for
from noiserefine.targets.cache import cache_dir_for, record_shards
from noiserefine.targets.scan import scan_cache
from noiserefine.targets.plan import Plan

pytestmark = pytest.mark.slow  # a real job (teacher rollouts) and a server: `make test` only


def local_bytes(cache) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("shard-*.tar"))}


def s3_bytes(url: str) -> dict[str, str]:
    store = store_for(url)
    return {name: hashlib.sha256(store.read_bytes(name)).hexdigest() for name in store.names()
            if name.startswith("shard-")}


def generate(root, teacher, *extra: str) -> tuple[int, str, str]:
    """The user's command (in-process generation: Ray is not what is tested here), run through its main."""
    return run_job_in_process(["--config", str(REPO / "configs" / "digits.yaml"), *tiny_overrides(root, teacher),
                               "pipeline.num_workers=0", *extra])


@pytest.fixture(scope="module")
def s3_job(s3_server, tiny_root, tiny_teacher):
    root = s3_url("generated")
    code, stdout, stderr = generate(tiny_root, tiny_teacher, f"data.cache_root={root}")
    assert code == 0, (stdout + stderr)[-4000:]
    cfg = tiny_config(tiny_root, tiny_teacher, [f"data.cache_root={root}"])
    return stdout, cfg, cache_dir_for(cfg)


def test_s3_cache_is_byte_identical_to_the_disk_cache(s3_job, tiny_cache):
    stdout, cfg, cache = s3_job
    assert isinstance(cache, ObjectPath) and stdout.strip().splitlines()[-1] == str(cache)
    assert cache.name == tiny_cache.name  # the location is not part of the teacher key
    assert s3_bytes(str(cache)) == local_bytes(tiny_cache)
    assert read_manifest(cache) == read_manifest(tiny_cache)  # manifest.parquet beside the shards
    store = store_for(cache)
    assert store.read_bytes("teacher.yaml") == (tiny_cache / "teacher.yaml").read_bytes()
    assert ".lock" not in store.names()  # the lease was released
    assert [s.key for s in read_shard(cache / "shard-000002.tar")] == \
        [s.key for s in read_shard(tiny_cache / "shard-000002.tar")]


def test_s3_rerun_skips_complete_shards_and_rewrites_nothing(s3_job, tiny_root, tiny_teacher):
    _, cfg, cache = s3_job
    before = object_etags(str(cache))
    state = scan_cache(cache, Plan.from_config(cfg.data), verify=True)  # what a re-run does first
    assert sorted(state.complete) == [0, 1, 2, 3] and not state.missing and not state.rejected
    assert object_etags(str(cache)) == before


def test_s3_verify_rebuilds_a_deleted_and_a_corrupted_shard_identically(s3_server, tiny_root, tiny_teacher,
                                                                         tiny_cache):
    root = s3_url("repair")
    cache = upload_dir(tiny_cache, root + "/" + tiny_cache.name)
    store = store_for(cache)
    store.delete("shard-000001.tar")
    data = bytearray(store.read_bytes("shard-000002.tar"))
    data[len(data) // 2] ^= 0xFF  # same size: only the verify re-hash sees it
    store.write_bytes("shard-000002.tar", bytes(data))
    untouched = {name: etag for name, etag in object_etags(cache).items() if name in ("shard-000000.tar",
                                                                                        "shard-000003.tar")}
    code, stdout, stderr = generate(tiny_root, tiny_teacher, f"data.cache_root={root}", "pipeline.verify=true")
    assert code == 0, (stdout + stderr)[-4000:]
    assert "2/4 shards complete, 2 to generate" in stdout and "rejected ['shard-000002.tar']" in stdout, stdout
    assert s3_bytes(cache) == local_bytes(tiny_cache)
    assert read_manifest(cache) == read_manifest(tiny_cache)
    etags = object_etags(cache)
    assert {name: etags[name] for name in untouched} == untouched  # complete shards were not rewritten
    assert [n for n in etags if n.startswith("rejected-shard-000002.tar.")]  # moved aside, not deleted


def test_concurrent_manifest_updates_on_s3_lose_no_row(s3_server, tiny_cache):
    """The manifest is written by compare-and-swap (If-Match its ETag): 8 recorders at once keep every row."""
    cache = s3_url("concurrent")
    rows = list(read_manifest(tiny_cache).values())
    from noiserefine.shards import ShardInfo

    infos = [ShardInfo(f"shard-{i:06d}.tar", 1, 10 + i, f"{i:064x}") for i in range(8)]
    threads = [threading.Thread(target=record_shards, args=(cache, [info])) for info in infos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(read_manifest(cache)) == sorted(info.name for info in infos)
    assert rows  # (the tiny cache exists: same session fixtures as the other tests)
