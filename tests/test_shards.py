"""Tests for the teacher-target shard contract (noiserefine.shards)."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from noiserefine import shards
from noiserefine.hashing import file_sha256
from noiserefine.shards import ShardInfo, ShardSample

wds = pytest.importorskip("webdataset")


def make_samples(n: int = 4) -> list[ShardSample]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        arrays = {"target": rng.standard_normal((4, 8, 8)).astype(np.float16)}
        if i % 2 == 0:
            arrays["cond"] = rng.standard_normal((3, 5)).astype(np.float32)
        meta = {"sample_id": 10 + i, "seed": 7 * i, "prompt": f"a photo of thing {i} é",
                "source": "unit", "teacher_key": "sd15-cfg7.5", "noise_fingerprint": f"{i:016x}"}
        out.append(ShardSample(shards.sample_key(10 + i), meta, arrays))
    return out


def assert_same(got_key, got_meta, got_arrays, want: ShardSample):
    assert got_key == want.key
    assert got_meta == want.meta
    assert sorted(got_arrays) == sorted(want.arrays)
    for name, arr in want.arrays.items():
        assert got_arrays[name].dtype == arr.dtype
        assert got_arrays[name].shape == arr.shape
        np.testing.assert_array_equal(got_arrays[name], arr)


def wds_read(path: Path) -> list[dict]:
    return list(wds.WebDataset([str(path)], shardshuffle=False).map(shards.decode_sample))


def test_names():
    assert shards.shard_name(3) == "shard-000003.tar"
    assert shards.sample_key(12) == "000000012"
    with pytest.raises(ValueError):
        shards.sample_key(-1)


def test_round_trip_read_shard_and_webdataset(tmp_path):
    samples = make_samples(5)
    path = tmp_path / shards.shard_name(0)
    info = shards.write_shard(path, samples)
    assert info == ShardInfo(path.name, 5, path.stat().st_size, file_sha256(path))
    assert shards.shard_info(path) == info

    got = list(shards.read_shard(path))
    assert len(got) == len(samples)
    for g, w in zip(got, samples):
        assert isinstance(g, ShardSample)
        assert_same(g.key, g.meta, g.arrays, w)

    got_wds = wds_read(path)
    assert len(got_wds) == len(samples)
    for g, w in zip(got_wds, samples):
        assert_same(g["key"], g["meta"], g["arrays"], w)
    assert got_wds[0]["arrays"]["target"].dtype == np.float16

    # members: key.ext, meta stored as sorted-keys JSON, fixed header fields
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000010.cond.npy", "000000010.json", "000000010.target.npy"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o444)}
    assert all(m.pax_headers == {} for m in members)  # integer mtime: no per-member PAX records
    with tarfile.open(path) as tar:
        raw = tar.extractfile("000000010.json").read()
    assert raw == json.dumps(samples[0].meta, sort_keys=True).encode()


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_byte_identical_twice_and_in_subprocess(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    ia = shards.write_shard(a / "s.tar", make_samples())
    ib = shards.write_shard(b / "s.tar", make_samples())
    assert (a / "s.tar").read_bytes() == (b / "s.tar").read_bytes()
    assert ia == ib
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_shards import make_samples
        from noiserefine import shards
        shards.write_shard(Path({str(c / "s.tar")!r}), make_samples())
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path))
    assert (c / "s.tar").read_bytes() == (a / "s.tar").read_bytes()


def test_sample_order_is_kept(tmp_path):
    samples = make_samples(4)[::-1]
    path = tmp_path / "s.tar"
    shards.write_shard(path, samples)
    assert [s.key for s in shards.read_shard(path)] == [s.key for s in samples]


def test_atomic_on_midway_failure(tmp_path):
    path = tmp_path / shards.shard_name(1)

    def gen():
        yield from make_samples(2)
        raise RuntimeError("teacher crashed")

    with pytest.raises(RuntimeError, match="teacher crashed"):
        shards.write_shard(path, gen())
    assert list(tmp_path.iterdir()) == []

    # an existing good shard is not clobbered by a failed rewrite
    info = shards.write_shard(path, make_samples(2))
    with pytest.raises(RuntimeError):
        shards.write_shard(path, gen())
    assert list(tmp_path.iterdir()) == [path]
    assert shards.verify_shard(tmp_path, info)


class Harmless:
    def __init__(self):
        self.x = 1


def craft_tar(path: Path, members) -> None:
    items = members.items() if isinstance(members, dict) else members
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))


def npy_bytes(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("ext,payload", [
    ("pickle", pickle.dumps(Harmless())),
    ("pyd", pickle.dumps(Harmless())),
    ("pth", npy_bytes(np.zeros(2, np.float32))),  # refused by extension, whatever the payload
    ("target.npz", npy_bytes(np.zeros(2, np.float32))),
])
def test_non_json_npy_member_refused_by_both_paths(tmp_path, ext, payload):
    path = tmp_path / "evil.tar"
    craft_tar(path, {
        "000000001.json": b'{"sample_id": 1}',
        "000000001.target.npy": npy_bytes(np.zeros(3, np.float32)),
        f"000000001.{ext}": payload,
    })
    pattern = rf"evil\.tar.*refusing member '000000001\.{ext}'"
    with pytest.raises(ValueError, match=pattern):
        list(shards.read_shard(path))
    with pytest.raises(ValueError, match=pattern):
        wds_read(path)


def test_object_array_npy_refused(tmp_path):
    path = tmp_path / "obj.tar"
    obj = np.array([Harmless(), None], dtype=object)
    craft_tar(path, {
        "000000001.json": b'{"sample_id": 1}',
        "000000001.target.npy": npy_bytes(obj, allow_pickle=True),
    })
    with pytest.raises(ValueError, match=r"obj\.tar.*000000001\.target\.npy"):
        list(shards.read_shard(path))
    with pytest.raises(ValueError, match=r"obj\.tar.*000000001\.target\.npy"):
        wds_read(path)
    with pytest.raises(ValueError):  # and the writer never produces one
        shards.write_shard(tmp_path / "w.tar", [ShardSample("000000001", {}, {"target": obj})])
    assert not (tmp_path / "w.tar").exists()


def test_decode_sample_direct():
    raw = {"__key__": "000000001", "__url__": "mem://x.tar", "__local_path__": "/tmp/x.tar",
           "json": b'{"a": 1}', "target.npy": npy_bytes(np.arange(3, dtype=np.int16))}
    d = shards.decode_sample(raw)
    assert d["key"] == "000000001" and d["meta"] == {"a": 1}
    assert d["arrays"]["target"].dtype == np.int16
    with pytest.raises(ValueError, match=r"src\.tar.*000000001\.txt"):
        shards.decode_sample(dict(raw, txt=b"hi"), source="src.tar")
    with pytest.raises(ValueError, match="json"):
        shards.decode_sample({k: v for k, v in raw.items() if k != "json"})


@pytest.mark.parametrize("cut", ["first_header", "mid_header", "mid_data", "member_boundary", "no_end_marker"])
def test_truncated_tar_raises_naming_file(tmp_path, cut):
    path = tmp_path / "trunc.tar"
    shards.write_shard(path, make_samples(4))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last = members[-1]
    end_of_last = last.offset_data + ((last.size + 511) // 512) * 512
    n = {"first_header": 300, "mid_header": members[3].offset + 200, "mid_data": last.offset_data + 100,
         "member_boundary": last.offset, "no_end_marker": end_of_last}[cut]
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"trunc\.tar"):
        list(shards.read_shard(path))
    with pytest.raises(ValueError, match=r"trunc\.tar"):
        shards.shard_info(path)


def test_manifest_round_trip(tmp_path):
    assert shards.read_manifest(tmp_path) == {}
    infos = [shards.write_shard(tmp_path / shards.shard_name(i), make_samples(2 + i)) for i in (2, 0, 1)]
    shards.write_manifest(tmp_path, infos)
    got = shards.read_manifest(tmp_path)
    assert list(got) == sorted(i.name for i in infos)
    assert got == {i.name: i for i in infos}
    assert all(shards.verify_shard(tmp_path, i) for i in got.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / shards.MANIFEST_NAME)
    assert table.column_names == ["name", "num_samples", "num_bytes", "sha256"]
    assert table.column("name").to_pylist() == sorted(i.name for i in infos)


@pytest.mark.parametrize("bad", ["../evil.tar", "/abs.tar", "sub/x.tar", "..", "a\\b.tar", ""])
def test_manifest_rejects_escaping_names(tmp_path, bad):
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = ShardInfo(bad, 1, 10, "0" * 64)
    with pytest.raises(ValueError):
        shards.write_manifest(tmp_path, [info])
    with pytest.raises(ValueError):
        shards.verify_shard(tmp_path, info)
    pq.write_table(pa.table({"name": [bad], "num_samples": [1], "num_bytes": [10], "sha256": ["0" * 64]}),
                   tmp_path / shards.MANIFEST_NAME)
    with pytest.raises(ValueError):
        shards.read_manifest(tmp_path)


def test_manifest_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"name": ["a.tar"], "num_samples": [1]}), tmp_path / shards.MANIFEST_NAME)
    with pytest.raises(ValueError, match=r"manifest\.parquet.*num_bytes"):
        shards.read_manifest(tmp_path)


def test_verify_shard_detects_flipped_byte(tmp_path):
    info = shards.write_shard(tmp_path / "s.tar", make_samples(2))
    assert shards.verify_shard(tmp_path, info)
    data = bytearray((tmp_path / "s.tar").read_bytes())
    data[1100] ^= 0x01
    (tmp_path / "s.tar").write_bytes(bytes(data))
    assert not shards.verify_shard(tmp_path, info)
    (tmp_path / "s.tar").unlink()
    assert not shards.verify_shard(tmp_path, info)


@pytest.mark.parametrize("key", ["000.001", "", "a/b", "_x"])
def test_bad_key_rejected(tmp_path, key):
    s = ShardSample(key, {}, {"target": np.zeros(2, np.float32)})
    with pytest.raises(ValueError):
        shards.write_shard(tmp_path / "s.tar", [s])
    assert list(tmp_path.iterdir()) == []


def test_duplicate_key_rejected(tmp_path):
    s = make_samples(2)
    with pytest.raises(ValueError, match="duplicate"):
        shards.write_shard(tmp_path / "s.tar", [s[0], s[1], s[0]])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tar.get", "Target", "_x", ""])
def test_bad_array_name_rejected(tmp_path, name):
    s = ShardSample("000000001", {}, {name: np.zeros(2, np.float32)})
    with pytest.raises(ValueError):
        shards.write_shard(tmp_path / "s.tar", [s])
    assert list(tmp_path.iterdir()) == []


def test_read_shard_rejects_split_key(tmp_path):
    path = tmp_path / "split.tar"
    arr = npy_bytes(np.zeros(2, np.float32))
    craft_tar(path, [("000000001.json", b"{}"), ("000000001.target.npy", arr),
                     ("000000002.json", b"{}"), ("000000002.target.npy", arr),
                     ("000000001.json", b"{}"), ("000000001.cond.npy", arr)])
    with pytest.raises(ValueError, match=r"split\.tar.*000000001.*twice"):
        list(shards.read_shard(path))


def test_read_shard_refuses_symlink_member(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        ti = tarfile.TarInfo("000000001.json")
        ti.size = 2
        tar.addfile(ti, io.BytesIO(b"{}"))
        ti = tarfile.TarInfo("000000001.target.npy")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(ti)
    with pytest.raises(ValueError, match=r"link\.tar.*non-regular member '000000001\.target\.npy'"):
        list(shards.read_shard(path))


def test_extension_case_handled_like_webdataset(tmp_path):
    path = tmp_path / "case.tar"
    craft_tar(path, {"000000001.JSON": b'{"a": 1}', "000000001.Target.NPY": npy_bytes(np.ones(2, np.float16))})
    (got,) = list(shards.read_shard(path))
    (got_wds,) = wds_read(path)
    assert sorted(got.arrays) == sorted(got_wds["arrays"]) == ["target"]
    assert got.meta == got_wds["meta"] == {"a": 1}
