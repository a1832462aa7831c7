"""Resumable per-sample results: a keyed directory of .npz shards, each published by atomic rename.

A store directory is ``<root>/<name>-<key[:16]>/`` where the key is the sha256 of an identity record
(what determines the stored samples: model, sampler, guidance, protocol, feature networks; see
``noiserefine.evaluate``). ``store.json`` holds the record; a directory whose record differs is never
used. Shard files are ``shard-<start>-<stop>.npz`` for samples ``start .. stop-1`` (numpy arrays only,
read with ``allow_pickle=False``), written to a temp name and renamed (``files.atomic_path``, fsynced),
so a killed run leaves complete shards and at most a stray temp file, which is ignored. Every shard holds
``sample_ids`` and ``seeds`` and is checked against the expected ones when read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_text_atomic

RECORD_FILE = "store.json"
_SHARD = re.compile(r"shard-(\d{8})-(\d{8})\.npz")
_STORE_DIRECTORY = re.compile(r"[A-Za-z0-9_.-]+-[0-9a-f]{16}")


def record_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def shard_windows(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(0, S), (S, 2S), ..., (kS, N)]``: the windows of a run (a longer run shares its whole windows)."""
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def check_store_root(root: str | Path) -> None:
    """Refuse a store root (``--store``) that is not positively ours: it must be new, empty, or hold only keyed
    store directories (``<name>-<key[:16]>/`` with a ``store.json``, or still empty while another worker creates
    it), so a user's folder given as ``--store`` gets nothing written into it."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"--store {root} exists and is not a directory")
    foreign = sorted(entry.name for entry in root.iterdir()
                     if not (entry.is_dir() and _STORE_DIRECTORY.fullmatch(entry.name)
                             and ((entry / RECORD_FILE).is_file() or not any(entry.iterdir()))))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--store {root} is not an evaluation store folder (it holds {shown}, which are not "
                         f"keyed store directories with a {RECORD_FILE}); refusing to write into it. Give a new or "
                         "empty directory, or one an evaluation made")


class ShardStore:
    """One keyed directory of shards (see the module docstring)."""

    def __init__(self, root: str | Path, name: str, record: dict):
        self.key = record_key(record)
        self.record = {"name": name, "key": self.key, "identity": record}
        self.directory = Path(root) / f"{name}-{self.key[:16]}"
        self.images = self.directory / "images"
        stored = self.directory / RECORD_FILE
        if stored.is_file():
            try:
                existing = json.loads(stored.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{stored}: unreadable store record ({error}); not a store of this evaluation") from None
            if existing.get("key") != self.key:
                raise ValueError(f"{self.directory} holds results of another configuration (key "
                                 f"{existing.get('key')!r}, expected {self.key!r}); refusing to mix them")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stored, json.dumps(self.record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    @staticmethod
    def shard_name(start: int, stop: int) -> str:
        return f"shard-{start:08d}-{stop:08d}.npz"

    def has(self, start: int, stop: int) -> bool:
        return (self.directory / self.shard_name(start, stop)).is_file()

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> Path:
        """Publish one shard atomically; ``arrays`` must hold ``sample_ids`` and ``seeds`` of the window."""
        ids = np.asarray(arrays["sample_ids"])
        if ids.tolist() != list(range(start, stop)):
            raise ValueError(f"shard {start}..{stop}: sample_ids {ids[:3].tolist()}... do not match the window")
        _check_lengths(arrays, start, stop, self.shard_name(start, stop))
        bad = [k for k, v in arrays.items() if np.asarray(v).dtype == object]
        if bad:
            raise ValueError(f"shard arrays {bad} are object arrays (pickle); store numbers or strings")
        path = self.directory / self.shard_name(start, stop)
        with atomic_path(path, durable=True) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
        return path

    def read(self, start: int, stop: int, seeds: list[int] | None) -> dict[str, np.ndarray]:
        """One shard, checked: its ``sample_ids`` must be the window and its ``seeds`` (unless None) ``seeds``."""
        path = self.directory / self.shard_name(start, stop)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as error:
            raise ValueError(f"{path}: unreadable shard ({type(error).__name__}: {error}); delete it to "
                             "re-sample its window") from None
        if arrays.get("sample_ids", np.array([])).tolist() != list(range(start, stop)) \
                or (seeds is not None and arrays.get("seeds", np.array([])).tolist() != list(seeds)):
            raise ValueError(f"{path}: its sample ids or seeds are not the protocol's for samples {start}..{stop - 1}")
        _check_lengths(arrays, start, stop, path)
        return arrays

    def problem(self, start: int, stop: int, seeds: list[int] | None) -> str | None:
        """What is wrong with a present shard (unreadable, ids, seeds or an array's length), or None."""
        try:
            self.read(start, stop, seeds)
        except ValueError as error:
            return str(error)
        return None

    def set_aside(self, start: int, stop: int) -> None:
        """Rename a bad shard to ``<shard>.bad-<ns>`` (kept for inspection, no longer counted): re-sampled."""
        path = self.directory / self.shard_name(start, stop)
        with contextlib.suppress(FileNotFoundError):  # another worker set it aside first
            os.replace(path, path.with_name(f"{path.name}.bad-{time.time_ns()}"))

    def read_all(self, windows: list[tuple[int, int]], seeds: list[int] | None) -> dict[str, np.ndarray]:
        """Every window's arrays concatenated in sample order (all must be present)."""
        missing = [self.shard_name(a, b) for a, b in windows if not self.has(a, b)]
        if missing:
            raise FileNotFoundError(f"{self.directory}: missing shards {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        parts = [self.read(a, b, None if seeds is None else seeds[a:b]) for a, b in windows]
        first = {name: array.shape[1:] for name, array in parts[0].items()}
        for (a, b), part in zip(windows, parts):
            shapes = {name: array.shape[1:] for name, array in part.items()}
            if shapes != first:
                differing = sorted(k for k in set(first) | set(shapes) if first.get(k) != shapes.get(k))
                raise ValueError(f"{self.directory / self.shard_name(a, b)}: its arrays {differing} have shapes "
                                 f"{[part[k].shape if k in part else None for k in differing]}, the first shard's "
                                 f"{[parts[0][k].shape if k in parts[0] else None for k in differing]}; delete it "
                                 "to re-sample its window")
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _check_lengths(arrays: dict[str, np.ndarray], start: int, stop: int, shard) -> None:
    """Every array of a shard holds one row per sample of its window (a short one would skew the metrics)."""
    for name, array in arrays.items():
        rows = np.shape(array)[0] if np.ndim(array) else None
        if rows != stop - start:
            raise ValueError(f"{shard}: array {name!r} has {rows} rows for the window's {stop - start} samples "
                             f"({start}..{stop - 1})")
