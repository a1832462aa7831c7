"""What a teacher cache is: its identity record and key, by content rather than by spelling.

The key hashes exactly what determines the target bytes (up to floating-point
differences between devices):

- the model by content: the sha256 of every file under ``model.path`` that a loader
  may read (all regular files except hidden ones, ``*.md`` and ``*.yaml``/``*.yml``
  records), its dtype and backend; a random-weights model by its architecture;
- the teacher's sampler and guidance: the ``teacher`` section; for a guider named by its
  diffusers class, that class and its saved config (``guidance.guider_identity``) instead of
  the short forms' fields. The short forms ``cfg``/``cfg_pag`` hash their fields exactly as
  before guiders were configurable (they fix the class and every argument), so their caches keep their key;
- each prompt source by the sha256 of the prompts it yields after normalisation
  (kind, weight and content, not its path), and the plan (``shard_size``,
  ``base_seed``, ``dedup``, ``max_prompt_chars``, ``target_dtype``).

So moving a model directory or a prompt file keeps the cache, while retraining a
model in place or editing a prompt file makes a new one. ``model.device`` is not in
the key (where a teacher runs is not what it is); ``pipeline.batch_size`` changes
bits, not the teacher: it is pinned in ``teacher.yaml`` instead (see ``cache.py``).

File hashes are memoised across runs (``noiserefine/hashing.py``), so an SDXL directory
is read once per machine. Within a process the whole record is memoised too, but only
while every model and prompt file keeps the same stat signature.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..hashing import model_files, stat_signature, tree_sha256

_memo_in_process: dict[str, dict] = {}


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
        paths = [] if cfg.model.init == "random" else model_files(model_dir(cfg.model))
        for source in cfg.data.sources:
            if source.path:
                paths += (_parquet_files(source.path) if source.kind == "pickapic"
                          else [Path(source.path).expanduser()])
        return [stat_signature(path) for path in paths]
    except (OSError, ValueError):
        return None


def teacher_section(cfg) -> dict:
    """The teacher part of the record (see the module docstring)."""
    from omegaconf import OmegaConf

    from ..guidance import SHORT_FORMS, guider_identity, make_guider

    teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    teacher.pop("guider_args", None)  # empty for the short forms (make_guider refuses it there)
    if teacher["guidance"] in SHORT_FORMS:
        return teacher
    return {"guidance": teacher["guidance"], "num_steps": teacher["num_steps"],
            "guider": guider_identity(make_guider(cfg.teacher))}


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
        record = {"model": model_identity(cfg.model), "teacher": teacher_section(cfg),
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
