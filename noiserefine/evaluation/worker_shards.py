"""Sharing a store's shard windows between worker processes (``--worker I/K``), counting what is missing, and
setting bad shards aside."""

from __future__ import annotations

import warnings

from .store import ShardStore


def worker_windows(windows: list[tuple[int, int]], worker: int, num_workers: int) -> list[tuple[int, int]]:
    """The windows worker ``I`` of ``K`` samples: every K-th from the I-th (all of them for one worker)."""
    return [window for k, window in enumerate(windows) if k % num_workers == worker]


def missing_samples(store: ShardStore, windows: list[tuple[int, int]]) -> int:
    """How many samples of ``windows`` have no shard in ``store`` yet."""
    return sum(b - a for a, b in windows if not store.has(a, b))


def set_aside_bad_shards(store: ShardStore, windows: list[tuple[int, int]], seeds: list[int] | None) -> int:
    """Check every present shard of ``windows`` (ids, seeds, each array's length against its window); a bad one
    is named in a warning and set aside, so it is sampled again. Returns how many were set aside."""
    bad = 0
    for start, stop in windows:
        if not store.has(start, stop):
            continue
        problem = store.problem(start, stop, None if seeds is None else seeds[start:stop])
        if problem is not None:
            warnings.warn(f"{problem}; set aside, its window is sampled again", stacklevel=2)
            store.set_aside(start, stop)
            bad += 1
    return bad
