"""The digit teacher's backward on torch's intra-op threads vs split over Python threads (``model.digits.train_threads``).

    .venv/bin/python bench/bench_teacher_threads.py [--steps 60] [--repeats 2] [--task compose] [--threads 2]

Each repeat trains the configured teacher (configs/digits.yaml, plus configs/compose.yaml for ``--task
compose``) for ``--steps`` steps with ``train_threads=1`` (one forward/backward per batch on
``torch.get_num_threads()`` intra-op threads) and with ``train_threads=--threads`` (each batch in that many
parts, each in its own Python thread on one intra-op thread), alternating, into temp directories. It prints
the seconds per step each variant recorded in its ``training.json`` (the loop alone) and the wall time of
the whole call, the median of the per-repeat ratios, and how far apart the two teachers' weights ended
relative to how far training moved them (float rounding only). No assertion: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noiserefine.backends.digits import DigitsBackend  # noqa: E402
from noiserefine.config import load_config  # noqa: E402
from noiserefine.digits.teacher import TRAINING_FILE, train_digits_teacher  # noqa: E402

CONFIGS = {"compose": ["digits.yaml", "compose.yaml"], "digits": ["digits.yaml"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--task", choices=sorted(CONFIGS), default="compose")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config([str(REPO / "configs" / name) for name in CONFIGS[args.task]],
                      [f"model.digits.train_steps={args.steps}"])
    print(f"task {args.task}, batch {cfg.model.digits.batch_size}, {args.steps} steps; this process: "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)
    variants = {"1 backward": 1, f"{args.threads} threads": args.threads}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, threads in variants.items():
                out = Path(tmp) / f"{repeat}-{threads}"
                started = time.perf_counter()
                train_digits_teacher({**cfg.model.digits, "train_threads": threads}, out, progress=False)
                wall = time.perf_counter() - started
                loop = json.loads((out / TRAINING_FILE).read_text())["seconds"]
                results[name].append((loop / args.steps, wall))
                print(f"repeat {repeat} {name}: {loop / args.steps:.3f} s/step, {wall:.1f} s wall", flush=True)
        weights = [_flat(Path(tmp) / f"0-{threads}") for threads in variants.values()]
    one, many = results["1 backward"], results[f"{args.threads} threads"]
    step_ratio = statistics.median(a[0] / b[0] for a, b in zip(one, many))
    wall_ratio = statistics.median(a[1] / b[1] for a, b in zip(one, many))
    print(f"\nspeed-up of {args.threads} threads over 1 backward: {step_ratio:.2f}x per step, {wall_ratio:.2f}x "
          f"wall (medians of {args.repeats} repeats); the two teachers' weights differ by "
          f"{(weights[0] - weights[1]).norm().item():.2e} (L2; their norm {weights[0].norm().item():.1f})")


def _flat(teacher: Path) -> torch.Tensor:
    state = DigitsBackend.from_pretrained(teacher).denoiser.state_dict()
    return torch.cat([state[k].flatten().float() for k in sorted(state)])


if __name__ == "__main__":
    main()
