"""Sampling rows on a fixed held-out set: the same seeds and prompts for every row.

Held-out seeds are ``sample_seed(data.base_seed, eval.seed_offset + i)``: sample
ids beyond the teacher cache's plan. Prompts are ``eval.prompts`` cycled, or, when
that list is empty, the plan's own prompt draw for those held-out sample ids.
Scores come from a metric function the caller injects; nothing here knows a model.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from diffusers.guiders import BaseGuidance

from ..backends.base import Backend
from ..guidance import network_calls
from ..noise import noise_from_seeds, sample_seed
from ..sampling import rollout

# (images in [0, 1], their prompts) -> {"metric name": value, ...}
MetricFn = Callable[[torch.Tensor, Sequence[str]], dict]


@dataclass(frozen=True)
class EvalSet:
    seeds: list[int]
    prompts: list[str]
    sampling_threads: int = 1  # eval.sampling_threads: how :func:`sample_row` splits each batch's rollout


def eval_set(cfg) -> EvalSet:
    """The held-out seeds and prompts of ``cfg.eval`` (see the module docstring)."""
    count, offset = cfg.eval.num_samples, cfg.eval.seed_offset
    seeds = [sample_seed(cfg.data.base_seed, offset + i) for i in range(count)]
    if cfg.eval.prompts:
        prompts = [cfg.eval.prompts[i % len(cfg.eval.prompts)] for i in range(count)]
    else:
        from ..targets.plan import Plan  # the prompt sources of the cache's own plan

        plan = Plan.from_config(cfg.data)
        prompts = [plan.sample(offset + i).prompt for i in range(count)]
    return EvalSet(seeds, prompts, int(cfg.eval.sampling_threads))


@dataclass
class Row:
    name: str
    nfe: int  # network evaluations per sample
    latents: torch.Tensor
    seconds_per_sample: float
    metrics: dict = field(default_factory=dict)


@contextlib.contextmanager
def torch_threads(count: int):
    """Torch's intra-op thread count set to ``count`` inside the block (then restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rollout_in_threads(backend: Backend, noise: torch.Tensor, cond: dict, num_steps: int,
                       guidance: BaseGuidance | None, threads: int) -> torch.Tensor:
    """:func:`rollout` of a batch split into ``threads`` fixed parts, each rolled out by its own Python thread
    with one intra-op thread (the network releases the GIL). On a small CPU model this beats one rollout
    on ``threads`` intra-op threads (1.47x on 2 cores: bench/bench_sampling_threads.py). Each part gets its
    own copy of the guider, which keeps per-rollout state. The parts depend on the batch and ``threads``
    only, so the result is deterministic."""
    if threads <= 1 or noise.shape[0] < 2:
        return rollout(backend, noise, cond, num_steps, guidance)
    parts = [part for part in torch.arange(noise.shape[0]).tensor_split(threads) if len(part)]

    def one(part: torch.Tensor) -> torch.Tensor:
        return rollout(backend, noise[part], {k: v[part] for k, v in cond.items()}, num_steps,
                       copy.deepcopy(guidance))

    with torch_threads(1), ThreadPoolExecutor(len(parts)) as pool:
        return torch.cat(list(pool.map(one, parts)))


def sample_row(name: str, backend: Backend, evals: EvalSet, num_steps: int, *,
               guidance: BaseGuidance | None = None, batch_size: int = 250,
               prepare_noise: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None,
               extra_nfe: int = 0) -> Row:
    """Roll out every eval seed; ``prepare_noise(noise, prompts)`` refines the noise first (timed too), on the
    whole batch; the rollout is split over ``evals.sampling_threads`` threads (:func:`rollout_in_threads`)."""
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
            outputs.append(rollout_in_threads(backend, noise, cond, num_steps, guidance,
                                              evals.sampling_threads).float().cpu())
    seconds = (time.perf_counter() - started) / len(evals.seeds)
    return Row(name, network_calls(guidance, num_steps) + extra_nfe, torch.cat(outputs), seconds)


def score_rows(rows: list[Row], backend: Backend, evals: EvalSet, metric_fn: MetricFn) -> None:
    """Fill each row's metrics in place: ``metric_fn(decoded images, prompts)`` plus NFE and timing."""
    for row in rows:
        images = backend.decode(row.latents)
        row.metrics = {**metric_fn(images, evals.prompts), "nfe": row.nfe,
                       "seconds_per_sample": row.seconds_per_sample}


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


# (metric key, column header, format) for :func:`metrics_markdown`; a missing or NaN value prints "-"
Column = tuple[str, str, str]


def metrics_markdown(named_metrics: Sequence[tuple[str, dict]], columns: Sequence[Column]) -> str:
    """A Markdown table with one row per ``(name, metrics)`` and one column per ``(key, header, format)``."""
    header = "| row | " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, metrics in named_metrics:
        cells = []
        for key, _, fmt in columns:
            value = metrics.get(key)
            missing = value is None or (isinstance(value, float) and value != value)
            cells.append("-" if missing else format(value, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
