"""Content hashes of files and model directories, memoised across runs.

File hashes are memoised by (real path, size, mtime, ctime, inode) in
``$NOISEREFINE_HASH_CACHE`` (default ``~/.cache/noiserefine/file_hashes.json``), so an
SDXL directory is read once per machine, not once per run; ctime and inode catch a
same-size file written over the old one with its mtime restored (an archive with fixed
mtimes unpacked in place). The memo is only a cache: a missing, damaged or unwritable
one costs re-hashing, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import write_text_atomic

IGNORED_SUFFIXES = (".md", ".yaml", ".yml")


def _memo_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "noiserefine" / "file_hashes.json"
    return Path(os.environ.get("NOISEREFINE_HASH_CACHE", default)).expanduser()


def _load_memo() -> dict:
    try:
        memo = json.loads(_memo_path().read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache


def stat_signature(path: Path) -> str:
    """What identifies a file's version without reading it: real path, size, mtime, ctime, inode."""
    stat = path.stat()
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def file_sha256(path: str | Path, memo: dict | None = None) -> str:
    """sha256 of a file's bytes; ``memo`` maps ``realpath|size|mtime_ns|ctime_ns|inode`` to earlier results."""
    path = Path(path)
    signature = stat_signature(path)
    if memo is not None and signature in memo:
        return memo[signature]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if memo is not None:
        memo[signature] = digest.hexdigest()
    return digest.hexdigest()


def model_files(root: Path) -> list[Path]:
    """The files of a model that a loader may read (see the module docstring), sorted."""
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    return [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.suffix.lower() not in IGNORED_SUFFIXES)


def tree_sha256(root: str | Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of the files under ``root``."""
    root = Path(root).expanduser()
    files = model_files(root)
    if not files:
        raise ValueError(f"{root} holds no model files")
    memo = _load_memo()
    before = dict(memo)
    listing = [(str(p.relative_to(root)) if p != root else p.name, file_sha256(p, memo)) for p in files]
    if memo != before:
        try:
            write_text_atomic(_memo_path(), json.dumps(memo, sort_keys=True))
        except OSError:
            pass  # an unwritable cache directory only costs re-hashing next time
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
