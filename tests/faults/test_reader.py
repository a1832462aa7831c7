"""Fault tests of the one shard parser (``shards._iter_raw``): what the writer never writes is refused.

Every crafted shard goes through BOTH readers: ``shards.read_shard`` (the generator's
scan, tools) and the trainer's ``TeacherStream`` over a tiny cache whose manifest
records the crafted shard's true size and sha256, so the manifest check passes and
only the parser can refuse it. Content attacks are refused even with
``skip_corrupt`` (they are not damage); the samples around each attack are honest
(right fingerprint, teacher key), and ``test_honest_shard_is_read_by_both`` shows
that the same shard without the attack is accepted by both paths.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from noiserefine import shards
from noiserefine.noise import fingerprint, noise_from_seed
from noiserefine.shards import ShardFormatError, ShardInfo, read_manifest, write_manifest
from noiserefine.train.stream import TeacherStream

KEY = "digits-000000faults"
SHAPE = (1, 4, 4)
NAME = "shard-000000.tar"


def honest_sample(sample_id: int) -> list[tuple[str, bytes]]:
    seed = 1000 + sample_id
    meta = {"sample_id": sample_id, "seed": seed, "prompt": "a handwritten one", "source": "digits",
            "teacher_key": KEY, "noise_fingerprint": fingerprint(noise_from_seed(seed, SHAPE))}
    buffer = io.BytesIO()
    np.save(buffer, np.full(SHAPE, sample_id, np.float16), allow_pickle=False)
    key = shards.sample_key(sample_id)
    return [(f"{key}.json", json.dumps(meta, sort_keys=True).encode()), (f"{key}.target.npy", buffer.getvalue())]


def regular(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def tar_bytes(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, payload in entries:
            tar.addfile(info, io.BytesIO(payload) if info.isreg() or info.type == tarfile.CONTTYPE else None)
    return buffer.getvalue()


def honest_entries(ids=(0, 1)) -> list:
    return [regular(name, payload) for i in ids for name, payload in honest_sample(i)]


def make_cache(tmp_path, data: bytes, num_samples: int = 2):
    """A cache directory holding ``data`` as its one shard, recorded with its true size and sha256."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / NAME).write_bytes(data)
    write_manifest(cache, [ShardInfo(NAME, num_samples, len(data), hashlib.sha256(data).hexdigest())])
    return cache


def stream_of(cache, skip_corrupt: bool) -> TeacherStream:
    return TeacherStream(cache, read_manifest(cache), teacher_key=KEY, seed=0, rank=0, world_size=1,
                         batch_size=2, skip_corrupt=skip_corrupt)


def assert_refused_by_both(tmp_path, data: bytes, pattern: str):
    cache = make_cache(tmp_path, data)
    with pytest.raises(ValueError, match=pattern) as error:
        list(shards.read_shard(cache / NAME))
    assert not isinstance(error.value, ShardFormatError), "content, not damage: must not be skippable"
    for skip_corrupt in (False, True):  # refused, never skipped as damage
        stream = stream_of(cache, skip_corrupt)
        with pytest.raises(ValueError, match=pattern):
            list(stream.epoch_batches(0))
        assert stream.corrupt_skipped == 0


# ----------------------------------------------------------------------------- the control

def test_honest_shard_is_read_by_both(tmp_path):
    cache = make_cache(tmp_path, tar_bytes(honest_entries()))
    assert [s.meta["sample_id"] for s in shards.read_shard(cache / NAME)] == [0, 1]
    (batch,) = list(stream_of(cache, False).epoch_batches(0))
    assert batch["sample_id"] == [0, 1]
    # the writer's own shard of the same samples reads back the same way
    written = shards.write_shard(tmp_path / "w.tar", shards.read_shard(cache / NAME))
    assert written.num_samples == 2


# ----------------------------------------------------------------------------- attacks (item 9)

@pytest.mark.parametrize("name", ["../000000001.json", "../../etc/000000001.json", "/tmp/000000001.json",
                                  "./000000001.json", "sub/000000001.json"])
def test_escaping_member_names_refused(tmp_path, name):
    entries = honest_entries() + [regular(name, b"{}")]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '{name}'")


@pytest.mark.parametrize("kind,linkname", [(tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "000000000.json")],
                         ids=["symlink", "hardlink"])
def test_links_refused(tmp_path, kind, linkname):
    entries = honest_entries((0,)) + [regular("000000001.json", honest_sample(1)[0][1]),
                                      special("000000001.target.npy", kind, linkname)]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '000000001\.target\.npy'")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE],
                         ids=["chardev", "blockdev", "fifo", "directory"])
def test_devices_and_directories_refused(tmp_path, kind):
    entries = honest_entries() + [special("000000002.json", kind)]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '000000002\.json'")


def test_contiguous_file_member_refused(tmp_path):
    """Type '7' (contiguous file) is "regular" to tarfile; our writer never writes it."""
    name, payload = honest_sample(1)[1]
    info, _ = regular(name, payload)
    info.type = tarfile.CONTTYPE
    entries = honest_entries((0,)) + [regular(*honest_sample(1)[0]), (info, payload)]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '000000001\.target\.npy'")


def test_sparse_member_refused(tmp_path):
    """A GNU sparse (pax 1.0) member: tarfile turns it into a 'regular' member with holes."""
    name, payload = honest_sample(1)[1]
    sparse_map = f"1\n0\n{len(payload)}\n".encode().ljust(512, b"\0")
    info, _ = regular("GNUSparseFile.0/x", sparse_map + payload)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(len(payload))}
    entries = honest_entries((0,)) + [regular(*honest_sample(1)[0]), (info, sparse_map + payload)]
    data = tar_bytes(entries, fmt=tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the attack is what we think it is
        member = tar.getmembers()[-1]
        assert member.isreg() and member.sparse and member.name == name
    assert_refused_by_both(tmp_path, data, rf"{NAME}.*refusing .*member '000000001\.target\.npy'")


@pytest.mark.parametrize("name", ["000000002", "000000002.", "000000002.target.", ".json", "000000002..npy"])
def test_members_without_extension_refused(tmp_path, name):
    entries = honest_entries() + [regular(name, b"{}")]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '{name}'")


@pytest.mark.parametrize("name", ["__key__.json", "__x__.json", "000000001.__key__", "000000001.__url__",
                                  "000000001.__local_path__", "000000001.__x__.npy", "_000000001.json"])
def test_dunder_members_refused(tmp_path, name):
    """``__key__``-like names would overwrite (or hide among) the parser's own bookkeeping fields."""
    entries = honest_entries() + [regular(name, b"{}")]
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*refusing .*member '{name}'")


def test_non_adjacent_duplicate_key_refused(tmp_path):
    """Sample 0 appended again after sample 1: WebDataset's group_by_keys would train it twice."""
    entries = honest_entries((0, 1)) + honest_entries((0,))
    assert_refused_by_both(tmp_path, tar_bytes(entries), rf"{NAME}.*key '000000000' appears twice")


def test_gzip_compressed_tar_refused(tmp_path):
    data = gzip.compress(tar_bytes(honest_entries()), mtime=0)
    assert_refused_by_both(tmp_path, data, rf"{NAME}.*compressed \(gzip\)")


def test_data_after_the_end_of_archive_refused(tmp_path):
    """A second archive appended after the end marker: invisible to tarfile, readable by `tar -i`."""
    data = tar_bytes(honest_entries()) + tar_bytes(honest_entries((2,)))
    assert_refused_by_both(tmp_path, data, rf"{NAME}.*after the end-of-archive marker")


# ----------------------------------------------------------------------------- huge declared size (item 12)

def huge_member_shard() -> bytes:
    """A header declaring a 10**12-byte member followed by a few bytes: no such data exists."""
    head = tar_bytes(honest_entries((0,)) + [regular(*honest_sample(1)[0])])
    while head.endswith(bytes(512)):  # drop the end-of-archive marker and the record padding
        head = head[:-512]
    info = tarfile.TarInfo("000000001.target.npy")
    info.size = 10 ** 12
    return head + info.tobuf(format=tarfile.GNU_FORMAT) + b"\x93NUMPY" + bytes(1024)


def test_huge_declared_member_names_the_shard_not_memory_error(tmp_path):
    data = huge_member_shard()
    cache = make_cache(tmp_path, data)
    pattern = rf"{NAME}.*'000000001\.target\.npy' declares {10 ** 12} bytes"
    with pytest.raises(ShardFormatError, match=pattern):
        list(shards.read_shard(cache / NAME))
    with pytest.raises(ShardFormatError, match=pattern):
        shards.shard_info(cache / NAME)
    with pytest.raises(ValueError, match=pattern):
        list(stream_of(cache, False).epoch_batches(0))
