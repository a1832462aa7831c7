"""The teacher cache as an infinite, deterministic, resumable batch stream per rank (WebDataset pipeline).

Order: epoch ``e`` permutes the manifest's shards with a generator seeded by
``(train.seed, e)``; rank ``r`` of ``W`` takes entries ``r, r+W, ...``, DataLoader
workers split those further, samples keep their order in a shard, and batches never
cross an epoch. Epochs are chained, so every rank runs exactly ``train.max_steps``
steps and no collective waits on a rank that ran out of data.

Resume: a :class:`DataPosition` (epoch, batches consumed) in the checkpoint; the epoch
is rebuilt and the consumed batches dropped, so a resumed run sees exactly the batches
an uninterrupted one would (WebDataset has no exact mid-epoch resume of its own).

Integrity: each shard is read whole and checked against the manifest (size, sha256),
parsed by the one strict tar reader (``shards.iter_samples``: no pickle, no links, no
odd names), and each ``x_T`` regenerated from its seed must match the stored
fingerprint. Each target must have the backend's latent shape (given by the caller) and
dtype float16 or float32, and be finite; sample_id and seed must be integers in range
(sample_id the one the key names) and the prompt a string. Damage (missing, truncated,
modified, unreadable tar) raises naming the shard and the command that repairs it, or
with ``train.skip_corrupt_shards`` its samples are skipped and counted; content errors
(fingerprint, teacher, shape, dtype, metadata, refused members) name the sample and the
shard and are never skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..noise import MAX_SEED, fingerprint, noise_from_seed
from ..shards import ShardFormatError, ShardInfo, ShardSample, iter_samples, sample_key
from ..targets.cache import REPAIR_HINT, open_cache
from ..targets.identity import teacher_key

@dataclass(frozen=True)
class DataPosition:
    """Where a rank's stream stands: ``batches`` batches of epoch ``epoch`` consumed."""

    epoch: int = 0
    batches: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    @classmethod
    def from_dict(cls, state: dict) -> "DataPosition":
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or batches < 0:
            raise ValueError(f"invalid data position {state}")
        return cls(epoch, batches)


@dataclass(frozen=True)
class SkipEvent:
    """``num_samples`` samples of ``shard`` were not used because the shard is damaged."""

    shard: str
    num_samples: int
    reason: str


def epoch_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of ``epoch``: a permutation seeded by ``(seed, epoch)`` only."""
    digest = hashlib.sha256(f"noiserefine-shards:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(num_shards, generator=generator).tolist()


def rank_shards(shard_names: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """Shards of ``rank`` in ``epoch``: entries ``rank, rank + world_size, ...`` of the permuted list."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if len(shard_names) < world_size:
        raise ValueError(f"{len(shard_names)} shards cannot feed {world_size} ranks (need at least one shard "
                         "per rank); generate more samples or use fewer ranks")
    order = epoch_permutation(len(shard_names), seed, epoch)
    return [shard_names[i] for i in order[rank::world_size]]


# --- pipeline stages (run inside the DataLoader workers) ---------------------------------------------

class _ShardDamaged(Exception):
    pass


def _read_verified(path: Path, info: ShardInfo) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _ShardDamaged(f"cannot read: {error}") from None
    if len(data) != info.num_bytes:
        raise _ShardDamaged(f"{len(data)} bytes on disk but the manifest says {info.num_bytes} (truncated?)")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise _ShardDamaged("sha256 differs from the manifest (modified or corrupt)")
    return data


class _ShardReader:
    """Stage: ``{"url"}`` dicts -> decoded, verified samples, and :class:`SkipEvent` items."""

    def __init__(self, manifest: dict[str, ShardInfo], teacher_key: str, skip_corrupt: bool,
                 latent_shape: tuple[int, ...] | None = None):
        self.manifest = manifest
        self.teacher_key = teacher_key
        self.skip_corrupt = skip_corrupt
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None  # None: the first target's

    def __call__(self, source: Iterable[dict]) -> Iterator[dict | SkipEvent]:
        for item in source:
            yield from self.shard(Path(item["url"]))

    def _damaged(self, path: Path, used: int, reason: str) -> SkipEvent:
        info = self.manifest[path.name]
        if not self.skip_corrupt:
            raise ValueError(f"corrupt teacher shard {path}: {reason}. Repair the cache with `{REPAIR_HINT}` "
                             "(it re-hashes every shard and rebuilds the damaged ones; without "
                             "pipeline.verify=true it only checks sizes), or set train.skip_corrupt_shards=true "
                             "to skip damaged shards")
        remaining = max(info.num_samples - used, 0)
        print(f"warning: skipping {remaining} samples of corrupt shard {path}: {reason}", file=sys.stderr,
              flush=True)
        return SkipEvent(path.name, remaining, reason)

    def shard(self, path: Path) -> Iterator[dict | SkipEvent]:
        info = self.manifest[path.name]
        try:
            data = _read_verified(path, info)
        except _ShardDamaged as damage:
            yield self._damaged(path, 0, str(damage))
            return
        samples = iter_samples(data, str(path))
        used = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except ShardFormatError as error:  # the bytes match the manifest, the tar does not
                yield self._damaged(path, used, f"unreadable tar: {error}")
                return
            yield self.check(sample, path)  # content errors are never skipped
            used += 1
        if used != info.num_samples:
            yield self._damaged(path, used, f"holds {used} samples but the manifest says {info.num_samples}")

    def check(self, sample: ShardSample, path: Path) -> dict:
        key, meta, arrays = sample.key, sample.meta, sample.arrays
        where = f"sample {key!r} of shard {path}"
        if "target" not in arrays:
            raise ValueError(f"{where} has no target array (members: {sorted(arrays)})")
        for field in ("sample_id", "seed", "prompt", "noise_fingerprint", "teacher_key"):
            if field not in meta:
                raise ValueError(f"{where}: metadata has no {field!r}")
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


def split_by_loader_worker(source: Iterable[dict]) -> Iterator[dict]:
    """Stage: DataLoader worker ``w`` of ``n`` takes shards ``w, w+n, ...`` of its rank's list.

    Like ``wds.split_by_worker`` but from ``torch.utils.data.get_worker_info()`` only
    (webdataset lets WORKER/NUM_WORKERS environment variables override it).
    """
    info = torch.utils.data.get_worker_info()
    if info is None or info.num_workers == 1:
        yield from source
    else:
        yield from itertools.islice(source, info.id, None, info.num_workers)


def collate(samples: list[dict]) -> dict:
    """Samples -> ``{"sample_id", "seed", "prompt": lists, "noise", "target": float32 tensors}``."""
    return {"sample_id": [s["sample_id"] for s in samples], "seed": [s["seed"] for s in samples],
            "prompt": [s["prompt"] for s in samples],
            "noise": torch.stack([s["noise"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples])}


def _batches(batch_size: int):
    """Stage: group samples into batches (last one may be short); skip events pass straight through."""

    def stage(source: Iterable[dict | SkipEvent]) -> Iterator[dict | SkipEvent]:
        pending: list[dict] = []
        for item in source:
            if isinstance(item, SkipEvent):
                yield item
                continue
            pending.append(item)
            if len(pending) == batch_size:
                yield collate(pending)
                pending = []
        if pending:
            yield collate(pending)

    return stage


# --- the stream ---------------------------------------------------------------------------------------

class TeacherStream:
    """The infinite, deterministic batch stream of one rank (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, manifest: dict[str, ShardInfo], *, teacher_key: str, seed: int,
                 rank: int, world_size: int, batch_size: int, num_workers: int = 0,
                 skip_corrupt: bool = False, shards: list[str] | None = None,
                 latent_shape: tuple[int, ...] | None = None):
        """``latent_shape``: the backend's (every target must have it; None: the first target's)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.cache_dir = Path(cache_dir)
        names = sorted(manifest) if shards is None else list(shards)
        unknown = [name for name in names if name not in manifest]
        if unknown:
            raise ValueError(f"shards {unknown} are not in the manifest of {self.cache_dir}")
        if len(names) < world_size:
            raise ValueError(f"the cache {self.cache_dir} has {len(names)} shards, fewer than the {world_size} "
                             "ranks (each rank needs at least one shard per epoch)")
        self.shard_names = names
        self.manifest = {name: manifest[name] for name in names}
        self.teacher_key = teacher_key
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.skip_corrupt = bool(skip_corrupt)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.position = DataPosition()
        self.corrupt_skipped = 0
        self.skip_events: list[SkipEvent] = []

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1, *, shards: list[str] | None = None,
                    cache: tuple[Path, dict[str, ShardInfo]] | None = None,
                    latent_shape: tuple[int, ...] | None = None) -> "TeacherStream":
        cache_dir, manifest = cache if cache is not None else open_cache(cfg)
        return cls(cache_dir, manifest, teacher_key=teacher_key(cfg), seed=cfg.train.seed, rank=rank,
                   world_size=world_size, batch_size=cfg.train.batch_size,
                   num_workers=cfg.train.num_loader_workers, skip_corrupt=cfg.train.skip_corrupt_shards,
                   shards=shards, latent_shape=latent_shape)

    @property
    def samples_per_epoch(self) -> int:
        """Samples of all ranks in one epoch (from the manifest)."""
        return sum(info.num_samples for info in self.manifest.values())

    def epoch_shards(self, epoch: int) -> list[str]:
        return rank_shards(self.shard_names, self.seed, epoch, self.rank, self.world_size)

    def pipeline(self, epoch: int):
        """The WebDataset pipeline of this rank's shards in ``epoch`` (explicit, unshuffled shard list)."""
        import webdataset as wds

        urls = [str(self.cache_dir / name) for name in self.epoch_shards(epoch)]
        return wds.DataPipeline(
            wds.SimpleShardList(urls, seed=None),  # shard order is ours (epoch_permutation): no wds shuffle
            split_by_loader_worker,                # nodes were split above (rank_shards)
            _ShardReader(self.manifest, self.teacher_key, self.skip_corrupt, self.latent_shape),
            _batches(self.batch_size),
        )

    def _loader(self, epoch: int) -> Iterable:
        dataset = self.pipeline(epoch)
        if self.num_workers == 0:
            return dataset
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                           persistent_workers=False)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """This rank's batches of ``epoch`` from index ``skip`` on; each has ``epoch`` and ``index``."""
        index = 0
        for item in self._loader(epoch):
            if isinstance(item, SkipEvent):
                if index >= skip:  # events before a resume point were counted by the original run
                    self.skip_events.append(item)
                    self.corrupt_skipped += item.num_samples
                continue
            if index >= skip:
                item["epoch"], item["index"] = epoch, index
                self.position = DataPosition(epoch, index + 1)
                yield item
            index += 1
        if index == 0:
            raise ValueError(f"rank {self.rank} got no samples in epoch {epoch} from shards "
                             f"{self.epoch_shards(epoch)} (all damaged?)")

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]:
        """The infinite stream from ``start`` (default: the beginning)."""
        start = start or DataPosition()
        self.position = start
        epoch, skip = start.epoch, start.batches
        while True:
            yield from self.epoch_batches(epoch, skip)
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def state_dict(self) -> dict:
        """The resumable state of this rank: position and the corrupt-sample counter."""
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> DataPosition:
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.position = DataPosition.from_dict(state)
        return self.position
