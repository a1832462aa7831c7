"""Atomic file writes: write to a temp name in the same directory, then ``os.replace``.

A crash never leaves a truncated file under the final name (readers see the old
file or the new one), which is what makes every command safe to re-run. Also: the check that an output
folder is the command's own (:func:`refuse_foreign_directory`) and the CSV log rows (:func:`append_csv`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which
    races with other threads creating files); falls back to set-and-restore off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` give a new file or directory: ``0o666`` / ``0o777`` less the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def apply_default_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it (no links followed) the umask's default modes.

    For trees written by libraries that pick their own: safetensors >= 0.8 writes 0600 files
    (a tempfile renamed into place), ``tempfile.mkdtemp`` makes 0700 directories.
    """
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, default_mode(path.is_dir()))


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temp path ``.<name>.<pid>-<random>.tmp`` next to ``path``; on success it replaces
    ``path``, on error it is removed. ``durable``: fsync the file before the rename and the
    directory after it, so the new file also survives a machine crash (shards, manifests).
    ``exclusive``: never replace an existing ``path`` (a link, which fails if it exists, instead of a
    rename): one already there must hold the same bytes (a deterministic file written by another job or
    an earlier attempt), else ``FileExistsError`` naming it.
    The new file gets the umask's default mode whatever wrote it (safetensors writes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name, created by the caller (not mkstemp: that makes it 0600, unreadable to the
    # other users of a shared cache); pid + random: no two writers ever share one
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        if tmp.is_file() and not tmp.is_symlink():
            os.chmod(tmp, default_mode())
        if durable:
            _fsync(tmp)
        if exclusive:
            _link_unless_present(tmp, path)
        else:
            os.replace(tmp, path)
        if durable:
            with contextlib.suppress(OSError):  # best effort: not every filesystem syncs directories
                _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _link_unless_present(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # fails if ``path`` exists: never replaces it
        return
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a rename (a local directory has one writer, its flock)
        if not path.exists():
            os.replace(tmp, path)
            return
    if not same_bytes(tmp, path.read_bytes()):
        raise FileExistsError(f"{path} exists with other bytes; a published file is never replaced")


def same_bytes(path: Path, data: bytes) -> bool:
    """Whether the file ``path`` holds exactly ``data``."""
    return path.stat().st_size == len(data) and path.read_bytes() == data


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def refuse_foreign_directory(directory: str | Path, marker: str, what: str, also_ours: tuple[str, ...] = ()) -> None:
    """Refuse (``ValueError``) to write into ``directory`` unless it is positively ours: new, empty, or holding
    ``marker`` (the file the command writes there before anything else) or one of ``also_ours`` (what older
    versions of the command left). Like the teacher cache (``targets.cache``), a user's folder given as an
    output (``--out``, ``--run-dir``) is refused before a single file in it is created or replaced."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; {what} must be a directory")
    entries = sorted(path.name for path in directory.iterdir())
    if not entries or marker in entries or any(name in entries for name in also_ours):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ValueError(f"{directory} is not empty and holds no {marker}: it is not {what}; refusing to write into it "
                     f"(it holds {shown}). Give a new or empty directory")


def append_csv(path: Path, fields: tuple[str, ...], row: dict) -> None:
    """Append ``row`` (its ``fields``) to a CSV log, writing the header first if the file is new or empty."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow({f: row[f] for f in fields})
