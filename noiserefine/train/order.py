"""The global sample order of a teacher cache, the same for every number of ranks.

Like mosaic streaming's elastic determinism:
epoch ``e`` permutes the shard list with a generator seeded by ``(train.seed, e)``; the
samples keep their order inside a shard; the epochs are concatenated into one infinite
global stream of sample *positions* (position ``p`` is sample ``p mod N`` of epoch ``p // N``,
``N`` = samples per epoch, counted from the manifest rows). Global batch ``b`` is positions
``[b*G, (b+1)*G)`` with ``G = train.global_batch_size`` (a batch may straddle two epochs: no
sample is dropped and every batch is full); rank ``r`` of ``W`` takes the contiguous slice
``[b*G + r*G/W, b*G + (r+1)*G/W)``. So every rank runs one step per global batch (equal step
counts by construction, no collective waits on a rank that ran out of data), the ranks'
samples are disjoint, and the sequence of global batches is the same for every ``W`` that
divides ``G``: a run checkpointed on ``W`` ranks continues the same sequence on ``W'``.

Filtered by score (``data.min_score``): a shard's span counts only its kept rows (``kept``: the shard
rows whose score passes, in shard order), so positions, epochs and batches are those of the kept
samples alone; the reader maps a kept position back to its shard row (:meth:`GlobalOrder.rows`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def epoch_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of ``epoch``: a permutation seeded by ``(seed, epoch)`` only."""
    digest = hashlib.sha256(f"noiserefine-shards:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(num_shards, generator=generator).tolist()


def allowed_world_sizes(global_batch_size: int) -> list[int]:
    """The rank counts that split ``global_batch_size`` evenly (its divisors)."""
    return [w for w in range(1, global_batch_size + 1) if global_batch_size % w == 0]


def per_rank_batch(global_batch_size: int, world_size: int) -> int:
    """``global / world``; ``ValueError`` naming the allowed rank counts if it does not divide."""
    if global_batch_size < 1 or world_size < 1:
        raise ValueError(f"global batch {global_batch_size} and world size {world_size} must be >= 1")
    if global_batch_size % world_size:
        allowed = allowed_world_sizes(global_batch_size)
        raise ValueError(f"train.global_batch_size={global_batch_size} cannot be split evenly over {world_size} "
                         f"ranks; allowed rank counts: {allowed} (or a global batch size divisible by "
                         f"{world_size})")
    return global_batch_size // world_size


@dataclass(frozen=True)
class ShardSpan:
    """Shard ``name`` holds global positions ``[start, start + count)`` (one epoch's pass over it)."""

    name: str
    start: int
    count: int


class GlobalOrder:
    """The world-size-independent sample order of a cache (see the module docstring)."""

    def __init__(self, names: list[str], counts: dict[str, int], seed: int, global_batch_size: int,
                 kept: dict[str, tuple[int, ...]] | None = None):
        """``kept`` None: every row of every shard; else each shard's kept rows (its count is their number)."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.kept = None if kept is None else {name: tuple(kept[name]) for name in names}
        if self.kept is not None:
            counts = {name: len(rows) for name, rows in self.kept.items()}
        self.names, self.counts, self.seed = list(names), dict(counts), int(seed)
        self.global_batch_size = int(global_batch_size)
        self.samples_per_epoch = sum(self.counts[name] for name in self.names)
        if self.samples_per_epoch < 1:
            raise ValueError("the cache holds no samples")

    def epoch_spans(self, epoch: int) -> list[ShardSpan]:
        spans, position = [], epoch * self.samples_per_epoch
        for index in epoch_permutation(len(self.names), self.seed, epoch):
            name = self.names[index]
            spans.append(ShardSpan(name, position, self.counts[name]))
            position += self.counts[name]
        return spans

    def rank_slice(self, batch: int, rank: int, world_size: int) -> tuple[int, int]:
        """Global positions ``[lo, hi)`` of ``rank``'s part of global batch ``batch``."""
        size = per_rank_batch(self.global_batch_size, world_size)
        lo = batch * self.global_batch_size + rank * size
        return lo, lo + size

    def wanted(self, span: ShardSpan, rank: int, world_size: int, first: int) -> list[int]:
        """Indices inside ``span``'s shard of the positions ``>= first`` that fall in ``rank``'s slices."""
        size = per_rank_batch(self.global_batch_size, world_size)
        lo, hi = rank * size, (rank + 1) * size
        return [i for i in range(max(first - span.start, 0), span.count)
                if lo <= (span.start + i) % self.global_batch_size < hi]

    def rows(self, name: str, indices: list[int]) -> tuple[int, ...]:
        """The shard rows of the kept samples at ``indices`` of shard ``name`` (themselves when unfiltered)."""
        return tuple(indices) if self.kept is None else tuple(self.kept[name][i] for i in indices)

    def epoch_of(self, position: int) -> int:
        return position // self.samples_per_epoch
