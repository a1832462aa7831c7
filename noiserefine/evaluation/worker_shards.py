"""Sharing a store's shard windows between worker processes (``--worker I/K``), and counting what is missing."""

from __future__ import annotations

from .store import ShardStore


def worker_windows(windows: list[tuple[int, int]], worker: int, num_workers: int) -> list[tuple[int, int]]:
    """The windows worker ``I`` of ``K`` samples: every K-th from the I-th (all of them for one worker)."""
    return [window for k, window in enumerate(windows) if k % num_workers == worker]


def missing_samples(store: ShardStore, windows: list[tuple[int, int]]) -> int:
    """How many samples of ``windows`` have no shard in ``store`` yet."""
    return sum(b - a for a, b in windows if not store.has(a, b))
