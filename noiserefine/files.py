"""Atomic file writes: write to a temp name in the same directory, then ``os.replace``.

A crash never leaves a truncated file under the final name (readers see the old
file or the new one), which is what makes every command safe to re-run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temp path ``.<name>.<pid>-<random>.tmp`` next to ``path``; on success it replaces
    ``path``, on error it is removed. ``durable``: fsync the file before the rename and the
    directory after it, so the new file also survives a machine crash (shards, manifests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name, created by the caller (not mkstemp: that makes it 0600, unreadable to the
    # other users of a shared cache); pid + random: no two writers ever share one
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            with contextlib.suppress(OSError):  # best effort: not every filesystem syncs directories
                _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
