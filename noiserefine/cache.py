"""The teacher-target cache directory: ``<cache_root>/<backend>-<teacher hash>/``.

It holds ``teacher.yaml`` (the teacher-relevant config and its key), the shards,
and ``manifest.parquet`` (one row per shard: name, count, bytes, sha256). Two
experiments with the same teacher config share one directory; a different
teacher config gets a different one. Re-running skips shards already complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import teacher_key, teacher_subtree
from .files import write_text_atomic
from .plan import Plan
from .shards import ShardInfo, read_manifest, shard_info, shard_name, verify_shard, write_manifest

TEACHER_FILE = "teacher.yaml"


def cache_dir_for(cfg) -> Path:
    """``data.cache_dir`` if set, else ``data.cache_root/<teacher key>``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(cfg.data.cache_root).expanduser() / teacher_key(cfg)


def teacher_record(cfg) -> dict:
    return {"teacher_key": teacher_key(cfg), **teacher_subtree(cfg)}


def read_teacher_record(cache_dir: Path) -> dict:
    path = Path(cache_dir) / TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no teacher cache at {cache_dir} ({TEACHER_FILE} missing); "
                                "run pipeline/generate_targets.py with the same teacher config first")
    record = yaml.safe_load(path.read_text())
    if not isinstance(record, dict) or "teacher_key" not in record:
        raise ValueError(f"{path}: not a teacher record (no 'teacher_key')")
    return record


def check_teacher(cache_dir: Path, cfg) -> dict:
    """The cache's teacher must be the config's teacher; the error names the differing fields."""
    record = read_teacher_record(cache_dir)
    expected = teacher_record(cfg)
    if record["teacher_key"] != expected["teacher_key"]:
        differing = sorted(f"{section}.{key}" for section in ("model", "teacher", "data")
                           for key in set(record.get(section, {})) | set(expected[section])
                           if record.get(section, {}).get(key) != expected[section].get(key))
        raise ValueError(f"{cache_dir / TEACHER_FILE}: teacher key {record['teacher_key']} does not match "
                         f"this config's {expected['teacher_key']} (differs in: {', '.join(differing)})")
    return record


def prepare_cache_dir(cfg) -> Path:
    """Create the cache directory and its ``teacher.yaml``; refuse a directory of another teacher."""
    cache_dir = cache_dir_for(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / TEACHER_FILE).exists():
        check_teacher(cache_dir, cfg)
    else:
        write_text_atomic(cache_dir / TEACHER_FILE, yaml.safe_dump(teacher_record(cfg), sort_keys=True))
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
    shard writes a new temp) and are deleted, like rejected shards: one job at a time owns
    a cache directory.
    """
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
    """Merge finished shards into the manifest (written atomically by the driver only)."""
    manifest = read_manifest(cache_dir)
    manifest.update({info.name: info for info in infos})
    write_manifest(cache_dir, list(manifest.values()))
