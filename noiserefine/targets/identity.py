"""What a teacher cache is: its identity record and key, by content rather than by spelling.

The key hashes exactly what determines the target bytes (up to floating-point
differences between devices):

- the model by content: the sha256 of every file under ``model.path`` that a loader
  may read (all regular files except hidden ones, ``*.md`` and ``*.yaml``/``*.yml``
  records), its dtype and backend; a random-weights model by its architecture;
- the teacher's sampler and guidance (the whole ``teacher`` section);
- each prompt source by the sha256 of the prompts it yields after normalisation
  (kind, weight and content, not its path), and the plan (``shard_size``,
  ``base_seed``, ``dedup``, ``max_prompt_chars``, ``target_dtype``).

So moving a model directory or a prompt file keeps the cache, while retraining a
model in place or editing a prompt file makes a new one. ``model.device`` is not in
the key (where a teacher runs is not what it is); ``pipeline.batch_size`` changes
bits, not the teacher: it is pinned in ``teacher.yaml`` instead (see ``cache.py``).

File hashes are memoised by (real path, size, mtime, ctime, inode) in
``$NOISEREFINE_HASH_CACHE`` (default ``~/.cache/noiserefine/file_hashes.json``), so an
SDXL directory is read once per machine, not once per run; ctime and inode catch a
same-size file written over the old one with its mtime restored (an archive with fixed
mtimes unpacked in place). Within a process the whole record is memoised too, but only
while every model and prompt file keeps the same stat signature.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..files import write_text_atomic

IGNORED_SUFFIXES = (".md", ".yaml", ".yml")
_memo_in_process: dict[str, dict] = {}


def _memo_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "noiserefine" / "file_hashes.json"
    return Path(os.environ.get("NOISEREFINE_HASH_CACHE", default)).expanduser()


def _load_memo() -> dict:
    try:
        memo = json.loads(_memo_path().read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache


def _signature(path: Path) -> str:
    stat = path.stat()
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"


def file_sha256(path: str | Path, memo: dict | None = None) -> str:
    """sha256 of a file's bytes; ``memo`` maps ``realpath|size|mtime_ns|ctime_ns|inode`` to earlier results."""
    path = Path(path)
    signature = _signature(path)
    if memo is not None and signature in memo:
        return memo[signature]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if memo is not None:
        memo[signature] = digest.hexdigest()
    return digest.hexdigest()


def _model_files(root: Path) -> list[Path]:
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
    files = _model_files(root)
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


def model_dir(model_cfg) -> Path:
    """The local directory of ``model.path``: the path itself, or a hub model id's cached snapshot."""
    path = Path(model_cfg.path).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model_cfg.path), revision=model_cfg.revision or None,
                                      local_files_only=True))
    except Exception:
        raise FileNotFoundError(f"model.path {model_cfg.path!r} is neither a local directory nor a model id "
                                "in the local Hugging Face cache (nothing is downloaded)") from None


def model_identity(model_cfg) -> dict:
    identity = {"backend": model_cfg.backend, "dtype": model_cfg.dtype, "init": model_cfg.init}
    if model_cfg.init == "random":
        identity["architecture"] = model_cfg.architecture
    else:
        identity["weights_sha256"] = tree_sha256(model_dir(model_cfg))
    return identity


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _inputs_signature(cfg) -> list[str] | None:
    """Stat signatures of the model's files and the prompt files: the in-process memo of a record is
    used only while none of them changed (a teacher retrained in place, a prompt file edited).
    None if some input cannot be listed (the record computation then raises the real error)."""
    from .prompts import _parquet_files

    try:
        paths = [] if cfg.model.init == "random" else _model_files(model_dir(cfg.model))
        for source in cfg.data.sources:
            if source.path:
                paths += (_parquet_files(source.path) if source.kind == "pickapic"
                          else [Path(source.path).expanduser()])
        return [_signature(path) for path in paths]
    except (OSError, ValueError):
        return None


def teacher_record(cfg) -> dict:
    """The identity of ``cfg``'s teacher cache (stored as ``teacher.yaml``), with its key."""
    from omegaconf import OmegaConf

    from .plan import load_sources

    container = OmegaConf.to_container(cfg, resolve=True)
    inputs = _inputs_signature(cfg)
    signature = json.dumps({**{k: container[k] for k in ("model", "teacher", "data")}, "inputs": inputs},
                           sort_keys=True)
    if inputs is None or signature not in _memo_in_process:
        data = cfg.data
        sources = [{"kind": s.kind, "weight": s.weight, "prompts_sha256": prompts_sha256(s.prompts)}
                   for s in load_sources(data)]
        record = {"model": model_identity(cfg.model), "teacher": container["teacher"],
                  "data": {"sources": sources, "shard_size": data.shard_size, "base_seed": data.base_seed,
                           "dedup": data.dedup, "max_prompt_chars": data.max_prompt_chars,
                           "target_dtype": data.target_dtype}}
        blob = json.dumps(record, sort_keys=True).encode()
        _memo_in_process[signature] = {"teacher_key": f"{cfg.model.backend}-{hashlib.sha256(blob).hexdigest()[:12]}",
                                       **record}
    return json.loads(json.dumps(_memo_in_process[signature]))


def teacher_key(cfg) -> str:
    """``<backend>-<12 hex>``: the teacher cache's directory name."""
    return teacher_record(cfg)["teacher_key"]
