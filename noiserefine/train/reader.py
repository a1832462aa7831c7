"""Reading one rank's samples of teacher shards, inside the DataLoader workers (``stream.py`` orders them).

Each shard is read whole (``storage``: local file, or ranged GETs with retries on S3) and
checked against its manifest row (size, sha256), parsed by the one strict tar reader
(``shards.iter_samples``: no pickle, no links, no odd names), and each of this rank's samples
is checked: ``x_T`` regenerated from its seed must match the stored fingerprint, the target
must have the backend's latent shape, dtype float16 or float32, and be finite; sample_id and
seed must be integers in range (sample_id the one the key names) and the prompt a string.
Damage (missing, truncated, modified, unreadable tar) raises naming the shard and the command
that repairs it, or with ``train.skip_corrupt_shards`` this rank's samples of it are left out
and counted (a :class:`SkipEvent`); content errors name the sample and the shard and are never
skipped.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..noise import MAX_SEED, fingerprint, noise_from_seed
from ..shards import ShardFormatError, ShardInfo, ShardSample, iter_samples, sample_key
from ..storage import Location, StorageUnavailable, location, store_for
from ..targets.cache import REPAIR_HINT


@dataclass(frozen=True)
class SkipEvent:
    """``num_samples`` samples of this rank in ``shard`` were not used because the shard is damaged."""

    shard: str
    num_samples: int
    reason: str


class _ShardDamaged(Exception):
    pass


@dataclass(frozen=True)
class ReadItem:
    """Read shard ``name`` (positions from ``start``) and keep the samples at ``indices`` (this rank's).

    ``rows``: the shard row of each index, for a shard filtered by score (index ``i`` is its ``i``-th kept
    sample, at position ``start + i``); None: index = row.
    """

    name: str
    start: int
    indices: tuple[int, ...]
    rows: tuple[int, ...] | None = None


@dataclass
class ShardPart:
    """This rank's checked samples of one shard: ``(global position, sample dict)``, and a skip event if damaged."""

    name: str
    samples: list[tuple[int, dict]] = field(default_factory=list)
    skip: SkipEvent | None = None


class ShardReader:
    """Reads one shard whole (local or object store), checks it against the manifest, keeps this rank's samples."""

    def __init__(self, cache_dir: Location, manifest: dict[str, ShardInfo], teacher_key: str, skip_corrupt: bool,
                 latent_shape: tuple[int, ...] | None = None):
        self.cache_dir = location(cache_dir)
        self.manifest = manifest
        self.teacher_key = teacher_key
        self.skip_corrupt = skip_corrupt
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None  # None: the first target's

    def _read_verified(self, name: str) -> bytes:
        info = self.manifest[name]
        try:
            data = store_for(self.cache_dir).read_bytes(name)
        except (StorageUnavailable, PermissionError):
            raise  # the store is down (retries exhausted) or refuses access: not damage, never skipped
        except OSError as error:
            raise _ShardDamaged(f"cannot read: {error}") from None
        if len(data) != info.num_bytes:
            raise _ShardDamaged(f"{len(data)} bytes stored but the manifest says {info.num_bytes} (truncated?)")
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise _ShardDamaged("sha256 differs from the manifest (modified or corrupt)")
        return data

    def _damaged(self, path, lost: int, reason: str) -> SkipEvent:
        if not self.skip_corrupt:
            raise ValueError(f"corrupt teacher shard {path}: {reason}. Repair the cache with `{REPAIR_HINT}` "
                             "(it re-hashes every shard and rebuilds the damaged ones; without "
                             "pipeline.verify=true it only checks sizes), or set train.skip_corrupt_shards=true "
                             "to skip damaged shards")
        print(f"warning: skipping {lost} samples of corrupt shard {path}: {reason}", file=sys.stderr, flush=True)
        return SkipEvent(path.name, lost, reason)

    def __call__(self, item: ReadItem) -> ShardPart:
        path = self.cache_dir / item.name
        info = self.manifest[item.name]
        part = ShardPart(item.name)
        wanted = set(item.indices)
        try:
            data = self._read_verified(item.name)
        except _ShardDamaged as damage:
            part.skip = self._damaged(path, len(wanted), str(damage))
            return part
        samples = iter_samples(data, str(path))
        rows = item.indices if item.rows is None else item.rows
        position_of = {row: item.start + index for index, row in zip(item.indices, rows)}
        used = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except ShardFormatError as error:  # the bytes match the manifest, the tar does not
                part.skip = self._damaged(path, len(wanted) - len(part.samples), f"unreadable tar: {error}")
                return part
            if used in position_of:
                checked = self.check(sample, path, None if info.scores is None else info.scores[used])
                part.samples.append((position_of[used], checked))  # never skipped
            used += 1
        if used != info.num_samples:
            lost = len(wanted) - len(part.samples)
            part.skip = self._damaged(path, lost, f"holds {used} samples but the manifest says {info.num_samples}")
        return part

    def check(self, sample: ShardSample, path, score: float | None = None) -> dict:
        """The training sample of ``sample``; ``score``: the one its manifest row records (its ``.json`` must agree)."""
        key, meta, arrays = sample.key, sample.meta, sample.arrays
        where = f"sample {key!r} of shard {path}"
        if score is not None and meta.get("score") != score:
            raise ValueError(f"{where}: score {meta.get('score')!r} in its metadata, the manifest records {score}")
        if "target" not in arrays:
            raise ValueError(f"{where} has no target array (members: {sorted(arrays)})")
        for name in ("sample_id", "seed", "prompt", "noise_fingerprint", "teacher_key"):
            if name not in meta:
                raise ValueError(f"{where}: metadata has no {name!r}")
        if meta["teacher_key"] != self.teacher_key:
            raise ValueError(f"{where} was made by teacher {meta['teacher_key']}, expected {self.teacher_key}")
        sample_id, seed, prompt = meta["sample_id"], meta["seed"], meta["prompt"]
        if not _is_int(sample_id) or sample_id < 0 or sample_key(sample_id) != key:
            raise ValueError(f"{where}: sample_id {sample_id!r} is not the non-negative integer its key names")
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"{where}: seed {seed!r} is not an integer in [0, 2**63-1]")
        if not isinstance(prompt, str) or not isinstance(meta["noise_fingerprint"], str):
            raise ValueError(f"{where}: prompt {prompt!r} and noise_fingerprint {meta['noise_fingerprint']!r} "
                             "must be strings")
        array = arrays["target"]
        if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4):
            raise ValueError(f"{where}: target dtype {array.dtype}, expected float16 or float32")
        if self.latent_shape is None:
            self.latent_shape = tuple(array.shape)
        if tuple(array.shape) != self.latent_shape:
            raise ValueError(f"{where}: target shape {tuple(array.shape)}, expected the backend's latent shape "
                             f"{self.latent_shape}")
        target = torch.from_numpy(array.astype("float32"))
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"{where}: target has non-finite values (NaN or inf)")
        noise = noise_from_seed(seed, self.latent_shape)
        actual = fingerprint(noise)
        if actual != meta["noise_fingerprint"]:
            raise ValueError(f"{where}: noise regenerated from seed {seed} has fingerprint {actual}, "
                             f"the stored one is {meta['noise_fingerprint']} (target made from other noise)")
        return {"sample_id": sample_id, "seed": seed, "prompt": prompt, "noise": noise, "target": target}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def collate(samples: list[dict]) -> dict:
    """Samples -> ``{"sample_id", "seed", "prompt": lists, "noise", "target": float32 tensors}``."""
    return {"sample_id": [s["sample_id"] for s in samples], "seed": [s["seed"] for s in samples],
            "prompt": [s["prompt"] for s in samples],
            "noise": torch.stack([s["noise"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples])}


def empty_batch(latent_shape: tuple[int, ...] | None) -> dict:
    """A batch of no samples (see ``TeacherStream._emit``)."""
    shape = (0, *(latent_shape or ()))
    return {"sample_id": [], "seed": [], "prompt": [], "noise": torch.zeros(shape), "target": torch.zeros(shape)}


class ShardParts(torch.utils.data.IterableDataset):
    """The parts of ``items`` in order; DataLoader worker ``w`` of ``n`` reads items ``w, w+n, ...`` (the
    DataLoader returns them round-robin, i.e. in order)."""

    def __init__(self, reader: ShardReader, items: list[ReadItem]):
        self.reader, self.items = reader, items

    def __iter__(self) -> Iterator[ShardPart]:
        info = torch.utils.data.get_worker_info()
        for k, item in enumerate(self.items):
            if info is None or k % info.num_workers == info.id:
                yield self.reader(item)
