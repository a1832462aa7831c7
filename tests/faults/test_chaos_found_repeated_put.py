"""Found by ``bench/chaos.py`` (seeds 1 and 2, 2026-12-07): cache job A was SIGSTOPped past its lease, job B took
the lease over and wrote every shard; when A woke, one of its Ray workers (mid-shard when the stall began, or
handed the next shard by A's driver before its next lease check) PUT ``shard-000006.tar`` again. The bytes were
the same (shards are deterministic), but a recorded shard must never be rewritten: a shard is published only
if absent, and one already there must hold the same bytes.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers_s3 import s3_url
from noiserefine.shards import ShardSample, sample_key, write_shard
from noiserefine.storage import location, store_for

pytestmark = pytest.mark.slow  # the S3 case starts moto's server


def samples(offset: float = 0.0) -> list[ShardSample]:
    out = []
    for i in range(3):
        target = (np.random.default_rng(i).standard_normal((1, 4, 4)) + offset).astype(np.float16)
        meta = {"sample_id": i, "seed": i, "prompt": f"p{i}", "source": "unit", "teacher_key": "k",
                "noise_fingerprint": f"{i:016x}"}
        out.append(ShardSample(sample_key(i), meta, {"target": target}))
    return out


def test_a_local_shard_is_not_rewritten(tmp_path):
    path = tmp_path / "shard-000000.tar"
    first = write_shard(path, samples())
    inode, before = path.stat().st_ino, path.read_bytes()
    assert write_shard(path, samples()) == first  # the same deterministic bytes: nothing written
    assert path.stat().st_ino == inode
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        write_shard(path, samples(offset=1.0))  # other bytes under a published name: refused, never replaced
    assert path.stat().st_ino == inode and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]  # no temp file left behind


def test_an_s3_shard_is_put_once(s3_server, monkeypatch):
    from moto.s3.models import S3Backend

    original, stored = S3Backend.put_object, []

    def put_object(self, bucket_name, key_name, *args, **kwargs):
        stored.append(key_name)
        return original(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    path = location(s3_url("repeated-put", "shard-000000.tar"))
    first = write_shard(path, samples())
    before = store_for(path.parent).read_bytes(path.name)
    assert write_shard(path, samples()) == first  # the stalled worker's PUT: refused by the store, same bytes
    with pytest.raises(FileExistsError, match="shard-000000.tar"):
        write_shard(path, samples(offset=1.0))
    assert stored == ["repeated-put/shard-000000.tar"]  # stored exactly once
    assert store_for(path.parent).read_bytes(path.name) == before
