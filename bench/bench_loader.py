"""Loader throughput vs training consumption (goal: the loader is >= 10x faster than training eats).

    .venv/bin/python bench/bench_loader.py [--config configs/digits.yaml] [key=value ...]

Needs the teacher cache of the config (``make demo`` or ``pipeline/generate_targets.py``
builds it). Measured side by side in one process with the same thread count:
(a) the real rank stream (``TeacherStream``: tar read + sha256 check, npy decode,
noise regenerated from each seed and its fingerprint checked, batching), and
(b) the real ``train_step`` math (refiner forward, MSD loss, backward, AdamW
step) without DeepSpeed, on batches of the same size. Alternated, median of repeats.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.train.stream import TeacherStream
from noiserefine.losses import build_loss
from noiserefine.refiner import Refiner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["train.num_loader_workers=0", *args.overrides])
    backend = load_backend(cfg.model)
    refiner = Refiner(backend, cfg.refiner)
    optimizer = torch.optim.AdamW(refiner.trainable_parameters(), lr=cfg.train.learning_rate)
    loss_fn = build_loss(cfg, backend)
    stream = TeacherStream.from_config(cfg)
    batches = list(itertools.islice(stream.batches(), args.batches))

    def load() -> float:
        started = time.perf_counter()
        count = sum(len(b["sample_id"]) for b in itertools.islice(TeacherStream.from_config(cfg).batches(),
                                                                   args.batches))
        return count / (time.perf_counter() - started)

    def train() -> float:
        started = time.perf_counter()
        for batch in batches[:3]:
            cond = backend.encode_prompts(batch["prompt"])
            loss, _ = loss_fn(refiner(batch["noise"], cond), cond, batch["target"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return 3 * cfg.train.global_batch_size / (time.perf_counter() - started)

    loader_rates, train_rates = [], []
    for _ in range(args.repeats):
        loader_rates.append(load())
        train_rates.append(train())
    loader, trainer = statistics.median(loader_rates), statistics.median(train_rates)
    print(f"batch {cfg.train.global_batch_size}, {cfg.student.num_steps} student steps, torch threads {args.threads}, "
          f"loader workers 0 (in-process), {args.repeats} repeats (median)")
    print(f"loader   {loader:10.1f} samples/s")
    print(f"training {trainer:10.1f} samples/s (refiner + MSD + backward + AdamW)")
    ratio = loader / trainer
    print(f"loader / training = {ratio:.1f}x (goal >= 10x): {'met' if ratio >= 10 else 'not met'}")


if __name__ == "__main__":
    main()
