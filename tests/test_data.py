"""Streaming the teacher cache: rank split, determinism, exact resume, integrity errors."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch

from helpers_cache import NUM_SHARDS, SHARD_SIZE, copy_cache, tiny_cache, tiny_config, tiny_root, tiny_teacher  # noqa: F401
from noiserefine.targets.cache import open_cache
from noiserefine.train.stream import DataPosition, TeacherStream
from noiserefine.noise import noise_from_seed
from noiserefine.shards import ShardInfo, ShardSample, read_manifest, read_shard, write_manifest, write_shard
from noiserefine.targets.cache import record_shards

ALL_IDS = set(range(NUM_SHARDS * SHARD_SIZE))


@pytest.fixture
def make_cfg(tiny_root, tiny_teacher):
    def make(*extra: str):
        return tiny_config(tiny_root, tiny_teacher, list(extra))
    return make


def stream(cfg, rank=0, world=1, **changes) -> TeacherStream:
    s = TeacherStream.from_config(cfg, rank, world)
    for key, value in changes.items():
        setattr(s, key, value)
    return s


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["sample_id"]]


def global_batches(cfg, world: int, count: int, start: int = 0, **changes) -> list[list[int]]:
    """The first ``count`` global batches (from ``start``) as sample-id lists: the ranks' slices in rank order."""
    streams = [stream(cfg, r, world, **changes) for r in range(world)]
    per_rank = [list(itertools.islice(s.batches(DataPosition(start)), count)) for s in streams]
    for rank_batches in per_rank:
        assert [b["index"] for b in rank_batches] == list(range(start, start + count))
    return [sum((rank_batches[i]["sample_id"] for rank_batches in per_rank), []) for i in range(count)]


def test_two_ranks_disjoint_cover_epoch_same_batch_count(make_cfg, tiny_cache):
    cfg = make_cfg()  # global batch 8: 4 per rank
    ranks = [stream(cfg, r, 2) for r in range(2)]
    per_epoch = NUM_SHARDS * SHARD_SIZE // cfg.train.global_batch_size
    for epoch in range(3):
        batches = [list(s.epoch_batches(epoch)) for s in ranks]
        ids = [ids_of(b) for b in batches]
        assert set(ids[0]).isdisjoint(ids[1])
        assert sorted(ids[0] + ids[1]) == sorted(ALL_IDS)  # every sample of the epoch exactly once
        assert len(batches[0]) == len(batches[1]) == per_epoch
        assert all(b["epoch"] == epoch and len(b["sample_id"]) == 4 for b in batches[0])
        assert [b["index"] for b in batches[0]] == list(range(epoch * per_epoch, (epoch + 1) * per_epoch))
    # the shard order is re-drawn every epoch (seeded by (train.seed, epoch))
    orders = {tuple(ranks[0].order.epoch_spans(e)[i].name for i in range(NUM_SHARDS)) for e in range(8)}
    assert len(orders) > 1
    # the batch content is the regenerated noise and the stored target
    batch = next(iter(ranks[0]))
    assert batch["noise"].dtype == batch["target"].dtype == torch.float32
    assert batch["noise"].shape == (4, 1, 16, 16) == batch["target"].shape
    torch.testing.assert_close(batch["noise"][3], noise_from_seed(batch["seed"][3], (1, 16, 16)), rtol=0, atol=0)
    assert all(isinstance(p, str) and p for p in batch["prompt"])


def test_global_sequence_does_not_depend_on_the_number_of_ranks_or_loader_workers(make_cfg, tiny_cache):
    """Elastic determinism: global batch b holds the same samples in the same order for 1, 2, 4 and 8 ranks."""
    cfg = make_cfg()  # global batch 8, 64 samples: 8 global batches per epoch
    one = global_batches(cfg, 1, 12)
    assert [len(b) for b in one] == [8] * 12
    assert sorted(sum(one[:8], [])) == sorted(ALL_IDS)
    for world in (2, 4, 8):
        assert global_batches(cfg, world, 12) == one, world
    assert global_batches(cfg, 2, 12, num_workers=2) == one
    assert global_batches(cfg, 4, 5, start=7) == one[7:12]  # a resumed position, on another rank count


def test_uneven_batches_straddle_epochs_and_every_rank_steps_alike(make_cfg, tiny_cache):
    """Global batch 6 over 3 ranks on 64 samples: batches cross epoch ends, none is short, no sample is lost."""
    cfg = make_cfg("train.global_batch_size=6")
    taken = global_batches(cfg, 3, 32)  # 192 positions: exactly 3 epochs
    assert [len(b) for b in taken] == [6] * 32
    flat = sum(taken, [])
    for epoch in range(3):
        assert sorted(flat[epoch * 64:(epoch + 1) * 64]) == sorted(ALL_IDS)
    assert global_batches(cfg, 2, 32) == taken == global_batches(cfg, 1, 32)


def test_a_rank_reads_only_the_shards_of_its_slices(make_cfg, tiny_cache):
    cfg = make_cfg("train.global_batch_size=64")  # 4 ranks x 16: each slice is one whole shard
    ranks = [stream(cfg, r, 4) for r in range(4)]
    assert [len(s.epoch_shards(0)) for s in ranks] == [1, 1, 1, 1]
    assert sorted(s.epoch_shards(0)[0] for s in ranks) == ranks[0].shard_names
    small = [stream(make_cfg(), r, 2) for r in range(2)]  # slices of 4 < a shard of 16: every shard
    assert all(sorted(s.epoch_shards(0)) == s.shard_names for s in small)


def test_loader_workers_keep_the_order(make_cfg, tiny_cache):
    cfg = make_cfg()
    for rank in range(2):
        plain = list(stream(cfg, rank, 2).epoch_batches(1))
        workers = list(stream(cfg, rank, 2, num_workers=2).epoch_batches(1))
        assert [b["sample_id"] for b in plain] == [b["sample_id"] for b in workers]


def test_deterministic_across_constructions(make_cfg, tiny_cache):
    cfg = make_cfg()
    for workers in (0, 2):
        runs = [list(itertools.islice(iter(stream(cfg, 1, 2, num_workers=workers)), 10)) for _ in range(2)]
        assert [b["sample_id"] for b in runs[0]] == [b["sample_id"] for b in runs[1]]
        assert [(b["epoch"], b["index"]) for b in runs[0]] == [(b["epoch"], b["index"]) for b in runs[1]]
        for a, b in zip(*runs):
            assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["target"], b["target"])


def test_resume_position_gives_exact_tail(make_cfg, tiny_cache):
    cfg = make_cfg()
    full = list(itertools.islice(iter(stream(cfg, 0, 2)), 20))
    for consumed in (3, 8, 13):  # mid-epoch and exactly at an epoch end (8 batches per epoch)
        first = stream(cfg, 0, 2)
        head = list(itertools.islice(iter(first), consumed))
        assert [b["sample_id"] for b in head] == [b["sample_id"] for b in full[:consumed]]
        state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
        assert state["batches"] == consumed
        resumed = stream(cfg, 0, 2)
        position = resumed.load_state_dict(state)
        tail = list(itertools.islice(resumed.batches(position), len(full) - consumed))
        assert [b["sample_id"] for b in tail] == [b["sample_id"] for b in full[consumed:]]
        assert [(b["epoch"], b["index"]) for b in tail] == [(b["epoch"], b["index"]) for b in full[consumed:]]
    assert DataPosition.from_dict({"batches": 3}) == DataPosition(3)
    with pytest.raises(ValueError, match="older trainers"):  # a per-rank position of the old stream
        DataPosition.from_dict({"epoch": 2, "batches": 1})


def test_a_world_size_that_does_not_divide_the_global_batch_is_an_error(make_cfg, tiny_cache):
    with pytest.raises(ValueError, match=r"global_batch_size=8 cannot be split evenly over 3 ranks; allowed rank "
                                         r"counts: \[1, 2, 4, 8\]"):
        TeacherStream.from_config(make_cfg(), 0, 3)


def test_open_cache_errors(make_cfg, tiny_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)no teacher cache at .*missing-cache.*generate_targets"):
        open_cache(make_cfg(f"data.cache_dir={tmp_path / 'missing-cache'}"))
    with pytest.raises(ValueError, match=r"differs in: teacher\.guidance_scale"):
        open_cache(make_cfg(f"data.cache_dir={tiny_cache}", "teacher.guidance_scale=5.0"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "teacher.yaml").write_bytes((tiny_cache / "teacher.yaml").read_bytes())
    with pytest.raises(ValueError, match="empty or missing manifest"):
        open_cache(make_cfg(f"data.cache_dir={empty}"))
    cache_dir, manifest = open_cache(make_cfg())
    assert cache_dir == tiny_cache and len(manifest) == NUM_SHARDS


def test_a_run_trains_on_its_own_plan_not_on_the_shards_a_larger_plan_left(make_cfg, tiny_cache, capsys):
    # The cache is keyed by the teacher, so a config asking for fewer samples meets a cache with more: it trains on
    # its data.num_samples (the resolved config saved with the run says so), not silently on everything there.
    first_two = sorted(read_manifest(tiny_cache))[:2]
    cfg = make_cfg(f"data.num_samples={2 * SHARD_SIZE}")
    assert sorted(open_cache(cfg)[1]) == first_two
    planned = stream(cfg)
    assert planned.samples_per_epoch == 2 * SHARD_SIZE
    assert sorted(ids_of(planned.epoch_batches(0))) == list(range(2 * SHARD_SIZE))
    assert "WARNING" not in capsys.readouterr().err
    # a plan ending inside a shard written whole for a larger plan: that shard is read whole, and it says so
    cfg = make_cfg(f"data.num_samples={SHARD_SIZE + 4}")
    assert sorted(open_cache(cfg)[1]) == first_two
    err = capsys.readouterr().err
    assert f"data.num_samples={SHARD_SIZE + 4} ends inside {first_two[1]}" in err
    assert f"training on {2 * SHARD_SIZE} samples" in err


def test_fingerprint_mismatch_names_sample_and_shard(make_cfg, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    name = "shard-000002.tar"
    samples = list(read_shard(cache / name))
    bad = samples[5]
    samples[5] = ShardSample(bad.key, {**bad.meta, "noise_fingerprint": "0123456789abcdef"}, bad.arrays)
    (cache / name).unlink()  # a published shard is never replaced: the tampering removes it first
    record_shards(cache, [write_shard(cache / name, samples)])
    cfg = make_cfg(f"data.cache_dir={cache}")
    with pytest.raises(ValueError, match=rf"sample '{bad.key}' of shard .*{name}.*fingerprint"):
        list(stream(cfg).epoch_batches(0))
    with pytest.raises(ValueError, match="fingerprint"):  # content errors are never skipped
        list(stream(cfg, skip_corrupt=True).epoch_batches(0))


def test_truncated_shard_errors_or_is_skipped_and_counted(make_cfg, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    name = "shard-000001.tar"
    data = (cache / name).read_bytes()
    (cache / name).write_bytes(data[: len(data) // 2])
    lost = {s.meta["sample_id"] for s in read_shard(tiny_cache / name)}
    cfg = make_cfg(f"data.cache_dir={cache}")
    with pytest.raises(ValueError, match=rf"corrupt teacher shard .*{name}"):
        list(stream(cfg).epoch_batches(0))
    for workers in (0, 1):
        skipping = stream(make_cfg(f"data.cache_dir={cache}", "train.skip_corrupt_shards=true"),
                          num_workers=workers)
        ids = ids_of(skipping.epoch_batches(0))
        assert sorted(ids) == sorted(ALL_IDS - lost)
        assert skipping.corrupt_skipped == SHARD_SIZE
        assert [e.shard for e in skipping.skip_events] == [name]
        assert skipping.state_dict()["corrupt_skipped"] == SHARD_SIZE


def test_unreadable_tar_with_matching_manifest_counts_remaining(make_cfg, tiny_cache, tmp_path):
    """A tar damaged inside (manifest made from the damaged bytes): the unread rest is skipped and counted."""
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    name = "shard-000003.tar"
    path = cache / name
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[6].offset  # the header of the 4th sample's first member
    data = bytearray(path.read_bytes())
    data[offset:offset + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    manifest = read_manifest(cache)
    manifest[name] = ShardInfo(name, SHARD_SIZE, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(cache, list(manifest.values()))
    with pytest.raises(ValueError, match=name):
        list(stream(make_cfg(f"data.cache_dir={cache}")).epoch_batches(0))
    skipping = stream(make_cfg(f"data.cache_dir={cache}", "train.skip_corrupt_shards=true"))
    ids = ids_of(skipping.epoch_batches(0))
    assert len(ids) + skipping.corrupt_skipped == NUM_SHARDS * SHARD_SIZE
    assert 0 < skipping.corrupt_skipped < SHARD_SIZE


def test_pickle_member_is_refused(make_cfg, tiny_cache, tmp_path):
    cache = copy_cache(tiny_cache, tmp_path / "cache")
    name = "shard-000000.tar"
    first = next(iter(read_shard(tiny_cache / name)))
    members = {f"{first.key}.json": json.dumps(first.meta).encode()}
    buffer = io.BytesIO()
    np.save(buffer, first.arrays["target"], allow_pickle=False)
    members[f"{first.key}.target.npy"] = buffer.getvalue()
    members[f"{first.key}.pkl"] = b"\x80\x04N."  # pickle of None: must never be loaded
    with tarfile.open(cache / name, "w") as tar:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = (cache / name).read_bytes()
    manifest = read_manifest(cache)
    manifest[name] = ShardInfo(name, 1, len(data), hashlib.sha256(data).hexdigest())
    write_manifest(cache, list(manifest.values()))
    for skip in ("false", "true"):  # refused even when damaged shards may be skipped
        s = stream(make_cfg(f"data.cache_dir={cache}", f"train.skip_corrupt_shards={skip}",
                            "data.allow_partial_cache=true"))  # shard 0 now holds 1 of its 16 samples
        with pytest.raises(ValueError, match=r"refusing member '\d+\.pkl'"):
            for epoch in range(2):
                list(s.epoch_batches(epoch))


def test_resume_uses_stored_shard_list(make_cfg, tiny_cache):
    """A checkpoint's shard list wins over a grown manifest (exact resume); unknown shards are refused."""
    cfg = make_cfg()
    names = sorted(read_manifest(tiny_cache))
    s = TeacherStream.from_config(cfg, 0, 2, shards=names[:2])
    assert s.samples_per_epoch == 2 * SHARD_SIZE
    assert sorted(s.epoch_shards(0)) == names[:2]
    with pytest.raises(ValueError, match="not in the manifest"):
        TeacherStream.from_config(cfg, 0, 1, shards=["shard-000099.tar"])


def test_stream_positions_follow_batches(make_cfg, tiny_cache):
    s = stream(make_cfg(), 0, 2)
    it = iter(s)
    for _ in range(10):
        batch = next(it)
    assert s.position == DataPosition(batch["index"] + 1) == DataPosition(10) and batch["epoch"] == 1


def test_an_access_error_is_not_shard_damage_even_when_skipping(make_cfg, tiny_cache, monkeypatch):
    """Found in review (issue 21, errors that are not transient): a permission error (an S3 403) reading a shard
    was taken as damage, so with train.skip_corrupt_shards=true the run silently trained without that shard."""
    from noiserefine.storage.local import LocalStore

    original, name = LocalStore.read_bytes, "shard-000001.tar"

    def read_bytes(self, wanted):
        if wanted == name:
            raise PermissionError(f"access denied: GET {self.location / wanted}")
        return original(self, wanted)

    monkeypatch.setattr(LocalStore, "read_bytes", read_bytes)
    skipping = stream(make_cfg(f"data.cache_dir={tiny_cache}", "train.skip_corrupt_shards=true"))
    with pytest.raises(PermissionError, match=name):
        list(skipping.epoch_batches(0))
    assert skipping.corrupt_skipped == 0
