"""Evaluation on a fixed held-out seed set: the same seeds and prompts for every row.

Held-out seeds are ``sample_seed(data.base_seed, eval.seed_offset + i)``: sample
ids the teacher cache never reaches. Prompts cycle over the ten digits, so
conditional accuracy is measured against the prompted digit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends.base import Backend
from .metrics import save_image_grid
from .noise import noise_from_seeds, sample_seed
from .prompts import DIGIT_WORDS
from .sampling import Guidance, UNGUIDED, rollout


@dataclass(frozen=True)
class EvalSet:
    seeds: list[int]
    prompts: list[str]
    labels: torch.Tensor  # prompted digit


def eval_set(cfg) -> EvalSet:
    count = cfg.eval.num_samples
    seeds = [sample_seed(cfg.data.base_seed, cfg.eval.seed_offset + i) for i in range(count)]
    labels = torch.arange(count) % 10
    prompts = [f"a handwritten {DIGIT_WORDS[int(d)]}" for d in labels]
    return EvalSet(seeds, prompts, labels)


@dataclass
class Row:
    name: str
    nfe: int  # network evaluations per sample
    latents: torch.Tensor
    seconds_per_sample: float
    metrics: dict = field(default_factory=dict)


def sample_row(name: str, backend: Backend, evals: EvalSet, num_steps: int, *,
               guidance: Guidance = UNGUIDED, batch_size: int = 250,
               prepare_noise: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None,
               extra_nfe: int = 0) -> Row:
    """Roll out every eval seed; ``prepare_noise(noise, prompts)`` refines the noise first (timed too)."""
    outputs = []
    started = time.perf_counter()
    for start in range(0, len(evals.seeds), batch_size):
        stop = min(start + batch_size, len(evals.seeds))
        noise = noise_from_seeds(evals.seeds[start:stop], backend.latent_shape, backend.device, backend.dtype)
        prompts = evals.prompts[start:stop]
        cond = backend.encode_prompts(prompts)
        with torch.no_grad():
            if prepare_noise is not None:
                noise = prepare_noise(noise, prompts).to(device=backend.device, dtype=backend.dtype)
            outputs.append(rollout(backend, noise, cond, num_steps, guidance).float().cpu())
    seconds = (time.perf_counter() - started) / len(evals.seeds)
    return Row(name, guidance.num_branches * num_steps + extra_nfe, torch.cat(outputs), seconds)


def score_rows(rows: list[Row], backend: Backend, evals: EvalSet, digit_metrics) -> None:
    """Fill each row's metrics (FID, Inception-style score, accuracy) in place."""
    for row in rows:
        images = backend.decode(row.latents)
        row.metrics = {**digit_metrics(images, evals.labels), "nfe": row.nfe,
                       "seconds_per_sample": row.seconds_per_sample}


def gap_closed(fid_unguided: float, fid_method: float, fid_guided: float) -> float:
    """(FID_unguided - FID_method) / (FID_unguided - FID_guided): 1 = matches guided, >1 = beats it."""
    denominator = fid_unguided - fid_guided
    return float("nan") if denominator == 0 else (fid_unguided - fid_method) / denominator


def markdown_table(rows: list[Row]) -> str:
    """Scored rows as a Markdown table, with a gap column if their metrics carry ``gap_closed``."""
    with_gap = any("gap_closed" in row.metrics for row in rows)
    header = "| row | NFE | FID | IS | accuracy | s/sample |" + (" gap closed |" if with_gap else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        m = row.metrics
        line = (f"| {row.name} | {row.nfe} | {m['fid']:.2f} | {m['inception_score']:.3f} | "
                f"{m['accuracy']:.3f} | {row.seconds_per_sample * 1000:.2f} ms |")
        if with_gap:
            line += f" {m['gap_closed']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def save_rows_grid(rows: list[Row], backend: Backend, num_columns: int, path: Path) -> None:
    """The first ``num_columns`` samples of every row (same seeds) side by side, a PNG row per method."""
    columns = max(1, min(num_columns, len(rows[0].latents)))
    images = torch.cat([backend.decode(row.latents[:columns]) for row in rows])
    save_image_grid(images, path, nrow=columns, row_labels=[row.name for row in rows])
