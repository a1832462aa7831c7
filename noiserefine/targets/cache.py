"""The teacher-target cache directory: ``<cache_root>/<teacher key>/`` (key: ``identity.py``).

It holds ``teacher.yaml`` (the teacher's identity and key, plus the generation
settings that fix the target bytes), the shards, and ``manifest.parquet`` (one row per
shard: name, count, bytes, sha256). Experiments with the same teacher share one
directory. Re-running the generator skips shards already complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..files import write_text_atomic
from ..shards import ShardInfo, read_manifest, shard_info, shard_name, verify_shard, write_manifest
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


def open_cache(cfg) -> tuple[Path, dict[str, ShardInfo]]:
    """The existing teacher cache of ``cfg`` and its manifest, for reading (the trainer).

    ``FileNotFoundError`` if there is none, ``ValueError`` naming the differing fields if
    it was made by another teacher or if it has no complete shard.
    """
    cache_dir = cache_dir_for(cfg)
    check_teacher(cache_dir, cfg)
    manifest = read_manifest(cache_dir)
    if not manifest:
        raise ValueError(f"teacher cache {cache_dir} has an empty or missing manifest (no complete shards); "
                         f"{GENERATE_HINT}")
    return cache_dir, manifest


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
    rejected: list[str] = field(default_factory=list)  # present but wrong: deleted, to be rebuilt
    stale_temps: list[str] = field(default_factory=list)  # half-written by killed workers: deleted


def scan_cache(cache_dir: Path, plan: Plan, *, verify: bool = False) -> CacheState:
    """Which shards of ``plan`` are complete. ``verify`` re-hashes every shard against the manifest.

    A shard on disk but not in the manifest (the job died between its rename and the
    manifest update) is adopted, and recorded in the manifest, if it reads back whole with
    the plan's sample count: shards only ever appear by atomic rename once complete. Temp
    files of shards (``.shard-*.tar.*.tmp``) are leftovers of killed workers (a retried
    shard writes a new temp) and are deleted, like rejected shards: only the job holding the
    directory's lock (taken here if the calling thread does not hold it yet) deletes anything.
    """
    with cache_lock(cache_dir):
        return _scan_locked(Path(cache_dir), plan, verify)


def _scan_locked(cache_dir: Path, plan: Plan, verify: bool) -> CacheState:
    read_teacher_record(cache_dir)  # positively a cache of ours, or nothing is touched
    manifest = read_manifest(cache_dir)
    state = CacheState()
    adopted = []
    for stale in sorted(Path(cache_dir).glob(".shard-*.tar.*.tmp")):
        stale.unlink(missing_ok=True)
        state.stale_temps.append(stale.name)
    for index in range(plan.num_shards):
        name = shard_name(index)
        path = cache_dir / name
        expected_count = len(plan.shard_sample_ids(index))
        if not path.exists():
            state.missing.append(index)
            continue
        info = manifest.get(name)
        if info is None:
            try:
                info = shard_info(path)
            except ValueError:  # damaged: rebuilt like any rejected shard
                good = False
            else:
                good = True
        else:
            good = path.stat().st_size == info.num_bytes and (not verify or verify_shard(cache_dir, info))
        # more samples than planned: written for a larger num_samples of the same plan, whose
        # shards start with exactly these samples; kept rather than rebuilt shorter
        if good and info.num_samples >= expected_count:
            state.complete[index] = info
            if name not in manifest:
                adopted.append(info)
        else:
            state.rejected.append(name)
            state.missing.append(index)
            path.unlink()
    if adopted:
        record_shards(cache_dir, adopted)
    return state


def record_shards(cache_dir: Path, infos: list[ShardInfo]) -> None:
    """Merge finished shards into the manifest (written atomically; concurrent recorders serialised)."""
    with manifest_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest.update({info.name: info for info in infos})
        write_manifest(cache_dir, list(manifest.values()))
