"""The teacher-target cache directory: ``<cache_root>/<teacher key>/`` (key: ``identity.py``).

It holds ``teacher.yaml`` (the teacher's identity and key, plus the generation
settings that fix the target bytes), the shards, and ``manifest.parquet`` (one row per
shard: name, count, bytes, sha256). Experiments with the same teacher share one
directory. Re-running the generator skips shards already complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..hashing import file_sha256
from ..files import write_text_atomic
from ..shards import (MANIFEST_NAME, ShardInfo, iter_samples, parse_shard_name, read_manifest,
                      sample_key, shard_name, write_manifest)
from .identity import teacher_key, teacher_record
from .lock import LOCK_FILES, cache_lock, manifest_lock

if TYPE_CHECKING:  # plan imports torch: not needed to read or lock a cache
    from .plan import Plan

TEACHER_FILE = "teacher.yaml"
GENERATE_HINT = "run `python pipeline/generate_targets.py --config <same config>` first"


def cache_dir_for(cfg) -> Path:
    """``data.cache_dir`` if set, else ``data.cache_root/<teacher key>``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(cfg.data.cache_root).expanduser() / teacher_key(cfg)


def generation_settings(cfg) -> dict:
    """Settings that change target bits but not the teacher: pinned per cache, not keyed.

    Batched network calls round differently at another batch size, so a shard made at
    another ``pipeline.batch_size`` would not be byte-identical to its retry.
    """
    return {"batch_size": int(cfg.pipeline.batch_size)}


def read_teacher_record(cache_dir: Path) -> dict:
    path = Path(cache_dir) / TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no teacher cache at {cache_dir} ({TEACHER_FILE} missing); {GENERATE_HINT}")
    try:
        with open(path, encoding="utf-8") as handle:  # YAML's error marks then name the file, not "<unicode string>"
            record = yaml.safe_load(handle)  # safe: a !!python tag is an error, never executed
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable teacher record: {' '.join(str(error).split())}") from None
    if not isinstance(record, dict) or not isinstance(record.get("teacher_key"), str) \
            or not all(isinstance(record.get(section), dict) for section in ("model", "teacher", "data")):
        raise ValueError(f"{path}: not a teacher record (needs teacher_key and model/teacher/data mappings)")
    return record


def check_teacher(cache_dir: Path, cfg) -> dict:
    """The cache's teacher must be the config's teacher; the error names the differing fields."""
    record = read_teacher_record(cache_dir)
    expected = teacher_record(cfg)
    if record["teacher_key"] != expected["teacher_key"]:
        differing = sorted(f"{section}.{key}" for section in ("model", "teacher", "data")
                           for key in set(record[section]) | set(expected[section])
                           if record[section].get(key) != expected[section].get(key))
        raise ValueError(f"{cache_dir / TEACHER_FILE}: teacher key {record['teacher_key']} does not match "
                         f"this config's {expected['teacher_key']} (differs in: {', '.join(differing)})")
    return record


COMPLETE_HINT = "python pipeline/generate_targets.py --config <same config>"
# A same-size change is only seen by re-hashing: without verify the generator reports the cache complete.
REPAIR_HINT = "python pipeline/generate_targets.py --config <same config> pipeline.verify=true"
def _plan_rows(cache_dir: Path, manifest: dict[str, ShardInfo]) -> dict[int, ShardInfo]:
    """One manifest row per shard index: the one with the most samples (a grown partial shard)."""
    rows: dict[int, ShardInfo] = {}
    for info in sorted(manifest.values(), key=lambda i: i.name):
        parsed = parse_shard_name(info.name)
        index = None if parsed is None else parsed[0]
        if index is None:
            raise ValueError(f"{cache_dir / MANIFEST_NAME}: row {info.name!r} is not a shard of a plan "
                             "(expected shard-NNNNNN...)")
        if index not in rows or info.num_samples > rows[index].num_samples:
            rows[index] = info
    return rows


def _missing_shards(plan: Plan, rows: dict[int, ShardInfo]) -> list[str]:
    """``shard-…tar (have of want samples)`` for every shard of ``plan`` that is absent or short."""
    missing = []
    for index in range(plan.num_shards):
        want = len(plan.shard_sample_ids(index))
        have = rows[index].num_samples if index in rows else 0
        if have < want:
            missing.append(f"{plan.shard_name(index)} ({have} of {want} samples)")
    return missing


def _check_rows(cache_dir: Path, manifest: dict[str, ShardInfo], rows: list[ShardInfo]) -> None:
    """The shard rows a checkpoint trained on must all still be there, unchanged (exact resume)."""
    problems = []
    for row in rows:
        path = cache_dir / row.name
        current = manifest.get(row.name)
        if not path.is_file():
            problems.append(f"{path} is gone")
        elif path.stat().st_size != row.num_bytes:
            problems.append(f"{path} changed: {path.stat().st_size} bytes, the checkpoint recorded {row.num_bytes}")
        elif current is not None and current != row:
            problems.append(f"{path} changed: the manifest now records {current.num_samples} samples, sha256 "
                            f"{current.sha256[:12]}…, the checkpoint {row.num_samples} samples, sha256 "
                            f"{row.sha256[:12]}…")
    if problems:
        raise ValueError(f"shards this run trains on are gone or changed: {'; '.join(problems)}. A resumed run "
                         "trains on exactly the shards it started with (data.num_samples may grow: new shards are "
                         "left for new runs); restore those shards, or train in a new train.output_dir")


def open_cache(cfg, rows: list[ShardInfo] | None = None) -> tuple[Path, dict[str, ShardInfo]]:
    """The existing teacher cache of ``cfg`` and the shard rows to train on, for reading (the trainer).

    A fresh run (``rows`` None) trains on one manifest row per shard index and needs every
    shard of the plan (``Plan.from_config(cfg.data)``) with at least its planned samples;
    otherwise ``ValueError`` naming the missing shards and the command that completes the
    cache, unless ``data.allow_partial_cache`` (then a loud warning on stderr). A resumed run
    passes the rows its checkpoint recorded: each must still be on disk, unchanged.

    ``FileNotFoundError`` if there is no cache, ``ValueError`` naming the differing fields if
    it was made by another teacher or if it has no complete shard.
    """
    cache_dir = cache_dir_for(cfg)
    check_teacher(cache_dir, cfg)
    manifest = read_manifest(cache_dir)
    if rows is not None:
        _check_rows(cache_dir, manifest, rows)
        return cache_dir, {row.name: row for row in rows}
    if not manifest:
        raise ValueError(f"teacher cache {cache_dir} has an empty or missing manifest (no complete shards); "
                         f"{GENERATE_HINT}")
    from .plan import Plan  # imports torch: only here, not to read or lock a cache

    by_index = _plan_rows(cache_dir, manifest)
    plan = Plan.from_config(cfg.data)
    missing = _missing_shards(plan, by_index)
    if missing:
        have = sum(by_index[i].num_samples for i in range(plan.num_shards) if i in by_index)
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        summary = (f"teacher cache {cache_dir} is incomplete: {have} of the plan's {plan.num_samples} samples "
                   f"(data.num_samples) are there; {len(missing)} of its {plan.num_shards} shards are missing "
                   f"or short: {listed}")
        if not cfg.data.allow_partial_cache:
            raise ValueError(f"{summary}. Complete it with `{COMPLETE_HINT}` (it generates only what is "
                             "missing), or set data.allow_partial_cache=true to train on what exists")
        print(f"WARNING: training on a PARTIAL teacher cache (data.allow_partial_cache=true): {summary}",
              file=sys.stderr, flush=True)
    return cache_dir, {info.name: info for info in by_index.values()}


def _check_generation(cache_dir: Path, cfg) -> None:
    pinned = check_teacher(cache_dir, cfg).get("generation", {})
    if pinned and pinned != generation_settings(cfg):
        raise ValueError(f"{cache_dir / TEACHER_FILE}: this cache was generated with {pinned}, this run "
                         f"has {generation_settings(cfg)}; retried shards would not be byte-identical. "
                         "Use the recorded settings (e.g. pipeline.batch_size) or another data.cache_root")


def _refuse_foreign(cache_dir: Path) -> None:
    """A directory is ours if it is new, empty (but for our lock files) or holds a ``teacher.yaml``.

    Anything else (``data.cache_dir`` pointed at a dataset, a home directory...) is refused
    before a single file in it is created, deleted, renamed or adopted.
    """
    if not cache_dir.exists() or (cache_dir / TEACHER_FILE).is_file():
        return
    if not cache_dir.is_dir():
        raise ValueError(f"teacher cache {cache_dir} exists and is not a directory")
    entries = sorted(p.name for p in cache_dir.iterdir() if p.name not in LOCK_FILES)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(f"{cache_dir} is not empty and has no {TEACHER_FILE}: it is not a teacher cache of ours; "
                         f"refusing to write, delete or adopt anything in it (it holds {shown}). Point "
                         "data.cache_dir at a new or empty directory, or leave it empty to use "
                         "data.cache_root/<teacher key>")


@contextmanager
def hold_cache(cfg) -> Iterator[Path]:
    """The cache directory of ``cfg``, created with its ``teacher.yaml`` and held for writing.

    The job lock (``.lock``, see ``lock.py``) is held until the block ends: a second job on
    the same directory fails at once naming the first one. Refuses a directory of another
    teacher, or made with other generation settings.
    """
    cache_dir = cache_dir_for(cfg)
    _refuse_foreign(cache_dir)  # checked before anything is created or locked
    if (cache_dir / TEACHER_FILE).exists():
        _check_generation(cache_dir, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache_dir):
        _refuse_foreign(cache_dir)
        if (cache_dir / TEACHER_FILE).exists():
            _check_generation(cache_dir, cfg)
        else:
            record = {**teacher_record(cfg), "generation": generation_settings(cfg)}
            write_text_atomic(cache_dir / TEACHER_FILE, yaml.safe_dump(record, sort_keys=True))
        yield cache_dir


def prepare_cache_dir(cfg) -> Path:
    """Create the cache directory and its ``teacher.yaml`` (under the job lock); see :func:`hold_cache`."""
    with hold_cache(cfg) as cache_dir:
        return cache_dir


@dataclass
class CacheState:
    complete: dict[int, ShardInfo] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # present but wrong: moved aside, to be rebuilt
    reasons: dict[str, str] = field(default_factory=dict)  # rejected name -> why
    moved: dict[str, str] = field(default_factory=dict)  # rejected name -> its name now (``rejected-...``)
    adopted: list[str] = field(default_factory=list)  # complete but unrecorded, matching the plan: recorded now
    growing: list[str] = field(default_factory=list)  # recorded partial shards the plan now wants longer: kept
    names: dict[int, str] = field(default_factory=dict)  # missing shard index -> the file name to write
    stale_temps: list[str] = field(default_factory=list)  # half-written by killed workers: deleted


# ``atomic_path``'s temp names: ``.<name>.<pid>-<12 hex>.tmp``
_TEMP_RE = re.compile(r"^\..+\.\d+-[0-9a-f]{12}\.tmp$")


def scan_cache(cache_dir: Path, plan: Plan, *, verify: bool = False) -> CacheState:
    """Which shards of ``plan`` are complete. ``verify`` re-hashes every recorded shard.

    A recorded shard is complete if its file has the recorded size (and, with ``verify``,
    sha256). A recorded shard shorter than the plan's (``num_samples`` grew) is left as it is
    (a running trainer may read it): the longer shard is written under its own name
    (``Plan.shard_name``, in ``state.names``) and replaces its manifest row. A shard file on disk but not in the manifest (the job died between its
    rename and the manifest update) is adopted, and recorded, only if every sample
    matches the plan: key, sample id, seed, prompt, source, teacher key, noise
    fingerprint, a finite target of the cache's dtype, and the plan's count. Nothing is
    deleted: a rejected file (damaged, or not what the plan says) is renamed
    ``rejected-<name>.<UTC time>`` and the shard rebuilt. Temp files of ``atomic_path``
    are leftovers of killed workers (a retried shard writes a new temp) and are deleted.
    All of this happens only in a directory with our ``teacher.yaml`` and under its job
    lock (taken here if the calling thread does not hold it yet).
    """
    with cache_lock(cache_dir):
        return _scan_locked(Path(cache_dir), plan, verify)


def _move_aside(path: Path) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, count = path.with_name(f"rejected-{path.name}.{stamp}"), 1
    while target.exists():
        target, count = path.with_name(f"rejected-{path.name}.{stamp}-{count}"), count + 1
    os.rename(path, target)
    return target.name


def check_against_plan(path: Path, plan: Plan, index: int, record: dict) -> ShardInfo:
    """The manifest row of the shard file ``path`` if it holds exactly shard ``index`` of ``plan`` as
    made by the teacher of ``record``; ``ValueError`` naming the first sample that differs otherwise."""
    import numpy as np

    from ..noise import fingerprint, noise_from_seed

    data = path.read_bytes()
    samples = list(iter_samples(data, str(path)))  # ValueError if damaged or refused
    ids = list(plan.shard_sample_ids(index))
    if len(samples) != len(ids):
        raise ValueError(f"{path}: holds {len(samples)} samples, shard {index} of the plan has {len(ids)}")
    dtype = np.dtype(record["data"]["target_dtype"])
    for sample, sample_id in zip(samples, ids):
        planned = plan.sample(sample_id)
        where = f"{path}: sample {sample.key!r}"
        want = {"key": sample_key(sample_id), "sample_id": sample_id, "seed": planned.seed, "prompt": planned.prompt,
                "source": planned.source, "teacher_key": record["teacher_key"]}
        got = {**sample.meta, "key": sample.key}
        differing = [f"{k} {got.get(k)!r} (the plan's: {v!r})" for k, v in want.items() if got.get(k) != v]
        if differing:
            raise ValueError(f"{where} is not the plan's sample {sample_id} of shard {index}: "
                             + ", ".join(differing))
        target = sample.arrays.get("target")
        if set(sample.arrays) != {"target"} or target.dtype != dtype or not np.isfinite(target).all():
            raise ValueError(f"{where}: needs one finite target of dtype {dtype}, has "
                             f"{ {k: str(a.dtype) for k, a in sample.arrays.items()} }"
                             + ("" if target is None or np.isfinite(target).all() else " with non-finite values"))
        if sample.meta.get("noise_fingerprint") != fingerprint(noise_from_seed(planned.seed, target.shape)):
            raise ValueError(f"{where}: its noise fingerprint is not that of seed {planned.seed}")
    return ShardInfo(path.name, len(samples), len(data), hashlib.sha256(data).hexdigest())


def _scan_locked(cache_dir: Path, plan: Plan, verify: bool) -> CacheState:
    record = read_teacher_record(cache_dir)  # positively a cache of ours, or nothing is touched
    manifest = read_manifest(cache_dir)
    state = CacheState()
    adopted = []
    for stale in sorted(p for p in cache_dir.iterdir() if _TEMP_RE.match(p.name)):
        stale.unlink(missing_ok=True)
        state.stale_temps.append(stale.name)

    def reject(path: Path, reason: str) -> None:
        state.rejected.append(path.name)
        state.reasons[path.name] = reason
        state.moved[path.name] = _move_aside(path)

    recorded: dict[int, ShardInfo] = {}  # shard index -> its manifest row (names of other forms: left alone)
    for info in sorted(manifest.values(), key=lambda i: i.num_samples):
        parsed = parse_shard_name(info.name)
        if parsed is not None:
            recorded[parsed[0]] = info
    for index in range(plan.num_shards):
        expected_count = len(plan.shard_sample_ids(index))
        info = recorded.get(index)
        if info is not None and info.num_samples >= expected_count:
            # more samples than planned: written for a larger num_samples of the same plan, whose
            # shards start with exactly these samples; kept rather than rebuilt shorter
            path = cache_dir / info.name
            if not path.exists():
                pass  # deleted: rebuilt
            elif path.stat().st_size != info.num_bytes:
                reject(path, f"{path.stat().st_size} bytes, the manifest says {info.num_bytes}")
            elif verify and file_sha256(path) != info.sha256:
                reject(path, "sha256 differs from the manifest")
            else:
                state.complete[index] = info
                continue
            if info.num_samples == expected_count:  # rebuilt under its recorded name: the same bytes
                state.names[index] = info.name
                state.missing.append(index)
                continue
            info = None  # rebuilt at the plan's length, under the plan's name (checked below)
        # not recorded, or recorded shorter (num_samples grew): the recorded file stays as it is (a
        # running trainer may read it) and the grown shard gets a name of its own
        name = plan.shard_name(index)
        if info is not None:
            state.growing.append(info.name)
            if info.name == name:  # a partial shard named before names carried counts
                name = shard_name(index, expected_count)
        state.names[index] = name
        path = cache_dir / name
        if path.exists():  # unrecorded: the job died between the rename and the manifest update?
            try:
                found = check_against_plan(path, plan, index, record)
            except ValueError as error:
                reject(path, f"unrecorded and not the plan's shard: {error}")
            else:
                state.complete[index] = found
                state.adopted.append(name)
                adopted.append(found)
                continue
        state.missing.append(index)
    if adopted:
        record_shards(cache_dir, adopted)
    return state


def record_shards(cache_dir: Path, infos: list[ShardInfo]) -> None:
    """Merge finished shards into the manifest (written atomically; concurrent recorders serialised).

    A shard's row replaces the row of the same shard index under another name (a grown
    partial shard): the manifest lists each shard once; the old file stays on disk.
    """
    with manifest_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        for info in infos:
            parsed = parse_shard_name(info.name)
            if parsed is not None:
                for name in [n for n in manifest if (parse_shard_name(n) or (None,))[0] == parsed[0]]:
                    del manifest[name]
            manifest[info.name] = info
        write_manifest(cache_dir, list(manifest.values()))
