"""The FID reference's Inception statistics (mu, sigma): read from a statistics file, or computed from a
folder of real images in resumable shards (the ``reference`` store, shared between workers), kept as
``stats.npz`` in that store once every shard is there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path
from .protocols import Protocol, load_reference_image, load_statistics
from .scores import feature_statistics
from .store import ShardStore, shard_windows
from .worker_shards import missing_samples, worker_windows


def reference_store(store_root: Path, identity: dict) -> ShardStore:
    return ShardStore(store_root, "reference", identity)


def reference_windows(protocol: Protocol, shard_size: int) -> list[tuple[int, int]]:
    return shard_windows(len(protocol.reference_files), shard_size)


def needs_reference_features(protocol: Protocol, identity: dict | None, store_root: Path) -> bool:
    """Whether the reference is a folder of images whose statistics are not computed yet."""
    return identity is not None and protocol.reference_files is not None and \
        not (reference_store(store_root, identity).directory / "stats.npz").is_file()


def reference_statistics(protocol: Protocol, identity: dict | None, store_root: Path, *, inception,
                         resolution: int, shard_size: int, batch_size: int, worker: tuple[int, int],
                         bar) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
    """``((mu, sigma), False)``; ``(None, False)`` without a reference (``identity`` None); ``(None, True)``
    while other workers' reference shards are missing (this worker's are computed first)."""
    if identity is None:
        return None, False
    if protocol.reference_files is None:
        return load_statistics(protocol.reference_path, inception.num_features), False
    store = reference_store(store_root, identity)
    stats_path = store.directory / "stats.npz"
    if stats_path.is_file():
        return load_statistics(stats_path, inception.num_features, key="the reference store"), False
    files = protocol.reference_files
    windows = reference_windows(protocol, shard_size)
    bar.set_description("reference")
    with _thread_pool() as pool:
        for start, stop in worker_windows(windows, *worker):
            if store.has(start, stop):
                continue
            pools = []
            for begin in range(start, stop, batch_size):
                chunk = files[begin:min(begin + batch_size, stop)]
                images = torch.stack(list(pool.map(lambda p: load_reference_image(p, resolution), chunk)))
                pools.append(inception(images)["pool"])
            ids = np.arange(start, stop, dtype=np.int64)
            store.write(start, stop, {"sample_ids": ids, "seeds": ids, "inception_pool": np.concatenate(pools)})
            bar.update(stop - start)
    if missing_samples(store, windows):
        return None, True
    pool_features = store.read_all(windows, None)["inception_pool"]
    mu, sigma = feature_statistics(pool_features)
    with atomic_path(stats_path, durable=True) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, mu=mu, sigma=sigma, num_images=np.int64(len(files)))
    return (mu, sigma), False


@contextlib.contextmanager
def _thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes with the GIL released
        yield pool
