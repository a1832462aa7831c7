"""The teacher-target cache directory: ``<cache_root>/<teacher key>/`` (key: ``identity.py``).

It holds ``teacher.yaml`` (the teacher's identity and key, plus the generation
settings that fix the target bytes), the shards, and ``manifest.parquet`` (one row per
shard: name, count, bytes, sha256). Experiments with the same teacher share one
directory. Re-running the generator skips shards already complete.

The directory may be local or an S3 prefix (``s3://bucket/prefix``): every file operation goes
through a ``storage.Store``, with the same semantics on both (see ``storage/``: ``base.py``, ``locks.py``).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..performance import teacher_levers
from ..shards import MANIFEST_NAME, ShardInfo, manifest_bytes, parse_manifest, parse_shard_name, read_manifest
from ..storage import Location, LocalStore, location, store_for
from .identity import teacher_key, teacher_record
from ..storage.locks import LOCK_FILES, check_lease

if TYPE_CHECKING:  # plan imports torch: not needed to read or lock a cache
    from .plan import Plan

TEACHER_FILE = "teacher.yaml"
GENERATE_HINT = "run `python pipeline/generate_targets.py --config <same config>` first"


def cache_dir_for(cfg) -> Location:
    """``data.cache_dir`` if set, else ``data.cache_root/<teacher key>`` (a ``Path``, or an ``ObjectPath``
    for ``s3://bucket/prefix``)."""
    if cfg.data.cache_dir:
        return location(cfg.data.cache_dir)
    return location(cfg.data.cache_root) / teacher_key(cfg)


def generation_settings(cfg) -> dict:
    """Settings that change the shards' bytes but not the teacher: pinned per cache, not keyed.

    Batched network calls round differently at another batch size, so a shard made at
    another ``pipeline.batch_size`` would not be byte-identical to its retry; so do the speed levers the
    teacher runs with (``performance.*``, but the refiner's micro-batch), pinned only when one is on (a cache
    made before levers existed pinned the batch size alone). The scorer (``scorer_identity``: kind and
    weights' sha256; only when one is configured, so an unscored cache's record is as before scorers) writes
    each sample's score into its ``.json``: one cache never mixes scorers, or scored and unscored shards.
    """
    from ..scoring import scorer_identity

    settings: dict = {"batch_size": int(cfg.pipeline.batch_size)}
    levers = {key: value for key, value in teacher_levers(cfg).items() if value}
    if levers:
        settings["performance"] = levers
    scorer = scorer_identity(cfg.scorer)
    if scorer is not None:
        settings["scorer"] = scorer
    return settings


class _NamedText(io.StringIO):
    name = ""


def read_teacher_record(cache_dir) -> dict:
    store = store_for(cache_dir)
    path = store.path(TEACHER_FILE)
    try:
        data = store.read_bytes(TEACHER_FILE)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"no teacher cache at {cache_dir} ({TEACHER_FILE} missing); {GENERATE_HINT}") from None
    try:
        stream = _NamedText(data.decode("utf-8"))
        stream.name = str(path)  # YAML's error marks then name the file, not "<unicode string>"
        record = yaml.safe_load(stream)  # safe: a !!python tag is an error, never executed
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable teacher record: {' '.join(str(error).split())}") from None
    if not isinstance(record, dict) or not isinstance(record.get("teacher_key"), str) \
            or not all(isinstance(record.get(section), dict) for section in ("model", "teacher", "data")):
        raise ValueError(f"{path}: not a teacher record (needs teacher_key and model/teacher/data mappings)")
    return record


def check_teacher(cache_dir, cfg) -> dict:
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


def _check_rows(cache_dir, manifest: dict[str, ShardInfo], rows: list[ShardInfo]) -> None:
    """The shard rows a checkpoint trained on must all still be there, unchanged (exact resume)."""
    problems = []
    store = store_for(cache_dir)
    sizes = store.sizes()
    for row in rows:
        path = store.path(row.name)
        current = manifest.get(row.name)
        size = sizes.get(row.name)
        if size is None:
            problems.append(f"{path} is gone")
        elif size != row.num_bytes:
            problems.append(f"{path} changed: {size} bytes, the checkpoint recorded {row.num_bytes}")
        elif current is not None and current != row:
            problems.append(f"{path} changed: the manifest now records {current.num_samples} samples, sha256 "
                            f"{current.sha256[:12]}…, the checkpoint {row.num_samples} samples, sha256 "
                            f"{row.sha256[:12]}…")
    if problems:
        raise ValueError(f"shards this run trains on are gone or changed: {'; '.join(problems)}. A resumed run "
                         "trains on exactly the shards it started with (data.num_samples may grow: new shards are "
                         "left for new runs); restore those shards, or train in a new train.output_dir")


def open_cache(cfg, rows: list[ShardInfo] | None = None) -> tuple[Location, dict[str, ShardInfo]]:
    """The existing teacher cache of ``cfg`` and the shard rows to train on, for reading (the trainer).

    A fresh run (``rows`` None) trains on one manifest row per shard index of the plan
    (``Plan.from_config(cfg.data)``; shards a larger ``data.num_samples`` left are not its data, and a
    last shard written whole for a larger plan is trained on whole, with a warning) and needs every
    shard of the plan with at least its planned samples;
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
    # the cache serves every config of its teacher: this plan's shards, not those a larger data.num_samples left
    planned = {index: info for index, info in by_index.items() if index < plan.num_shards}
    last, planned_last = plan.num_shards - 1, len(plan.shard_sample_ids(plan.num_shards - 1))
    if last in planned and planned[last].num_samples > planned_last:
        print(f"WARNING: data.num_samples={plan.num_samples} ends inside {planned[last].name}, which holds "
              f"{planned[last].num_samples} samples (written for a larger data.num_samples; a shard is trained on "
              f"whole): training on {plan.num_samples - planned_last + planned[last].num_samples} samples",
              file=sys.stderr, flush=True)
    return cache_dir, {info.name: info for info in planned.values()}


def _check_generation(cache_dir, cfg) -> None:
    pinned = check_teacher(cache_dir, cfg).get("generation", {})
    if pinned and pinned != generation_settings(cfg):
        raise ValueError(f"{cache_dir / TEACHER_FILE}: this cache was generated with {pinned}, this run "
                         f"has {generation_settings(cfg)}; retried shards would not be byte-identical (and a "
                         "cache's scores all come from one scorer). Use the recorded settings (e.g. "
                         "pipeline.batch_size, scorer.*) or another data.cache_root / data.cache_dir")


def _refuse_foreign(cache_dir) -> None:
    """A directory (or S3 prefix) is ours if it is new, empty (but for our lock files) or holds a ``teacher.yaml``.

    Anything else (``data.cache_dir`` pointed at a dataset, a home directory...) is refused
    before a single file in it is created, deleted, renamed or adopted.
    """
    store = store_for(cache_dir)
    if isinstance(store, LocalStore) and store.location.exists() and not store.location.is_dir():
        raise ValueError(f"teacher cache {cache_dir} exists and is not a directory")
    names = store.names()
    if not names or TEACHER_FILE in names:
        return
    entries = [name for name in names if name not in LOCK_FILES]
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(f"{cache_dir} is not empty and has no {TEACHER_FILE}: it is not a teacher cache of ours; "
                         f"refusing to write, delete or adopt anything in it (it holds {shown}). Point "
                         "data.cache_dir at a new or empty directory, or leave it empty to use "
                         "data.cache_root/<teacher key>")


@contextmanager
def hold_cache(cfg) -> Iterator[Location]:
    """The cache directory of ``cfg``, created with its ``teacher.yaml`` and held for writing.

    The job lock (``.lock``, see ``storage/locks.py``) is held until the block ends: a second job on
    the same directory fails at once naming the first one (on S3: while the first one's lease
    lasts). Refuses a directory of another teacher, or made with other generation settings.
    """
    cache_dir = cache_dir_for(cfg)
    store = store_for(cache_dir)
    _refuse_foreign(cache_dir)  # checked before anything is created or locked
    if store.exists(TEACHER_FILE):
        _check_generation(cache_dir, cfg)
    store.make()
    with store.job_lock(cfg.pipeline.lock_ttl_s):
        _refuse_foreign(cache_dir)
        if store.exists(TEACHER_FILE):
            _check_generation(cache_dir, cfg)
        else:
            record = {**teacher_record(cfg), "generation": generation_settings(cfg)}
            store.write_bytes(TEACHER_FILE, yaml.safe_dump(record, sort_keys=True).encode("utf-8"))
        yield cache_dir


def prepare_cache_dir(cfg) -> Location:
    """Create the cache directory and its ``teacher.yaml`` (under the job lock); see :func:`hold_cache`."""
    with hold_cache(cfg) as cache_dir:
        return cache_dir


def record_shards(cache_dir, infos: list[ShardInfo]) -> None:
    """Merge finished shards into the manifest (written atomically; concurrent recorders never lose rows:
    ``.manifest.lock`` locally, a compare-and-swap on S3).

    A shard's row replaces the row of the same shard index under another name (a grown
    partial shard): the manifest lists each shard once; the old file stays on disk.
    """
    check_lease(cache_dir)
    store = store_for(cache_dir)

    def merge(old: bytes | None) -> bytes:
        check_lease(cache_dir)  # again on every compare-and-swap attempt: the last moment before the write
        manifest = parse_manifest(old, store.path(MANIFEST_NAME))
        for info in infos:
            parsed = parse_shard_name(info.name)
            if parsed is not None:
                for name in [n for n in manifest if (parse_shard_name(n) or (None,))[0] == parsed[0]]:
                    del manifest[name]
            manifest[info.name] = info
        return manifest_bytes(list(manifest.values()))

    store.read_modify_write(MANIFEST_NAME, merge)
