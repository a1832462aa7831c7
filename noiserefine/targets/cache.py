"""The teacher-target cache directory: ``<cache_root>/<teacher key>/`` (key: ``identity.py``).

It holds ``teacher.yaml`` (the teacher's identity and key, plus the generation
settings that fix the target bytes), the shards, and ``manifest.parquet`` (one row per
shard: name, count, bytes, sha256). Experiments with the same teacher share one
directory. Re-running the generator skips shards already complete.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..files import write_text_atomic
from ..shards import MANIFEST_NAME, ShardInfo, read_manifest, shard_info, shard_name, verify_shard, write_manifest
from .identity import teacher_key, teacher_record
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
        record = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable teacher record: {str(error).splitlines()[0]}") from None
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
_SHARD_INDEX = re.compile(r"shard-(\d+)")


def shard_index(name: str) -> int | None:
    """The plan index of a shard file name (``shard-000003.tar``, or a grown partial shard's name that
    carries its count after the index); None for a name that is not a shard of a plan."""
    match = _SHARD_INDEX.match(name)
    return int(match.group(1)) if match else None


def _plan_rows(cache_dir: Path, manifest: dict[str, ShardInfo]) -> dict[int, ShardInfo]:
    """One manifest row per shard index: the one with the most samples (a grown partial shard)."""
    rows: dict[int, ShardInfo] = {}
    for info in sorted(manifest.values(), key=lambda i: i.name):
        index = shard_index(info.name)
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
            missing.append(f"{shard_name(index)} ({have} of {want} samples)")
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


def prepare_cache_dir(cfg) -> Path:
    """Create the cache directory and its ``teacher.yaml``; refuse a directory of another teacher."""
    cache_dir = cache_dir_for(cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / TEACHER_FILE).exists():
        pinned = check_teacher(cache_dir, cfg).get("generation", {})
        if pinned and pinned != generation_settings(cfg):
            raise ValueError(f"{cache_dir / TEACHER_FILE}: this cache was generated with {pinned}, this run "
                             f"has {generation_settings(cfg)}; retried shards would not be byte-identical. "
                             "Use the recorded settings (e.g. pipeline.batch_size) or another data.cache_root")
    else:
        record = {**teacher_record(cfg), "generation": generation_settings(cfg)}
        write_text_atomic(cache_dir / TEACHER_FILE, yaml.safe_dump(record, sort_keys=True))
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
