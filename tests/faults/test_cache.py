"""Fault tests of stage 1 (the teacher-target generator and its cache directory) under adversarial use.

The generator runs in this process exactly as a user types it
(``pipeline/generate_targets.py --config configs/digits.yaml ... pipeline.num_workers=0``),
against tiny random-weight digit teachers saved to disk (no training, no Ray): one job
takes well under a second. Each test names the issue item it covers.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_digits_backend
from noiserefine.config import load_config
from noiserefine.hashing import file_sha256
from noiserefine.shards import (ShardInfo, _check_plain_name, ShardSample, read_manifest, read_shard,
                                verify_shard, write_manifest, write_shard)
from noiserefine.targets import generate as generate_module
from noiserefine.targets.cache import cache_dir_for, open_cache, prepare_cache_dir, record_shards
from noiserefine.train.stream import TeacherStream

REPO = Path(__file__).resolve().parents[2]
DIGITS_YAML = REPO / "configs" / "digits.yaml"
_spec = importlib.util.spec_from_file_location("generate_targets_entry", REPO / "pipeline" / "generate_targets.py")
entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entry)


@pytest.fixture(autouse=True)
def private_hash_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("NOISEREFINE_HASH_CACHE", str(tmp_path / "memo" / "file_hashes.json"))


@pytest.fixture
def teacher(tmp_path) -> Path:
    path = tmp_path / "teacher"
    tiny_digits_backend(seed=0).save_pretrained(path)
    return path


def job_args(teacher: Path, root: Path, *extra: str, num_samples: int = 6) -> list[str]:
    """6 samples in shards of 4 (4 + a partial 2), batches of 2, 2 sampler steps, no Ray."""
    return ["--config", str(DIGITS_YAML), f"model.path={teacher}", f"data.cache_root={root}",
            f"data.num_samples={num_samples}", "data.shard_size=4", "pipeline.batch_size=2", "teacher.num_steps=2",
            "pipeline.num_workers=0", *extra]


def config_of(args: list[str]):
    return load_config(args[1], args[2:])


def run_job(args: list[str], capsys) -> tuple[Path, str]:
    """Run the generator; return the cache directory it printed last and its stdout."""
    assert entry.main(args) == 0
    out = capsys.readouterr().out
    return Path(out.strip().splitlines()[-1]), out


def snapshot(directory: Path) -> dict[str, tuple]:
    """Name -> (inode, mtime_ns, bytes) of every entry (recursively): changes if anything is touched."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(directory))] = (st.st_ino, st.st_mtime_ns,
                                                 path.read_bytes() if path.is_file() else None)
    return out


def sample_ids(cache_dir: Path) -> list[int]:
    """The sample ids a trainer would see in one epoch: every manifest row's shard, in name order."""
    return [s.meta["sample_id"] for name in sorted(read_manifest(cache_dir)) for s in read_shard(cache_dir / name)]


def rejected_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("rejected-*"))


# ----------------------------------------------------------------------------- item 1: two jobs, one cache

def test_second_job_on_a_busy_cache_is_refused_and_the_first_finishes(teacher, tmp_path, monkeypatch, capsys):
    args = job_args(teacher, tmp_path / "cache")
    cache_dir = cache_dir_for(config_of(args))
    paused, resume = threading.Event(), threading.Event()
    original = generate_module.shard_samples

    def pausing_shard_samples(*a, **k):  # job A stops after its first sample, its temp shard half written
        for count, sample in enumerate(original(*a, **k), start=1):
            yield sample
            if threading.current_thread().name == "job-A" and count == 1 and not paused.is_set():
                paused.set()
                assert resume.wait(60)

    monkeypatch.setattr(generate_module, "shard_samples", pausing_shard_samples)
    outcome = {}

    def job_a():
        try:
            outcome["a"] = entry.main(args)
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome["a"] = error

    thread = threading.Thread(target=job_a, name="job-A")
    thread.start()
    try:
        assert paused.wait(60), "job A never started writing"
        temps = sorted(cache_dir.glob(".shard-*.tmp"))
        assert temps, "job A has no temp shard"
        lock = cache_dir / ".lock"
        lock_text = lock.read_text() if lock.exists() else ""
        try:
            entry.main(args)
            outcome["b"] = None
        except Exception as error:  # noqa: BLE001
            outcome["b"] = error
        temps_kept = all(t.exists() for t in temps)
    finally:
        resume.set()
        thread.join(120)
    assert outcome["b"] is not None, f"job B ran on a cache another job was writing; job A: {outcome['a']!r}"
    assert outcome["a"] == 0, f"job A failed: {outcome['a']!r}"
    assert temps_kept, "job B deleted job A's temp shard"
    message = str(outcome["b"])
    assert f"another job (pid {os.getpid()} on host {socket.gethostname()}, since " in message, message
    assert f"is writing this cache {cache_dir}" in message, message
    assert f'"pid": {os.getpid()}' in lock_text and socket.gethostname() in lock_text
    _, out = run_job(args, capsys)  # the lock is released when job A ends
    assert "2/2 shards complete, 0 to generate" in out


def test_a_killed_job_releases_the_lock(teacher, tmp_path, capsys):
    """The lock is an flock held by the process: a job that dies (SIGKILL) leaves no stale lock behind."""
    args = job_args(teacher, tmp_path / "cache")
    cache_dir = prepare_cache_dir(config_of(args))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from noiserefine.storage.locks import cache_lock\n"
         f"with cache_lock({str(cache_dir)!r}):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"another job \(pid {holder.pid} on host .*is writing this cache"):
            entry.main(args)
    finally:
        holder.kill()
        holder.wait(30)
    _, out = run_job(args, capsys)
    assert "0/2 shards complete, 2 to generate" in out


# ----------------------------------------------------------------------------- item 2: the manifest under concurrency

def rows(count: int, prefix: str = "shard") -> list[ShardInfo]:
    return [ShardInfo(f"{prefix}-{i:06d}.tar", i, 100 * i, f"{i:064x}") for i in range(count)]


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_manifest_reads_never_tear_while_it_is_replaced(tmp_path):
    write_manifest(tmp_path, rows(5))
    stop, errors, reads = threading.Event(), [], [0]

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            write_manifest(tmp_path, rows(5 + n % 200))

    def reader():
        while not stop.is_set():
            try:
                manifest = read_manifest(tmp_path)
                assert len(manifest) >= 5
                reads[0] += 1
            except Exception as error:  # noqa: BLE001
                errors.append(repr(error))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert reads[0] > 100
    assert errors == [], f"{len(errors)} of {reads[0] + len(errors)} reads failed, e.g. {errors[:2]}"


RECORDER = """
import sys
from pathlib import Path
from noiserefine.shards import ShardInfo
from noiserefine.targets.cache import record_shards
cache_dir, prefix, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # all recorders start together
for i in range(count):
    record_shards(cache_dir, [ShardInfo(f"{prefix}-{i:06d}.tar", i, 100 * i, f"{i:064x}")])
"""


def test_concurrent_recorders_lose_no_rows(tmp_path):
    """Three threads of this process and two other processes record 15 shards each, one at a time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path), f"proc{p}", "15"], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p in range(2)]
    assert [p.stdout.readline().strip() for p in processes] == ["ready", "ready"]

    def record_many(prefix):
        for info in rows(15, prefix):
            record_shards(tmp_path, [info])

    threads = [threading.Thread(target=record_many, args=(f"thread{t}",)) for t in range(3)]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [p.wait(120) for p in processes] == [0, 0]
    names = set(read_manifest(tmp_path))
    expected = {info.name for prefix in ("thread0", "thread1", "thread2", "proc0", "proc1")
                for info in rows(15, prefix)}
    assert names == expected, f"lost {len(expected - names)} of {len(expected)} rows"


# ----------------------------------------------------------------------------- item 3: a foreign directory

def foreign_shard(path: Path, num_samples: int = 20) -> None:
    """Somebody else's WebDataset shard: jpg + json samples keyed 000000 .. 000019."""
    with tarfile.open(path, "w") as tar:
        for i in range(num_samples):
            for ext, payload in (("jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("json", b'{"label": 3}')):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_a_foreign_directory_is_refused_and_left_untouched(teacher, tmp_path, capsys):
    foreign = tmp_path / "my-dataset"
    foreign.mkdir()
    foreign_shard(foreign / "shard-000000.tar")
    (foreign / "notes.tmp").write_text("my notes")
    (foreign / ".shard-000001.tar.123-abcdef012345.tmp").write_text("looks like one of our temp files")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "photo.jpg").write_bytes(b"\xff\xd8")
    before = snapshot(foreign)
    args = job_args(teacher, tmp_path / "unused", f"data.cache_dir={foreign}")
    with pytest.raises(ValueError, match=rf"{foreign}.*not .*teacher cache.*refusing") as error:
        entry.main(args)
    assert "teacher.yaml" in str(error.value)
    assert snapshot(foreign) == before, "the generator changed a directory that is not a cache of ours"
    # the trainer's side refuses it as well (no teacher.yaml)
    with pytest.raises(FileNotFoundError, match=str(foreign)):
        open_cache(config_of(args))


def test_an_empty_or_new_directory_becomes_the_cache(teacher, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for directory in (empty, tmp_path / "new" / "dir"):
        cache_dir, out = run_job(job_args(teacher, tmp_path / "unused", f"data.cache_dir={directory}"), capsys)
        assert cache_dir == directory and "0/2 shards complete, 2 to generate" in out
        assert sample_ids(directory) == list(range(6))


# ----------------------------------------------------------------------------- items 11, 12: unrecorded shards

def rewrite(path: Path, change) -> None:
    """Rewrite the shard at ``path`` with ``change(sample) -> sample`` applied to each sample."""
    samples = [change(s) for s in read_shard(path)]
    path.unlink()
    write_shard(path, samples)


def meta_changed(**changes):
    return lambda s: ShardSample(s.key, {**s.meta, **changes}, s.arrays)


def huge_member(path: Path) -> None:
    """Replace ``path`` by a tar whose second member declares 10**12 bytes (only a few exist)."""
    good = list(read_shard(path))[0]
    buffer = io.BytesIO()
    np.save(buffer, good.arrays["target"], allow_pickle=False)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(f"{good.key}.json")
        payload = b"{}"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = path.read_bytes().rstrip(b"\0")
    data = data + bytes(-len(data) % 512)
    info = tarfile.TarInfo(f"{good.key}.target.npy")
    info.size = 10 ** 12
    path.write_bytes(data + info.tobuf(format=tarfile.GNU_FORMAT) + buffer.getvalue()[:100] + bytes(1024))


TAMPERINGS = {
    "copy of shard 0": None,  # handled in the test: shard 0's bytes under shard 1's name
    "other seeds": lambda p: rewrite(p, lambda s: ShardSample(s.key, {**s.meta, "seed": s.meta["seed"] + 1},
                                                              s.arrays)),
    "other prompts": lambda p: rewrite(p, meta_changed(prompt="a handwritten eight")),
    "other teacher": lambda p: rewrite(p, meta_changed(teacher_key="digits-0123456789ab")),
    "non-finite target": lambda p: rewrite(p, lambda s: ShardSample(
        s.key, s.meta, {"target": np.full_like(s.arrays["target"], np.inf)})),
    "huge declared member": huge_member,
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_an_unrecorded_shard_is_adopted_only_if_it_matches_the_plan(teacher, tmp_path, capsys, tampering):
    """Shard 1 is on disk but not in the manifest (the driver died before recording it); since then
    it was replaced by something else. It must not be adopted, nor deleted: it is moved aside."""
    args = job_args(teacher, tmp_path / "cache", num_samples=8)
    cache_dir, _ = run_job(args, capsys)
    genuine = {name: file_sha256(cache_dir / name) for name in read_manifest(cache_dir)}
    (name0, info0), (name1, info1) = sorted(read_manifest(cache_dir).items())
    write_manifest(cache_dir, [info0])  # shard 1 unrecorded
    if tampering == "copy of shard 0":
        shutil.copyfile(cache_dir / name0, cache_dir / name1)
    else:
        TAMPERINGS[tampering](cache_dir / name1)
    planted = (cache_dir / name1).read_bytes()
    _, out = run_job(args, capsys)
    assert "1/2 shards complete, 1 to generate" in out, out
    assert f"rejected ['{name1}']" in out, out
    assert sample_ids(cache_dir) == list(range(8)), "the trainer would see other samples than the plan's"
    assert {name: file_sha256(cache_dir / name) for name in read_manifest(cache_dir)} == genuine
    (moved,) = rejected_files(cache_dir)
    assert moved.name.startswith(f"rejected-{name1}.") and moved.read_bytes() == planted
    assert f"moved aside as {moved.name}" in out, out


def test_a_genuine_unrecorded_shard_is_adopted_unchanged(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache", num_samples=8)
    cache_dir, _ = run_job(args, capsys)
    recorded = read_manifest(cache_dir)
    write_manifest(cache_dir, [recorded[min(recorded)]])
    before = snapshot(cache_dir)
    _, out = run_job(args, capsys)
    assert "2/2 shards complete, 0 to generate" in out and "adopted" in out, out
    assert read_manifest(cache_dir) == recorded
    after = snapshot(cache_dir)
    assert {k: v for k, v in after.items() if k.startswith("shard-")} == \
        {k: v for k, v in before.items() if k.startswith("shard-")}


# ----------------------------------------------------------------------------- item 5: non-finite targets

@pytest.mark.parametrize("poison", ["nan", "float16 overflow"])
def test_non_finite_targets_are_refused_naming_samples_and_shard(tmp_path, capsys, poison):
    teacher = tmp_path / "poisoned-teacher"
    backend = tiny_digits_backend(seed=0)
    with torch.no_grad():
        if poison == "nan":
            backend.denoiser.conv_out.bias.fill_(float("nan"))
        else:  # |x0| ~ 5e5 > 65504: finite in float32, inf once cast to the cache's float16
            backend.denoiser.conv_out.weight.mul_(1e4)
            backend.denoiser.conv_out.bias.mul_(1e4)
    backend.save_pretrained(teacher)
    args = job_args(teacher, tmp_path / "cache")
    cache_dir = cache_dir_for(config_of(args))
    with pytest.raises(ValueError) as error:
        entry.main(args)
    message = str(error.value)
    assert "shard-000000" in message and "sample ids [0, 1, 2, 3]" in message, message
    assert ("float16" in message) == (poison == "float16 overflow"), message
    assert not list(cache_dir.glob("shard-*")), "a shard with non-finite targets was written"
    assert not list(cache_dir.glob(".shard-*")), "its temp file was left behind"
    assert read_manifest(cache_dir) == {}


# ----------------------------------------------------------------------------- item 6: inputs changed in place

def test_a_teacher_retrained_in_place_gets_a_new_cache(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache")
    old_dir, _ = run_job(args, capsys)
    old = snapshot(old_dir)
    shutil.rmtree(teacher)
    tiny_digits_backend(seed=1).save_pretrained(teacher)  # retrained: other weights, same model.path
    new_dir, out = run_job(args, capsys)  # same process: nothing remembered from the first run may leak
    assert new_dir != old_dir and "0/2 shards complete, 2 to generate" in out, out
    assert snapshot(old_dir) == old, "the old teacher's cache was changed"
    new_targets = [s.arrays["target"] for s in read_shard(new_dir / sorted(read_manifest(new_dir))[0])]
    old_targets = [s.arrays["target"] for s in read_shard(old_dir / sorted(read_manifest(old_dir))[0])]
    assert not np.array_equal(new_targets[0], old_targets[0])


def test_weights_replaced_with_the_same_size_and_mtime_get_a_new_cache(teacher, tmp_path, capsys):
    """A reproducible archive (fixed mtimes) of a retrained model unpacked over the old one."""
    args = job_args(teacher, tmp_path / "cache")
    old_dir, _ = run_job(args, capsys)
    weights = next(teacher.rglob("*.safetensors"))
    stat = weights.stat()
    other = tmp_path / "other"
    tiny_digits_backend(seed=1).save_pretrained(other)
    replacement = (other / weights.relative_to(teacher)).read_bytes()
    assert len(replacement) == stat.st_size and replacement != weights.read_bytes()
    weights.write_bytes(replacement)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new_dir, out = run_job(args, capsys)
    assert new_dir != old_dir and "0/2 shards complete" in out, out


def test_a_prompt_file_edited_in_place_gets_a_new_cache(teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\na handwritten two\n")
    args = job_args(teacher, tmp_path / "cache", f"data.sources=[{{kind: text, path: {prompts}, weight: 1.0}}]")
    old_dir, _ = run_job(args, capsys)
    old = snapshot(old_dir)
    prompts.write_text("a handwritten seven\na handwritten six\n")  # same size, edited in place
    new_dir, out = run_job(args, capsys)
    assert new_dir != old_dir and "0/2 shards complete, 2 to generate" in out, out
    assert snapshot(old_dir) == old
    new_prompts = {s.meta["prompt"] for name in read_manifest(new_dir) for s in read_shard(new_dir / name)}
    assert "a handwritten two" not in new_prompts


# ----------------------------------------------------------------------------- item 7: verify

def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_rebuilds_exactly_a_bit_flipped_shard(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache", num_samples=12)
    cache_dir, _ = run_job(args, capsys)
    recorded = read_manifest(cache_dir)
    names = sorted(recorded)
    damaged = cache_dir / names[1]
    original = damaged.read_bytes()
    with tarfile.open(damaged) as tar:
        target = next(m for m in tar if m.name.endswith(".npy"))
    flip_byte(damaged, target.offset_data + target.size - 7)  # inside a target: same size, a valid tar
    flipped = damaged.read_bytes()
    assert list(read_shard(damaged)) and not verify_shard(cache_dir, recorded[names[1]])
    _, out = run_job(args, capsys)
    assert "3/3 shards complete, 0 to generate" in out  # without verify only sizes are checked
    before = snapshot(cache_dir)
    _, out = run_job([*args, "pipeline.verify=true"], capsys)
    assert f"2/3 shards complete, 1 to generate, rejected ['{names[1]}']" in out, out
    assert damaged.read_bytes() == original  # rebuilt byte-identical
    assert read_manifest(cache_dir) == recorded
    after = snapshot(cache_dir)
    for name in (names[0], names[2]):  # exactly the damaged shard was rebuilt
        assert after[name] == before[name]
    (moved,) = rejected_files(cache_dir)
    assert moved.read_bytes() == flipped  # the damaged bytes are kept for inspection, not deleted


def test_verify_rebuilds_a_shard_whose_manifest_row_is_wrong(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache", num_samples=12)
    cache_dir, _ = run_job(args, capsys)
    recorded = read_manifest(cache_dir)
    name = sorted(recorded)[2]
    original = (cache_dir / name).read_bytes()
    wrong = ShardInfo(name, recorded[name].num_samples, recorded[name].num_bytes, "0" * 64)
    write_manifest(cache_dir, [*(i for n, i in recorded.items() if n != name), wrong])
    _, out = run_job([*args, "pipeline.verify=true"], capsys)
    assert f"rejected ['{name}']" in out, out
    assert read_manifest(cache_dir) == recorded
    assert (cache_dir / name).read_bytes() == original


# ----------------------------------------------------------------------------- item 8: growing num_samples

def test_growing_num_samples_never_rewrites_a_recorded_shard(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache", num_samples=6)
    cache_dir, _ = run_job(args, capsys)
    old_manifest = read_manifest(cache_dir)  # what a running trainer's checkpoint holds
    old_bytes = {name: (cache_dir / name).read_bytes() for name in old_manifest}
    old_stat = {name: (cache_dir / name).stat() for name in old_manifest}
    _, out = run_job(job_args(teacher, tmp_path / "cache", num_samples=8), capsys)
    assert "1/2 shards complete, 1 to generate" in out, out
    for name, info in old_manifest.items():  # every file a checkpoint may name is still there, unchanged
        assert (cache_dir / name).read_bytes() == old_bytes[name], f"{name} was rewritten"
        assert (cache_dir / name).stat().st_ino == old_stat[name].st_ino
        assert verify_shard(cache_dir, info)
    new_manifest = read_manifest(cache_dir)
    assert len(new_manifest) == 2 and sorted(i.num_samples for i in new_manifest.values()) == [4, 4]
    assert sample_ids(cache_dir) == list(range(8))
    grown = [name for name in new_manifest if name not in old_manifest]
    assert len(grown) == 1 and grown[0].count(".") == 1 and _check_plain_name(grown[0]), grown
    (partial,) = [name for name in old_manifest if name not in new_manifest]
    old_samples = list(read_shard(cache_dir / partial))
    new_samples = list(read_shard(cache_dir / grown[0]))
    assert [s.meta for s in new_samples[:len(old_samples)]] == [s.meta for s in old_samples]
    # a trainer resumed from a checkpoint naming the old rows still reads exactly them
    stream = TeacherStream(cache_dir, old_manifest, teacher_key=cache_dir.name, seed=0, rank=0, world_size=1,
                           global_batch_size=2)
    assert sorted(i for batch in stream.epoch_batches(0) for i in batch["sample_id"]) == list(range(6))


def test_growing_a_partial_shard_named_before_names_carried_counts(teacher, tmp_path, capsys):
    """A cache made before partial shards carried their count: its 2-sample shard 1 is ``shard-000001.tar``,
    the very name the grown (full) shard 1 would get. The recorded file is still left as it is."""
    args = job_args(teacher, tmp_path / "cache", num_samples=6)
    cache_dir, _ = run_job(args, capsys)
    (name0, info0), (partial, info1) = sorted(read_manifest(cache_dir).items())
    legacy = "shard-000001.tar"
    os.rename(cache_dir / partial, cache_dir / legacy)
    write_manifest(cache_dir, [info0, ShardInfo(legacy, info1.num_samples, info1.num_bytes, info1.sha256)])
    old_bytes = (cache_dir / legacy).read_bytes()
    _, out = run_job(job_args(teacher, tmp_path / "cache", num_samples=8), capsys)
    assert f"growing ['{legacy}']" in out, out
    assert (cache_dir / legacy).read_bytes() == old_bytes
    assert sorted(read_manifest(cache_dir)) == [name0, "shard-000001-n4.tar"]
    assert sample_ids(cache_dir) == list(range(8))


# ----------------------------------------------------------------------------- item 18: teacher.yaml

@pytest.mark.parametrize("text,pattern", [
    ("teacher_key: [unclosed\n", r"unreadable teacher record: while parsing .* line 2"),
    ("teacher_key: digits-0\nmodel: sd15\nteacher: {}\ndata: {}\n", r"not a teacher record"),
    ("- just\n- a list\n", r"not a teacher record"),
])
def test_a_broken_teacher_yaml_is_an_error_naming_the_file(teacher, tmp_path, text, pattern):
    args = job_args(teacher, tmp_path / "cache")
    cache_dir = cache_dir_for(config_of(args))
    cache_dir.mkdir(parents=True)
    (cache_dir / "teacher.yaml").write_text(text)
    before = snapshot(cache_dir)
    for call in (lambda: entry.main(args), lambda: open_cache(config_of(args))):
        with pytest.raises(ValueError, match=pattern) as error:
            call()
        assert str(cache_dir / "teacher.yaml") in str(error.value) and "<unicode string>" not in str(error.value)
    assert snapshot(cache_dir) == before


def test_a_python_tagged_teacher_yaml_is_refused_not_executed(teacher, tmp_path):
    args = job_args(teacher, tmp_path / "cache")
    cache_dir = cache_dir_for(config_of(args))
    cache_dir.mkdir(parents=True)
    marker = tmp_path / "executed"
    (cache_dir / "teacher.yaml").write_text(f"teacher_key: !!python/object/apply:os.system ['touch {marker}']\n")
    for call in (lambda: entry.main(args), lambda: open_cache(config_of(args))):
        with pytest.raises(ValueError, match=rf"{cache_dir / 'teacher.yaml'}: .*python/object/apply.* line 1"):
            call()
    assert not marker.exists(), "the YAML tag was executed"


# ----------------------------------------------------------------------------- item 19: generation batch size

def test_another_batch_size_is_refused_by_the_generator(teacher, tmp_path, capsys):
    args = job_args(teacher, tmp_path / "cache")
    cache_dir, _ = run_job(args, capsys)
    (cache_dir / sorted(read_manifest(cache_dir))[-1]).unlink()  # one shard to rebuild
    before = snapshot(cache_dir)
    with pytest.raises(ValueError, match=rf"{cache_dir / 'teacher.yaml'}.*generated with "
                                         r"\{'batch_size': 2\}.*pipeline.batch_size"):
        entry.main([*args, "pipeline.batch_size=3"])
    assert snapshot(cache_dir) == before
    _, out = run_job(args, capsys)  # the recorded batch size rebuilds it
    assert "1/2 shards complete, 1 to generate" in out
