"""MSD vs full-gradient training step: time and peak memory at several rollout lengths N.

    .venv/bin/python bench/bench_losses.py [--steps 5 25 50] [--batch 32] [--repeats 3]

Each (loss, N) runs in its own fresh process (so peak RSS is its own), one step
after another on the same machine, alternating MSD and full gradient. Printed:
median step time, peak RSS growth over the process's state before the first
step, and the ratios. Goals: MSD memory flat in N; MSD time <= 0.5x full
gradient at N = 25. Uses the digits UNet architecture (random weights: the
cost does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from noiserefine.backends.digits import DigitsBackend, SCHEDULER_CONFIG, build_unet
from noiserefine.config import load_config
from noiserefine.config_schema import RefinerConfig
from noiserefine.losses import build_loss
from noiserefine.refiner import Refiner
loss_name, num_steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
backend = DigitsBackend(build_unet([16, 32, 64], 64), torch.randn(11, 1, 64), SCHEDULER_CONFIG)
refiner = Refiner(backend, RefinerConfig())
optimizer = torch.optim.AdamW(refiner.trainable_parameters(), lr=1e-4)
noise = torch.randn(batch, *backend.latent_shape)
target = torch.randn_like(noise)
cond = backend.encode_prompts(["seven"] * batch)
loss_fn = build_loss(load_config(overrides=[f"train.loss={loss_name}", f"student.num_steps={num_steps}"]), backend)
def step():
    loss, _ = loss_fn(refiner(noise, cond), cond, target)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and inputs built, no step yet
step()  # warm-up: allocator, lazy init
times = []
for _ in range(3):
    started = time.perf_counter(); step(); times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": sorted(times)[1], "peak_growth_mb": (peak - before) / 1024, "peak_mb": peak / 1024}))
"""


def measure(loss: str, num_steps: int, batch: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loss, str(num_steps), str(batch), str(threads)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 25, 50])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"batch {args.batch}, torch threads {args.threads}, repeats {args.repeats} (median)")
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for num_steps in args.steps:
            for loss in ("msd", "full_gradient"):  # alternate, side by side
                results.setdefault((loss, num_steps), []).append(measure(loss, num_steps, args.batch, args.threads))

    def median(loss, n, key):
        return statistics.median(r[key] for r in results[(loss, n)])

    print(f"{'N':>4} | {'MSD s/step':>10} | {'FG s/step':>10} | {'time MSD/FG':>11} | "
          f"{'MSD peak +MB':>12} | {'FG peak +MB':>11}")
    for n in args.steps:
        print(f"{n:>4} | {median('msd', n, 'seconds'):>10.3f} | {median('full_gradient', n, 'seconds'):>10.3f} | "
              f"{median('msd', n, 'seconds') / median('full_gradient', n, 'seconds'):>11.2f} | "
              f"{median('msd', n, 'peak_growth_mb'):>12.1f} | {median('full_gradient', n, 'peak_growth_mb'):>11.1f}")
    lo, hi = min(args.steps), max(args.steps)
    msd_peak = [median("msd", n, "peak_mb") for n in args.steps]
    fg_peak = [median("full_gradient", n, "peak_mb") for n in args.steps]
    print(f"peak RSS N={hi} / N={lo}: MSD {msd_peak[-1] / msd_peak[0]:.2f}, full gradient {fg_peak[-1] / fg_peak[0]:.2f}"
          "  (goal: MSD ~1.0)")
    if 25 in args.steps:
        ratio = median("msd", 25, "seconds") / median("full_gradient", 25, "seconds")
        print(f"MSD / full-gradient step time at N=25: {ratio:.2f} (goal <= 0.5): {'met' if ratio <= 0.5 else 'not met'}")


if __name__ == "__main__":
    main()
