"""Acceptance tests of stage 1: the teacher-target cache job (``pipeline/generate_targets.py``).

The job runs as a subprocess exactly as a user runs it (``python pipeline/generate_targets.py
--config configs/digits.yaml key=value ...`` from the repository root) against a tiny real
teacher trained once per module (20 steps: its quality does not matter, its bytes do).

Starting a local Ray costs 10-60 s on the 2-core CI machines, so every job that starts Ray
is a module-scoped fixture shared by the tests that read its result, and the tests that
need a modified cache (re-run, repair, growth) work on a copy of a clean one. Ray starts:
clean 1 worker, clean 2 workers, killed worker, repair (delete + corrupt + verify),
growth, bad model path. The re-run with nothing missing and the in-process job
(``pipeline.num_workers=0``) do not start Ray.

The plan has 22 samples in shards of 6 (6, 6, 6, 4) so that the last shard is partial and
the growth test can grow it; batches of 4 also leave a partial batch in every full shard.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from noiserefine.backends import load_backend
from noiserefine.digits.teacher import train_digits_teacher
from noiserefine.targets.cache import cache_dir_for, read_teacher_record
from noiserefine.targets.scan import scan_cache
from noiserefine.config import load_config
from noiserefine.noise import fingerprint, noise_from_seed
from noiserefine.targets.plan import Plan
from noiserefine.guidance import guider_label, make_guider
from noiserefine.sampling import rollout
from noiserefine.hashing import file_sha256
from noiserefine.shards import (MANIFEST_NAME, decode_sample, read_manifest, read_shard,
                                sample_key, shard_name, write_manifest)

wds = pytest.importorskip("webdataset")

pytestmark = pytest.mark.slow  # subprocesses, Ray, DeepSpeed or teacher training: `make test` only

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "pipeline/generate_targets.py"
CONFIG = "configs/digits.yaml"
NUM_SAMPLES = 22
SHARD_SIZE = 6
SHARD_COUNTS = [6, 6, 6, 4]
NUM_SHARDS = len(SHARD_COUNTS)
SHARD_NAMES = [shard_name(0), shard_name(1), shard_name(2), shard_name(3, 4)]  # a partial shard carries its count
TEACHER_SETTINGS = ["model.digits.train_steps=20"]
JOB_TIMEOUT = 600  # seconds; a hung Ray job fails the test instead of hanging CI
HOOKS = REPO / "tests" / "hooks"  # sitecustomize.py: test-only fault injection, inherited by Ray workers
FAULT_ENV = "NOISEREFINE_FAULT_EXIT_ONCE"


# ----------------------------------------------------------------------------- helpers

def job_overrides(teacher: Path, cache_root: Path, num_workers: int, *extra: str) -> list[str]:
    """The user's command line (``key=value`` part); ``extra`` come last and win."""
    return [f"model.path={teacher}", *TEACHER_SETTINGS, f"data.cache_root={cache_root}",
            f"data.num_samples={NUM_SAMPLES}", f"data.shard_size={SHARD_SIZE}", "pipeline.batch_size=4",
            "teacher.num_steps=3", f"pipeline.num_workers={num_workers}", *extra]


def job_config(overrides: list[str]):
    return load_config(REPO / CONFIG, overrides)


@dataclass
class Job:
    overrides: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def cache_dir(self) -> Path:
        return Path(self.stdout.strip().splitlines()[-1])

    def describe(self) -> str:
        return (f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.stderr[-5000:]}")


def run_job(overrides: list[str], env_extra: dict[str, str] | None = None) -> Job:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULT_ENV)}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    if FAULT_ENV in env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, SCRIPT, "--config", CONFIG, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    return Job(overrides, done.returncode, done.stdout, done.stderr)


def run_ok(overrides: list[str], env_extra: dict[str, str] | None = None) -> Job:
    """Run the job; it must exit 0 and print the config's cache directory as its last line."""
    job = run_job(overrides, env_extra)
    assert job.returncode == 0, job.describe()
    assert job.stdout.strip(), job.describe()
    assert job.cache_dir == cache_dir_for(job_config(overrides)), job.describe()
    assert job.cache_dir.is_dir(), job.describe()
    return job


def visible_shards(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.glob("shard-*.tar"))


def shard_hashes(cache_dir: Path) -> dict[str, str]:
    return {name: file_sha256(cache_dir / name) for name in visible_shards(cache_dir)}


def manifest_rows(cache_dir: Path) -> list[dict]:
    """The manifest's raw rows (duplicates would show here; ``read_manifest`` raises on them)."""
    return pq.read_table(cache_dir / MANIFEST_NAME).to_pylist()


def file_ids(cache_dir: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every shard, the manifest and teacher.yaml: changes if rewritten."""
    paths = [*cache_dir.glob("shard-*.tar"), cache_dir / MANIFEST_NAME, cache_dir / "teacher.yaml"]
    out = {}
    for path in paths:
        st = path.stat()
        out[path.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def copy_cache(job: Job, dest_root: Path) -> tuple[Path, list[str]]:
    """Copy a finished job's cache root; returns the copy's cache dir and overrides pointing at it."""
    source_root = job.cache_dir.parent
    shutil.copytree(source_root, dest_root)
    overrides = [o for o in job.overrides if not o.startswith("data.cache_root=")]
    overrides.insert(0, f"data.cache_root={dest_root}")
    return dest_root / job.cache_dir.name, overrides


def all_keys(cache_dir: Path) -> list[str]:
    """The keys of every shard the manifest lists (what a trainer reads), in name order."""
    return [s.key for name in sorted(read_manifest(cache_dir)) for s in read_shard(cache_dir / name)]


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    settings = job_config(TEACHER_SETTINGS).model.digits
    return train_digits_teacher(settings, tmp_path_factory.mktemp("teacher") / "digits", progress=False)


@pytest.fixture(scope="module")
def clean_1w(teacher, tmp_path_factory) -> Job:
    return run_ok(job_overrides(teacher, tmp_path_factory.mktemp("clean1w") / "cache", 1))


@pytest.fixture(scope="module")
def clean_2w(teacher, tmp_path_factory) -> Job:
    return run_ok(job_overrides(teacher, tmp_path_factory.mktemp("clean2w") / "cache", 2))


@pytest.fixture(scope="module")
def clean_in_process(teacher, tmp_path_factory) -> Job:
    """``pipeline.num_workers=0``: the same shards generated in the job's own process, without Ray."""
    return run_ok(job_overrides(teacher, tmp_path_factory.mktemp("clean0w") / "cache", 0))


@pytest.fixture(scope="module")
def killed(teacher, tmp_path_factory) -> tuple[Job, Path]:
    """2 workers; the first worker to start a shard exits hard after its first batch."""
    base = tmp_path_factory.mktemp("killed")
    marker = base / "killed-once"
    job = run_ok(job_overrides(teacher, base / "cache", 2), env_extra={FAULT_ENV: str(marker)})
    return job, marker


@pytest.fixture(scope="module")
def repaired(clean_1w, tmp_path_factory) -> dict:
    """A copy of the clean cache with shard 1 deleted and shard 2 corrupted (same size), re-run with verify."""
    cache_dir, overrides = copy_cache(clean_1w, tmp_path_factory.mktemp("repair") / "cache")
    (cache_dir / shard_name(1)).unlink()
    corrupted = cache_dir / shard_name(2)
    size = corrupted.stat().st_size
    flip_middle_byte(corrupted)
    assert corrupted.stat().st_size == size
    assert file_sha256(corrupted) != shard_hashes(clean_1w.cache_dir)[shard_name(2)]
    before = file_ids(cache_dir)
    job = run_ok([*overrides, "pipeline.verify=true"])
    return {"job": job, "cache_dir": cache_dir, "before": before, "after": file_ids(cache_dir)}


# ----------------------------------------------------------------------------- tests

def test_one_and_two_workers_write_identical_bytes(clean_1w, clean_2w):
    assert f"0/{NUM_SHARDS} shards complete, {NUM_SHARDS} to generate" in clean_1w.stdout
    one, two = clean_1w.cache_dir, clean_2w.cache_dir
    assert one.name == two.name  # same teacher key
    assert visible_shards(one) == SHARD_NAMES
    assert shard_hashes(one) == shard_hashes(two)
    rows_one, rows_two = manifest_rows(one), manifest_rows(two)
    assert rows_one == rows_two
    assert [r["name"] for r in rows_one] == visible_shards(one)
    assert [r["num_samples"] for r in rows_one] == SHARD_COUNTS
    hashes = shard_hashes(one)
    for row in rows_one:  # the manifest describes the files that are there
        assert row["sha256"] == hashes[row["name"]]
        assert row["num_bytes"] == (one / row["name"]).stat().st_size
    assert (one / "teacher.yaml").read_text() == (two / "teacher.yaml").read_text()


def test_in_process_generation_is_byte_identical_to_the_ray_path(clean_1w, clean_2w, clean_in_process):
    job = clean_in_process
    assert "Started a local Ray instance" not in job.output, job.describe()
    assert job.cache_dir.name == clean_1w.cache_dir.name  # same teacher key
    assert visible_shards(job.cache_dir) == SHARD_NAMES
    assert shard_hashes(job.cache_dir) == shard_hashes(clean_1w.cache_dir) == shard_hashes(clean_2w.cache_dir)
    assert manifest_rows(job.cache_dir) == manifest_rows(clean_1w.cache_dir)
    assert (job.cache_dir / "teacher.yaml").read_bytes() == (clean_1w.cache_dir / "teacher.yaml").read_bytes()


def test_killed_worker_is_retried_without_loss_or_duplicates(clean_1w, killed):
    job, marker = killed
    assert marker.exists(), "the fault hook did not fire: no worker was killed\n" + job.describe()
    assert int(marker.read_text()) > 0  # pid of the killed worker
    cache_dir = job.cache_dir
    names = SHARD_NAMES
    assert visible_shards(cache_dir) == names
    assert shard_hashes(cache_dir) == shard_hashes(clean_1w.cache_dir)
    rows = manifest_rows(cache_dir)
    assert [r["name"] for r in rows] == names  # each shard listed exactly once
    assert rows == manifest_rows(clean_1w.cache_dir)
    keys = all_keys(cache_dir)
    assert len(keys) == len(set(keys)) == NUM_SAMPLES
    assert sorted(keys) == [sample_key(i) for i in range(NUM_SAMPLES)]


def test_rerun_writes_nothing_and_clears_killed_workers_temp_files(killed, tmp_path):
    cache_dir, overrides = copy_cache(killed[0], tmp_path / "cache")
    stale = sorted(p.name for p in cache_dir.glob(".shard-*"))  # what the killed worker left behind
    before = file_ids(cache_dir)
    job = run_ok(overrides)
    assert f"{NUM_SHARDS}/{NUM_SHARDS} shards complete, 0 to generate" in job.stdout, job.describe()
    assert "generated 0 samples" in job.stdout
    assert "Started a local Ray instance" not in job.output  # nothing missing: no Ray
    assert file_ids(cache_dir) == before  # no shard, manifest or teacher record rewritten
    assert shard_hashes(cache_dir) == shard_hashes(killed[0].cache_dir)
    assert not list(cache_dir.glob(".shard-*")), "half-written temp files of the killed worker remain"
    if stale:
        assert f"removed {len(stale)} stale temp files" in job.stdout


def test_deleted_shard_is_rebuilt_alone_and_identical(clean_1w, repaired):
    job, cache_dir = repaired["job"], repaired["cache_dir"]
    before, after = repaired["before"], repaired["after"]
    assert shard_name(1) not in before and shard_name(1) in after
    assert f"2/{NUM_SHARDS} shards complete, 2 to generate" in job.stdout, job.describe()
    assert file_sha256(cache_dir / shard_name(1)) == shard_hashes(clean_1w.cache_dir)[shard_name(1)]
    for name in (SHARD_NAMES[0], SHARD_NAMES[3]):  # the intact shards are not rewritten
        assert after[name] == before[name]
    assert manifest_rows(cache_dir) == manifest_rows(clean_1w.cache_dir)


def test_verify_detects_a_corrupted_shard_and_rebuilds_it(clean_1w, repaired):
    job, cache_dir = repaired["job"], repaired["cache_dir"]
    assert f"rejected ['{shard_name(2)}']" in job.stdout, job.describe()
    assert repaired["after"][shard_name(2)][:2] != repaired["before"][shard_name(2)][:2]  # rewritten
    assert shard_hashes(cache_dir) == shard_hashes(clean_1w.cache_dir)
    assert manifest_rows(cache_dir) == manifest_rows(clean_1w.cache_dir)


def test_unrecorded_shards_are_adopted_into_the_manifest_and_damaged_ones_rebuilt(clean_1w, tmp_path):
    """The driver died between two shards' renames and the manifest update; one of them was damaged since."""
    cache_dir, overrides = copy_cache(clean_1w, tmp_path / "cache")
    clean_rows = manifest_rows(cache_dir)
    unrecorded = (shard_name(0), shard_name(1))
    write_manifest(cache_dir, [i for name, i in read_manifest(cache_dir).items() if name not in unrecorded])
    damaged = cache_dir / shard_name(1)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    state = scan_cache(cache_dir, Plan.from_config(job_config(overrides).data))
    assert sorted(state.complete) == [0, 2, 3] and state.missing == [1]
    assert state.rejected == [shard_name(1)] and not damaged.exists()
    (moved,) = cache_dir.glob(f"rejected-{shard_name(1)}.*")  # moved aside, not deleted
    assert state.moved == {shard_name(1): moved.name}
    # shard 0 is in the manifest again (training reads only the manifest), exactly as first recorded
    assert manifest_rows(cache_dir) == [row for row in clean_rows if row["name"] != shard_name(1)]


def test_lowering_num_samples_keeps_the_longer_last_shard(clean_1w, tmp_path):
    cache_dir, overrides = copy_cache(clean_1w, tmp_path / "cache")
    before = file_ids(cache_dir)
    state = scan_cache(cache_dir, Plan.from_config(job_config([*overrides, "data.num_samples=20"]).data))
    assert sorted(state.complete) == [0, 1, 2, 3] and not state.missing and not state.rejected
    assert file_ids(cache_dir) == before


def test_shard_reads_back_with_plain_webdataset_and_matches_the_teacher(clean_1w, teacher):
    cfg = job_config(clean_1w.overrides)
    cache_dir = clean_1w.cache_dir
    assert read_teacher_record(cache_dir)["teacher_key"] == cache_dir.name
    plan = Plan.from_config(cfg.data)
    backend = load_backend(cfg.model)
    guidance = make_guider(cfg.teacher)
    assert guider_label(guidance) == "CFG 3"
    assert cfg.data.target_dtype == "float16"  # the default
    urls = [str(cache_dir / name) for name in visible_shards(cache_dir)]
    decoded = [decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]
    assert [d["key"] for d in decoded] == [sample_key(i) for i in range(NUM_SAMPLES)]
    for d in decoded:
        meta, target = d["meta"], d["arrays"]["target"]
        planned = plan.sample(meta["sample_id"])
        assert d["key"] == sample_key(planned.sample_id)
        assert (meta["seed"], meta["prompt"], meta["source"]) == (planned.seed, planned.prompt, planned.source)
        assert meta["teacher_key"] == cache_dir.name
        assert target.shape == tuple(backend.latent_shape)
        assert target.dtype == np.float16
        noise = noise_from_seed(meta["seed"], backend.latent_shape)
        assert fingerprint(noise) == meta["noise_fingerprint"]

    # Targets of the last shard (a partial batch included) against direct rollouts, one at a time.
    for d in decoded[-SHARD_COUNTS[-1] - 2:]:
        meta, stored = d["meta"], torch.from_numpy(d["arrays"]["target"])
        noise = noise_from_seed(meta["seed"], backend.latent_shape)[None]
        cond = backend.encode_prompts([meta["prompt"]])
        with torch.no_grad():
            guided = rollout(backend, noise, cond, cfg.teacher.num_steps, guidance)[0]
            unguided = rollout(backend, noise, cond, cfg.teacher.num_steps)[0]
        torch.testing.assert_close(stored, guided.to(torch.float16))
        # guarded: the comparison above would also pass for a job that ignored guidance
        assert (unguided.to(torch.float16) - stored).abs().max() > 1e-2


def test_cache_dir_is_keyed_by_the_teacher_config(clean_1w, teacher, tmp_path):
    base = clean_1w.overrides
    home = cache_dir_for(job_config(base))
    assert home == clean_1w.cache_dir
    for teacher_change in ("teacher.guidance_scale=2", "teacher.num_steps=4", "data.base_seed=1",
                           "data.target_dtype=float32"):
        assert cache_dir_for(job_config([*base, teacher_change])) != home, teacher_change
    for other_change in ("train.max_steps=5", "train.learning_rate=0.1", "pipeline.num_workers=3",
                         "pipeline.batch_size=5", "data.num_samples=1000", "eval.num_samples=7"):
        assert cache_dir_for(job_config([*base, other_change])) == home, other_change


def test_bad_model_path_fails_naming_the_path(tmp_path):
    bad = tmp_path / "no-such-teacher"
    job = run_job(job_overrides(bad, tmp_path / "cache", 1))
    assert job.returncode != 0, job.describe()
    assert str(bad) in job.output, job.describe()
    assert "Started a local Ray instance" not in job.output, "the path must be checked before Ray starts"
    assert not list((tmp_path / "cache").rglob("shard-*.tar"))


def test_growing_num_samples_keeps_complete_shards(clean_1w, tmp_path):
    """The partial last shard grows under a new name; the recorded file stays as it was (a running
    trainer may read it) and the grown shard's row replaces its row in the manifest."""
    cache_dir, overrides = copy_cache(clean_1w, tmp_path / "cache")
    before = file_ids(cache_dir)
    grown = 27  # shard 3 grows from 4 to 6 samples, shard 4 is new with 3
    job = run_ok([*overrides, f"data.num_samples={grown}"])
    assert job.cache_dir == cache_dir  # num_samples is not part of the teacher key
    assert "3/5 shards complete, 2 to generate" in job.stdout, job.describe()
    assert f"growing ['{SHARD_NAMES[3]}']" in job.stdout and "rejected" not in job.stdout, job.describe()
    after = file_ids(cache_dir)
    clean_hashes = shard_hashes(clean_1w.cache_dir)
    for name in SHARD_NAMES:  # every recorded shard is kept as it is, the partial one included
        assert after[name] == before[name]
        assert file_sha256(cache_dir / name) == clean_hashes[name]
    rows = manifest_rows(cache_dir)
    assert [r["name"] for r in rows] == [shard_name(k) for k in range(4)] + [shard_name(4, 3)]
    assert [r["num_samples"] for r in rows] == [6, 6, 6, 6, 3]
    assert rows[:3] == manifest_rows(clean_1w.cache_dir)[:3]
    keys = all_keys(cache_dir)
    assert keys == [sample_key(i) for i in range(grown)]
    # The grown shard starts with exactly the samples the old one holds.
    old = list(read_shard(cache_dir / SHARD_NAMES[3]))
    new = list(read_shard(cache_dir / shard_name(3)))
    assert [s.meta for s in new[:len(old)]] == [s.meta for s in old]
    for a, b in zip(new, old):
        torch.testing.assert_close(torch.from_numpy(a.arrays["target"]), torch.from_numpy(b.arrays["target"]))
    assert new[-1].meta["sample_id"] == 23
