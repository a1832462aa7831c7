"""What a re-run finds in a cache directory: which shards of the plan are complete, and what to do with the rest.

:func:`scan_cache` (the generator's first step) lists the store once, keeps recorded shards of the
right size, adopts complete but unrecorded shards that match the plan sample for sample
(:func:`check_against_plan`), moves damaged or foreign files aside as ``rejected-<name>.<UTC time>``
and deletes temp files of killed workers. The directory itself, its teacher record and its manifest
are ``cache.py``'s.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..shards import ShardInfo, iter_samples, parse_shard_name, read_manifest, sample_key, sample_scores, shard_name
from ..storage import location, store_for
from .cache import read_teacher_record, record_shards
from ..storage.locks import check_lease

if TYPE_CHECKING:  # plan imports torch: not needed to scan a cache
    from .plan import Plan


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


def scan_cache(cache_dir, plan: Plan, *, verify: bool = False) -> CacheState:
    """Which shards of ``plan`` are complete. ``verify`` re-hashes every recorded shard.

    A recorded shard is complete if its file has the recorded size (and, with ``verify``,
    sha256). A recorded shard shorter than the plan's (``num_samples`` grew) is left as it is
    (a running trainer may read it): the longer shard is written under its own name
    (``Plan.shard_name``, in ``state.names``) and replaces its manifest row. A shard file on
    disk but not in the manifest (the job died between its rename and the manifest update) is adopted, and recorded, only if every sample
    matches the plan: key, sample id, seed, prompt, source, teacher key, noise
    fingerprint, a finite target of the cache's dtype, and the plan's count. Nothing is
    deleted: a rejected file (damaged, or not what the plan says) is renamed
    ``rejected-<name>.<UTC time>`` and the shard rebuilt. Temp files of ``atomic_path``
    are leftovers of killed workers (a retried shard writes a new temp) and are deleted.
    All of this happens only in a directory with our ``teacher.yaml`` and under its job
    lock (taken here if the calling thread does not hold it yet).
    """
    store = store_for(cache_dir)
    with store.job_lock():
        return _scan_locked(store, plan, verify)


def _move_aside(store, name: str) -> str:
    check_lease(store.location)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, count = f"rejected-{name}.{stamp}", 1
    while store.exists(target):
        target, count = f"rejected-{name}.{stamp}-{count}", count + 1
    store.move(name, target)
    return target


def check_against_plan(path, plan: Plan, index: int, record: dict) -> ShardInfo:
    """The manifest row of the shard file ``path`` if it holds exactly shard ``index`` of ``plan`` as
    made by the teacher of ``record``; ``ValueError`` naming the first sample that differs otherwise."""
    import numpy as np

    from ..noise import fingerprint, noise_from_seed

    path = location(path)
    data = store_for(path.parent).read_bytes(path.name)
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
    scores = sample_scores([sample.meta for sample in samples], path)
    if (scores is None) != (record.get("generation", {}).get("scorer") is None):
        raise ValueError(f"{path}: its samples are {'un' if scores is None else ''}scored, the cache's "
                         f"generation settings {'record a' if scores is None else 'record no'} scorer")
    return ShardInfo(path.name, len(samples), len(data), hashlib.sha256(data).hexdigest(), scores)


def _scan_locked(store, plan: Plan, verify: bool) -> CacheState:
    cache_dir = store.location
    record = read_teacher_record(cache_dir)  # positively a cache of ours, or nothing is touched
    manifest = read_manifest(cache_dir)
    state = CacheState()
    adopted = []
    sizes = store.sizes()  # one listing (on S3: not a HEAD per shard)
    for stale in [name for name in sizes if _TEMP_RE.match(name)]:  # none on S3: uploads are spooled locally
        store.delete(stale)
        state.stale_temps.append(stale)

    def reject(name: str, reason: str) -> None:
        state.rejected.append(name)
        state.reasons[name] = reason
        state.moved[name] = _move_aside(store, name)
        sizes.pop(name, None)

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
            size = sizes.get(info.name)
            if size is None:
                pass  # deleted: rebuilt
            elif size != info.num_bytes:
                reject(info.name, f"{size} bytes, the manifest says {info.num_bytes}")
            elif verify and hashlib.sha256(store.read_bytes(info.name)).hexdigest() != info.sha256:
                reject(info.name, "sha256 differs from the manifest")
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
        if name in sizes:  # unrecorded: the job died between the rename and the manifest update?
            try:
                found = check_against_plan(cache_dir / name, plan, index, record)
            except ValueError as error:
                reject(name, f"unrecorded and not the plan's shard: {error}")
            else:
                state.complete[index] = found
                state.adopted.append(name)
                adopted.append(found)
                continue
        state.missing.append(index)
    if adopted:
        record_shards(cache_dir, adopted)
    return state
