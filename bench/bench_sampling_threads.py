"""Evaluation sampling on torch's intra-op threads vs split over Python threads (``eval.sampling_threads``).

    .venv/bin/python bench/bench_sampling_threads.py [--samples 250] [--repeats 3] [--threads 2] [--task compose]

Each repeat samples the same held-out seeds with ``evaluation.rows.sample_row`` (CFG w = 3, the student's
step count, ``eval.batch_size``) twice, alternating: ``sampling_threads=1`` (one rollout per batch on
``torch.get_num_threads()`` intra-op threads) and ``sampling_threads=--threads`` (each batch split in that
many parts, each rolled out by its own Python thread on one intra-op thread). Prints ms per sample of each
and the median of the per-repeat speed-ups, and the largest difference between the two rows' samples
(float rounding only). Uses ``artifacts/<task>-teacher`` if it exists, else a random-initialised UNet of
the configured architecture (timing depends on the architecture, not the weights). No assertion.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noiserefine.backends.digits import SCHEDULER_CONFIG, TASKS, ATTRIBUTES, DigitsBackend, build_unet  # noqa: E402
from noiserefine.config import load_config  # noqa: E402
from noiserefine.evaluation.rows import eval_set, sample_row  # noqa: E402
from noiserefine.guidance import make_guider  # noqa: E402

CONFIGS = {"compose": ["digits.yaml", "compose.yaml"], "digits": ["digits.yaml"]}


def backend_of(cfg) -> DigitsBackend:
    path = REPO / cfg.model.path
    if (path / "unet").is_dir():
        return DigitsBackend.from_pretrained(path)
    digits = cfg.model.digits
    size = digits.canvas if digits.task == "compose" else 16
    tables = {name: torch.randn(len(ATTRIBUTES[name]) + 1, 1, digits.cross_attention_dim) for name in TASKS[digits.task]}
    digit = tables.pop("digit")
    return DigitsBackend(build_unet(digits.block_out_channels, digits.cross_attention_dim, size, digits.attention_heads), digit,
                         dict(SCHEDULER_CONFIG), attributes=tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", choices=sorted(CONFIGS), default="compose")
    args = parser.parse_args()
    cfg = load_config([str(REPO / "configs" / name) for name in CONFIGS[args.task]],
                      [f"eval.num_samples={args.samples}", "teacher.guidance_scale=3"])
    backend = backend_of(cfg)
    evals = eval_set(cfg)
    variants = {"1 rollout": dataclasses.replace(evals, sampling_threads=1),
                f"{args.threads} threads": dataclasses.replace(evals, sampling_threads=args.threads)}
    print(f"task {args.task}, {args.samples} samples, batch {cfg.eval.batch_size}, {cfg.student.num_steps} steps, "
          f"CFG w=3; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    latents = {}
    for repeat in range(args.repeats):
        for name, variant in variants.items():
            row = sample_row(name, backend, variant, cfg.student.num_steps, guidance=make_guider(cfg.teacher),
                             batch_size=cfg.eval.batch_size)
            seconds[name].append(row.seconds_per_sample)
            latents[name] = row.latents
            print(f"repeat {repeat} {name}: {row.seconds_per_sample * 1000:.2f} ms/sample", flush=True)
    one, many = seconds.values()
    speedup = statistics.median(a / b for a, b in zip(one, many))
    first, second = latents.values()
    print(f"\nspeed-up of {args.threads} threads over 1 rollout: {speedup:.2f}x (median of {args.repeats}); "
          f"largest sample difference {(first - second).abs().max().item():.2e} (values up to "
          f"{first.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
