"""Found by ``bench/chaos.py`` (seed 3, 2026-12-07): cache job A was SIGSTOPped past its lease, job B took the
lease over, and A got SIGCONT while B ran. 0.1 s later A's main thread recorded a finished shard in the manifest:
it woke up before A's heartbeat thread, and the lease check only asked whether the heartbeat had seen the lease
lost. Nothing was lost that time (the row was B's row too), but a job that lost its lease must write nothing.
"""

from __future__ import annotations

import json
import time

import pytest

from helpers_s3 import s3_url
from noiserefine.shards import ShardInfo, read_manifest
from noiserefine.storage import store_for
from noiserefine.storage import locks as lock
from noiserefine.targets.cache import record_shards
from noiserefine.storage.locks import LeaseLostError, lease_lock


def test_a_job_waking_from_a_stall_past_its_lease_writes_nothing_before_its_heartbeat_runs(s3_server, monkeypatch):
    store = store_for(s3_url("chaos-found-stalled-job"))
    monkeypatch.setattr(lock._Lease, "start", lambda self: None)  # the woken job's heartbeat has not run yet
    row = ShardInfo("shard-000000.tar", 8, 1024, "0" * 64)
    with pytest.raises(LeaseLostError):
        with lease_lock(store, ttl_s=0.5):
            time.sleep(0.7)  # the stall: nothing of this job ran for longer than its TTL
            _, version = store.read_versioned(lock.LOCK_FILE)
            taker = {"pid": 1, "host": "other", "started": "x", "token": "job-b", "ttl_s": 60, "renewed": time.time()}
            store.replace(lock.LOCK_FILE, json.dumps(taker).encode(), version)  # job B takes the lease over
            record_shards(store.location, [row])  # job A wakes up: its main thread records a finished shard
    assert read_manifest(store.location) == {}  # nothing recorded by the job that lost its lease
    assert json.loads(store.read_bytes(lock.LOCK_FILE))["token"] == "job-b"  # and B's lease is untouched
