"""The teacher cache as an infinite, deterministic, resumable batch stream per rank, in one GLOBAL order.

Order: one global sequence of sample positions, independent of the number of ranks
(``order.py``); rank ``r`` of ``W`` takes its contiguous slice of every global batch.

Resume: a :class:`DataPosition` (global batches consumed) in the checkpoint; the stream
starts at that batch's first shard (earlier shards are not read again).

I/O: a rank reads (whole) every shard holding at least one position of its slices, and no
other; DataLoader worker ``w`` of ``n`` reads shards ``w, w+n, ...`` of that list and the
batches are assembled in order in the rank's process. With slices shorter than a shard each
rank reads every shard (``W`` x the bytes of a per-rank split; see docs/scale.md).

Integrity: each shard is read whole (``storage``: local file, or ranged GETs with retries on
S3) and checked against the manifest (size, sha256), parsed by the one strict tar reader
(``shards.iter_samples``: no pickle, no links, no odd names), and each of this rank's samples
is checked: ``x_T`` regenerated from its seed must match the stored fingerprint, the target
must have the backend's latent shape (given by the caller), dtype float16 or float32, and be
finite; sample_id and seed must be integers in range (sample_id the one the key names) and the
prompt a string. Damage (missing, truncated, modified, unreadable tar) raises naming the shard
and the command that repairs it, or with ``train.skip_corrupt_shards`` this rank's samples of
it are left out (its slice of those batches is shorter, or empty: a zero-gradient step) and counted;
content errors
(fingerprint, teacher, shape, dtype, metadata, refused members) name the sample and the shard
and are never skipped.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..noise import MAX_SEED, fingerprint, noise_from_seed
from ..shards import ShardFormatError, ShardInfo, ShardSample, iter_samples, sample_key
from ..storage import Location, StorageUnavailable, location, store_for
from ..targets.cache import REPAIR_HINT, open_cache
from ..targets.identity import teacher_key
from .order import GlobalOrder, per_rank_batch


@dataclass(frozen=True)
class DataPosition:
    """Where the global stream stands: ``batches`` global batches consumed (the same on every rank)."""

    batches: int = 0

    def to_dict(self) -> dict:
        return {"batches": self.batches}

    @classmethod
    def from_dict(cls, state: dict) -> "DataPosition":
        if "epoch" in state:
            raise ValueError(f"data position {state} is of the per-rank stream of older trainers (epoch, batches "
                             "per rank), not a position in the global order; finish that run with the version "
                             "that wrote it, or train in a new train.output_dir")
        batches = int(state["batches"])
        if batches < 0:
            raise ValueError(f"invalid data position {state}")
        return cls(batches)


@dataclass(frozen=True)
class SkipEvent:
    """``num_samples`` samples of this rank in ``shard`` were not used because the shard is damaged."""

    shard: str
    num_samples: int
    reason: str


# --- reading shards (inside the DataLoader workers) --------------------------------------------------

class _ShardDamaged(Exception):
    pass


@dataclass(frozen=True)
class ReadItem:
    """Read shard ``name`` (positions from ``start``) and keep the samples at ``indices`` (this rank's)."""

    name: str
    start: int
    indices: tuple[int, ...]


@dataclass
class ShardPart:
    """This rank's checked samples of one shard: ``(global position, sample dict)``, and a skip event if damaged."""

    name: str
    samples: list[tuple[int, dict]] = field(default_factory=list)
    skip: SkipEvent | None = None


class _ShardReader:
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
        except StorageUnavailable:
            raise  # the store is down (retries exhausted): not damage of this shard
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
        used = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except ShardFormatError as error:  # the bytes match the manifest, the tar does not
                part.skip = self._damaged(path, len(wanted) - len(part.samples), f"unreadable tar: {error}")
                return part
            if used in wanted:
                part.samples.append((item.start + used, self.check(sample, path)))  # never skipped
            used += 1
        if used != info.num_samples:
            lost = len(wanted) - len(part.samples)
            part.skip = self._damaged(path, lost, f"holds {used} samples but the manifest says {info.num_samples}")
        return part

    def check(self, sample: ShardSample, path) -> dict:
        key, meta, arrays = sample.key, sample.meta, sample.arrays
        where = f"sample {key!r} of shard {path}"
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
    """A batch of no samples (see :meth:`TeacherStream._emit`)."""
    shape = (0, *(latent_shape or ()))
    return {"sample_id": [], "seed": [], "prompt": [], "noise": torch.zeros(shape), "target": torch.zeros(shape)}


class _ShardParts(torch.utils.data.IterableDataset):
    """The parts of ``items`` in order; DataLoader worker ``w`` of ``n`` reads items ``w, w+n, ...`` (the
    DataLoader returns them round-robin, i.e. in order)."""

    def __init__(self, reader: _ShardReader, items: list[ReadItem]):
        self.reader, self.items = reader, items

    def __iter__(self) -> Iterator[ShardPart]:
        info = torch.utils.data.get_worker_info()
        for k, item in enumerate(self.items):
            if info is None or k % info.num_workers == info.id:
                yield self.reader(item)


# --- the stream ---------------------------------------------------------------------------------------

class TeacherStream:
    """The infinite, deterministic batch stream of one rank (see the module docstring)."""

    def __init__(self, cache_dir: str | Location, manifest: dict[str, ShardInfo], *, teacher_key: str, seed: int,
                 rank: int, world_size: int, global_batch_size: int, num_workers: int = 0,
                 skip_corrupt: bool = False, shards: list[str] | None = None,
                 latent_shape: tuple[int, ...] | None = None):
        """``latent_shape``: the backend's (every target must have it; None: the first target's)."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cache_dir = location(cache_dir)
        names = sorted(manifest) if shards is None else list(shards)
        unknown = [name for name in names if name not in manifest]
        if unknown:
            raise ValueError(f"shards {unknown} are not in the manifest of {self.cache_dir}")
        self.shard_names = names
        self.manifest = {name: manifest[name] for name in names}
        self.teacher_key = teacher_key
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = per_rank_batch(self.global_batch_size, self.world_size)
        self.num_workers = int(num_workers)
        self.order = GlobalOrder(names, {n: self.manifest[n].num_samples for n in names}, self.seed,
                                 self.global_batch_size)
        self.skip_corrupt = bool(skip_corrupt)
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.position = DataPosition()
        self.corrupt_skipped = 0
        self.skip_events: list[SkipEvent] = []

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1, *, shards: list[str] | None = None,
                    cache: tuple[Location, dict[str, ShardInfo]] | None = None,
                    latent_shape: tuple[int, ...] | None = None) -> "TeacherStream":
        cache_dir, manifest = cache if cache is not None else open_cache(cfg)
        return cls(cache_dir, manifest, teacher_key=teacher_key(cfg), seed=cfg.train.seed, rank=rank,
                   world_size=world_size, global_batch_size=cfg.train.global_batch_size,
                   num_workers=cfg.train.num_loader_workers, skip_corrupt=cfg.train.skip_corrupt_shards,
                   shards=shards, latent_shape=latent_shape)

    @property
    def samples_per_epoch(self) -> int:
        """Samples of all ranks in one epoch (from the manifest)."""
        return self.order.samples_per_epoch

    def shard_rows(self) -> list[ShardInfo]:
        """The manifest rows this stream trains on, in its order (recorded in checkpoints)."""
        return [self.manifest[name] for name in self.shard_names]

    def epoch_shards(self, epoch: int) -> list[str]:
        """The shards this rank reads in ``epoch`` (those holding a position of its slices), in order."""
        return [span.name for span in self.order.epoch_spans(epoch)
                if self.order.wanted(span, self.rank, self.world_size, span.start)]

    def _reader(self) -> _ShardReader:
        return _ShardReader(self.cache_dir, self.manifest, self.teacher_key, self.skip_corrupt, self.latent_shape)

    def _parts(self, items: list[ReadItem]) -> Iterable[ShardPart]:
        dataset = _ShardParts(self._reader(), items)
        if self.num_workers == 0 or not items:
            return dataset
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, len(items)),
                                           persistent_workers=False)

    def batches(self, start: DataPosition | None = None) -> Iterator[dict]:
        """The infinite stream of this rank's batches from global batch ``start.batches`` on.

        Each batch has ``index`` (the global batch), ``epoch`` (of its first position) and the
        collated samples (see :func:`collate`).
        """
        start = start or DataPosition()
        self.position = start
        order, batch = self.order, start.batches
        lo, hi = order.rank_slice(batch, self.rank, self.world_size)
        first = batch * order.global_batch_size
        epoch = order.epoch_of(first)
        pending: list[dict] = []
        while True:
            spans = [span for span in order.epoch_spans(epoch) if span.start + span.count > first]
            wanted = [order.wanted(span, self.rank, self.world_size, first) for span in spans]
            parts = iter(self._parts([ReadItem(span.name, span.start, tuple(indices))
                                      for span, indices in zip(spans, wanted) if indices]))
            for span, indices in zip(spans, wanted):
                if indices:
                    part = next(parts)
                    if part.skip is not None:
                        self.skip_events.append(part.skip)
                        self.corrupt_skipped += part.skip.num_samples
                    for position, sample in part.samples:
                        while position >= hi:  # a later slice: the current one is complete (or lost)
                            yield self._emit(pending, batch, lo)
                            pending = []
                            batch += 1
                            lo, hi = order.rank_slice(batch, self.rank, self.world_size)
                        pending.append(sample)
                while span.start + span.count >= hi:  # every position of the slice has been passed
                    yield self._emit(pending, batch, lo)
                    pending = []
                    batch += 1
                    lo, hi = order.rank_slice(batch, self.rank, self.world_size)
            epoch += 1
            first = epoch * order.samples_per_epoch

    def _emit(self, pending: list[dict], batch: int, lo: int) -> dict:
        # a slice lost entirely to damaged shards (train.skip_corrupt_shards) is an empty batch: the rank still
        # takes part in the step (a zero-gradient contribution), so no collective waits for it
        out = collate(pending) if pending else empty_batch(self.latent_shape)
        out["epoch"], out["index"] = self.order.epoch_of(lo), batch
        self.position = DataPosition(batch + 1)
        return out

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """This rank's batches whose first position lies in ``epoch`` (a finite slice of :meth:`batches`)."""
        size, n = self.order.global_batch_size, self.order.samples_per_epoch
        first, stop = -(-epoch * n // size), -(-(epoch + 1) * n // size)
        stream = self.batches(DataPosition(first))
        for _ in range(first, stop):
            yield next(stream)

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def state_dict(self) -> dict:
        """The resumable state of this rank: position and the corrupt-sample counter."""
        return {**self.position.to_dict(), "corrupt_skipped": self.corrupt_skipped}

    def load_state_dict(self, state: dict) -> DataPosition:
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        self.position = DataPosition.from_dict(state)
        return self.position
