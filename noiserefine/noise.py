"""Initial noise ``x_T`` from a sample's own seed, and its fingerprint.

Each sample's noise comes from a CPU ``torch.Generator`` seeded with that
sample's seed, drawn in float32, then moved and cast. So it never depends on
the batch it is in, the worker, the rank or the device (CUDA generators give
different numbers for the same seed). The fingerprint lets the trainer check
that the noise it regenerates is the one the teacher target was made from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

MAX_SEED = 2**63 - 1


def sample_seed(base_seed: int, sample_id: int) -> int:
    """Seed of sample ``sample_id``: a hash of ``(base_seed, sample_id)``, independent of any worker."""
    if sample_id < 0:
        raise ValueError(f"sample_id must be >= 0, got {sample_id}")
    digest = hashlib.sha256(f"noiserefine:{base_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def noise_from_seed(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """One float32 CPU noise tensor of ``shape`` drawn from a generator seeded with ``seed``."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {seed}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack of per-seed noises, shape ``(len(seeds), *shape)``, then moved to ``device``/``dtype``."""
    noises = torch.stack([noise_from_seed(int(seed), shape) for seed in seeds])
    return noises.to(device=device, dtype=dtype)


def fingerprint(noise: torch.Tensor) -> str:
    """16 hex chars of sha256 over the float32 little-endian bytes of one sample's noise."""
    array = noise.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
