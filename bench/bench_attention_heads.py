"""The compose teacher's UNet with 4 attention heads (the old default) vs 1 (``model.digits.attention_heads``).

    .venv/bin/python bench/bench_attention_heads.py [--repeats 3] [--batch 64] [--calls 8]

Same architecture and weight count, only the heads differ (4 heads of width 8/16 vs one of width 32/64 at the
12x12 / 6x6 levels). Each repeat times, alternating the two variants in one process on torch's threads:
a teacher training step (forward + backward + AdamW at ``--batch``) and a sampling call (forward under
``no_grad`` at ``--batch``), ``--calls`` of each after two warm-up calls. Prints seconds a call of each and
the median of the per-repeat ratios (4 heads / 1 head: > 1 means one head is faster). Random weights: the
time depends on the architecture only. No assertion.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noiserefine.backends.digits import build_unet  # noqa: E402
from noiserefine.config import load_config  # noqa: E402


def seconds_per_call(unet, batch: int, calls: int, train: bool) -> float:
    x, t = torch.randn(batch, 1, unet.config.sample_size, unet.config.sample_size), torch.randint(0, 1000, (batch,))
    tokens = torch.randn(batch, 4, unet.config.cross_attention_dim)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def call():
        if train:
            optimizer.zero_grad(set_to_none=True)
            unet(x, t, encoder_hidden_states=tokens).sample.pow(2).mean().backward()
            optimizer.step()
        else:
            with torch.no_grad():
                unet(x, t, encoder_hidden_states=tokens)

    for _ in range(2):
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args()
    digits = load_config([str(REPO / "configs" / "digits.yaml"), str(REPO / "configs" / "compose.yaml")]).model.digits
    unets = {heads: build_unet(digits.block_out_channels, digits.cross_attention_dim, digits.canvas, heads)
             for heads in (4, 1)}
    print(f"compose UNet {list(digits.block_out_channels)}, canvas {digits.canvas}, batch {args.batch}, "
          f"{sum(p.numel() for p in unets[1].parameters()):,} weights either way, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for train in (True, False):
        kind = "training step" if train else "sampling call"
        ratios = []
        for repeat in range(args.repeats):
            seconds = {heads: seconds_per_call(unet.train(train), args.batch, args.calls, train)
                       for heads, unet in unets.items()}
            ratios.append(seconds[4] / seconds[1])
            print(f"  {kind} repeat {repeat}: 4 heads {seconds[4]:.3f} s, 1 head {seconds[1]:.3f} s")
        print(f"{kind}: 1 head is {statistics.median(ratios):.2f}x the speed of 4 (median of {args.repeats})")


if __name__ == "__main__":
    main()
