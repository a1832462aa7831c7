"""Quality scorers of teacher targets: the teacher job scores each target, the trainer filters on the score.

A scorer is a :class:`Scorer`: ``score(images, prompts)`` gives one finite float per decoded target
(images in [0, 1], ``(B, C, H, W)``, as ``Backend.decode`` returns them; higher = better). It is
registered once in :data:`SCORERS` (``scorer.kind`` -> ``"module:Class"``, imported on first use, so
this module imports nothing heavy); the class is built by ``Class.from_config(scorer_cfg, device)``
from local files only. Adding one (PickScore, an OCR or a classifier's confidence) is one module
and one line here.

Where the score goes: the sample's ``.json`` (``score``) and its shard's manifest row (``scores``
and their statistics, ``shards.py``). Which scorer made a cache's scores, :func:`scorer_identity`
(kind and the sha256 of every weight file it reads), is pinned in the cache's ``teacher.yaml`` with
the other generation settings (``targets/cache.py``), not in the cache key: a score does not change
a target's bytes, so the teacher key, shard names and an unscored cache stay as they were, and a
cache is never a mix of two scorers (a job with another scorer, or none, is refused by name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

# scorer.kind -> "module:Class" (a Scorer with from_config(scorer_cfg, device))
SCORERS: dict[str, str] = {
    "aesthetic": "noiserefine.scoring.aesthetic:AestheticScorer",
    "digit_confidence": "noiserefine.digits.confidence:DigitConfidenceScorer",
}


class Scorer(Protocol):
    """Scores decoded teacher targets; see the module docstring."""

    def score(self, images: "torch.Tensor", prompts: list[str]) -> list[float]: ...


def scorer_names() -> tuple[str, ...]:
    return tuple(SCORERS)


def _weight_paths(scorer_cfg) -> dict[str, str]:
    """The local files a scorer of ``scorer_cfg`` reads, by config key (unset ones left out)."""
    return {key: getattr(scorer_cfg, key) for key in ("path", "clip_path") if getattr(scorer_cfg, key)}


def scorer_identity(scorer_cfg) -> dict | None:
    """``{"kind", "<key>_sha256": ...}`` of the configured scorer (a file's sha256, or a directory's
    ``tree_sha256``); None when no scorer is configured. ``FileNotFoundError`` naming a missing path."""
    from pathlib import Path

    from ..hashing import file_sha256, tree_sha256

    if not scorer_cfg.kind:
        return None
    if scorer_cfg.kind not in SCORERS:
        raise ValueError(f"scorer.kind {scorer_cfg.kind!r} is not a registered scorer; known: {list(SCORERS)}")
    identity = {"kind": scorer_cfg.kind}
    for key, value in _weight_paths(scorer_cfg).items():
        path = Path(value).expanduser()
        if path.is_dir():
            identity[f"{key}_sha256"] = tree_sha256(path)
        elif path.is_file():
            identity[f"{key}_sha256"] = file_sha256(path)
        else:
            raise FileNotFoundError(f"scorer.{key} {value!r} is neither a file nor a directory (a scorer is "
                                    "loaded from local files only)")
    return identity


def load_scorer(scorer_cfg, device="cpu") -> Scorer | None:
    """The scorer ``scorer.kind`` names, loaded from its local files; None when ``kind`` is empty."""
    if not scorer_cfg.kind:
        return None
    if scorer_cfg.kind not in SCORERS:
        raise ValueError(f"scorer.kind {scorer_cfg.kind!r} is not a registered scorer; known: {list(SCORERS)}")
    module, _, name = SCORERS[scorer_cfg.kind].partition(":")
    return getattr(importlib.import_module(module), name).from_config(scorer_cfg, device)
