"""A deterministic plan of ``(sample_id, seed, prompt, source)`` split into fixed-size shards.

Sample ``i`` draws its source (by weight) and its prompt from a hash of
``(base_seed, i)``, and its seed from ``noise.sample_seed(base_seed, i)``. So
shard ``k`` always holds the same samples whatever the number of workers, and a
larger ``num_samples`` only appends samples (the last partial shard grows, under a new
file name: a partial shard's name carries its sample count).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..noise import sample_seed
from ..shards import planned_shard_name
from .prompts import PromptStats, load_prompt_source


@dataclass(frozen=True)
class PlannedSample:
    sample_id: int
    seed: int
    prompt: str
    source: str


@dataclass(frozen=True)
class PromptSource:
    kind: str
    prompts: tuple[str, ...]
    weight: float
    stats: PromptStats


def load_sources(data_cfg) -> list[PromptSource]:
    """Read every configured prompt source once (normalised, de-duplicated, capped)."""
    sources = []
    for index, source in enumerate(data_cfg.sources):
        prompts, stats = load_prompt_source(source.kind, source.path or None, dedup=data_cfg.dedup,
                                            max_chars=data_cfg.max_prompt_chars)
        if not prompts:
            raise ValueError(f"data.sources.{index} ({source.kind}: {source.path or '-'}) has no prompts "
                             f"left after normalisation ({stats})")
        sources.append(PromptSource(source.kind, tuple(prompts), float(source.weight), stats))
    return sources


def _uniforms(base_seed: int, sample_id: int) -> tuple[float, int]:
    digest = hashlib.sha256(f"noiserefine-plan:{base_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64, int.from_bytes(digest[8:16], "little")


class Plan:
    """The samples of a teacher cache, addressable by shard index."""

    def __init__(self, sources: list[PromptSource], num_samples: int, shard_size: int, base_seed: int):
        if num_samples < 1 or shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {num_samples}, {shard_size}")
        self.sources = sources
        self.num_samples = num_samples
        self.shard_size = shard_size
        self.base_seed = base_seed
        total = sum(s.weight for s in sources)
        cumulative, running = [], 0.0
        for source in sources:
            running += source.weight / total
            cumulative.append(running)
        self._cumulative = cumulative

    @classmethod
    def from_config(cls, data_cfg) -> "Plan":
        return cls(load_sources(data_cfg), data_cfg.num_samples, data_cfg.shard_size, data_cfg.base_seed)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def sample(self, sample_id: int) -> PlannedSample:
        u, r = _uniforms(self.base_seed, sample_id)
        index = next((i for i, c in enumerate(self._cumulative) if u < c), len(self.sources) - 1)
        source = self.sources[index]
        prompt = source.prompts[r % len(source.prompts)]
        return PlannedSample(sample_id, sample_seed(self.base_seed, sample_id), prompt, source.kind)

    def shard_sample_ids(self, shard_index: int) -> range:
        if not 0 <= shard_index < self.num_shards:
            raise ValueError(f"shard index {shard_index} outside the plan's {self.num_shards} shards")
        start = shard_index * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))

    def shard_name(self, shard_index: int) -> str:
        """``shard-000003.tar``, or ``shard-000003-n8.tar`` if the shard is partial (see ``shards.shard_name``)."""
        return planned_shard_name(shard_index, len(self.shard_sample_ids(shard_index)), self.shard_size)

    def shard(self, shard_index: int) -> list[PlannedSample]:
        return [self.sample(i) for i in self.shard_sample_ids(shard_index)]
