"""A tiny SD pipeline and a refiner with non-zero LoRA weights (configs/sd21.yaml's classes), for the fault tests
of the commands that use a refiner (evaluate, sample, pipelines)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import build_tiny_sd

from noiserefine.config import load_config

REPO = Path(__file__).resolve().parents[2]


def tiny_sd_config(root: Path, **extra):
    """configs/sd21.yaml on ``root/sd`` (CPU, float32, 2 steps) with the evaluation's tiny settings."""
    overrides = {"model.path": root / "sd", "model.device": "cpu", "model.dtype": "float32",
                 "teacher.num_steps": 2, "student.num_steps": 2, "benchmark.num_steps": 0,
                 "data.sources": "[{kind: text, path: prompts.txt}]",
                 "benchmark.captions": root / "captions_val2014.json", "benchmark.reference": root / "val2014",
                 "benchmark.num_samples": 4, "benchmark.shard_size": 2, "benchmark.batch_size": 2,
                 "benchmark.feature_batch_size": 4, "benchmark.grid_columns": 2, "benchmark.distilled_path": "''",
                 "benchmark.inception_path": "''", "eval.clip_path": "''", "eval.pickscore_path": "''", **extra}
    return load_config(REPO / "configs" / "sd21.yaml", [f"{k}={v}" for k, v in overrides.items()])


def save_tiny_refiner(cfg, directory: Path, seed: int) -> Path:
    """A refiner on ``cfg.model`` with random LoRA weights (seeded), saved to ``directory``."""
    from noiserefine.backends import load_backend
    from noiserefine.refiner import Refiner, save_refiner

    refiner = Refiner(load_backend(cfg.model), cfg.refiner)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return save_refiner(refiner, directory, cfg)


def tiny_sd_and_refiner(root: Path, **extra):
    """``(cfg, refiner directory)``: the tiny SD pipeline under ``root/sd`` and a refiner under ``root/refiner``."""
    build_tiny_sd(root / "sd", seed=0)
    cfg = tiny_sd_config(root, **extra)
    return cfg, save_tiny_refiner(cfg, root / "refiner", seed=0)
