"""A local (or NFS) directory as a store: files published by temp name + fsync + ``os.replace``; the job lock and
the manifest lock are ``fcntl.flock`` (``locks.py``), not the conditional writes of a versioned store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..files import atomic_path
from .base import Store
from .locks import cache_lock, manifest_lock


class LocalStore(Store):
    def __init__(self, root: Path):
        self.location = Path(root)

    def size(self, name: str) -> int | None:
        path = self.location / name
        return path.stat().st_size if path.is_file() else None

    def names(self) -> list[str]:
        if not self.location.is_dir():
            return []
        return sorted(p.name for p in self.location.iterdir())

    def sizes(self) -> dict[str, int]:
        if not self.location.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.location.iterdir() if p.is_file()}

    def is_dir_or_missing(self) -> bool:
        return not self.location.exists() or self.location.is_dir()

    def read_bytes(self, name: str) -> bytes:
        return (self.location / name).read_bytes()

    def read_range(self, name: str, start: int, end: int) -> bytes:
        with open(self.location / name, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    @contextlib.contextmanager
    def publish(self, name: str, exclusive: bool = False) -> Iterator[Path]:
        with atomic_path(self.location / name, durable=True, exclusive=exclusive) as tmp:
            yield tmp

    def delete(self, name: str) -> None:
        (self.location / name).unlink(missing_ok=True)

    def move(self, name: str, new_name: str) -> None:
        os.rename(self.location / name, self.location / new_name)

    def make(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)

    def job_lock(self, ttl_s: float | None = None):
        return cache_lock(self.location)

    def read_modify_write(self, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Under ``.manifest.lock`` (flock): read ``name`` (None if absent), publish ``change(old)`` unless None."""
        with manifest_lock(self.location):
            path = self.location / name
            try:
                with open(path, "rb") as handle:  # one open, one read (a rename in between: old or new file)
                    old = handle.read()
            except FileNotFoundError:
                old = None
            new = change(old)
            if new is not None:
                self.write_bytes(name, new)
