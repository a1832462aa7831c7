"""The world-size-independent training state: ``elastic.safetensors`` next to each DeepSpeed checkpoint.

It holds the trainable (LoRA) weights and their AdamW state by parameter name, so a run checkpointed
on ``W`` ranks can resume on ``W'`` (``checkpoint.py`` writes and loads it; ``distributed.py`` gathers
and fills the optimizer state).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_path
from ..refiner import Refiner

ELASTIC_FILE = "elastic.safetensors"


def trainable_names(refiner: Refiner) -> list[str]:
    return sorted(n for n, p in refiner.named_parameters() if p.requires_grad)


def trainable_parameters(refiner: Refiner) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(((n, p) for n, p in refiner.named_parameters() if p.requires_grad), key=lambda item: item[0])


def save_elastic(path: Path, tensors: dict, meta: dict) -> None:
    """``elastic.safetensors``: the world-size-independent training state (metadata values as JSON)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "noiserefine-elastic-1",
                                               **{k: json.dumps(v) for k, v in meta.items()}})


def load_elastic(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != "noiserefine-elastic-1":
            raise ValueError(f"{path}: not an elastic training state of this trainer")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, {k: json.loads(v) for k, v in meta.items() if k != "format"}
