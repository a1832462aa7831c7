"""Teacher-target generation throughput: the real worker code against its bare network cost.

    .venv/bin/python bench/bench_generate.py [--samples 64] [--batch-size 32] [--num-steps 10]
                                             [--repeats 5] [--threads 1] [--ray-samples 64]

Measured side by side in one process, alternating the variants in every repeat:

* ``shard_samples``: ``noiserefine.targets.generate.shard_samples`` exactly as a Ray worker runs it
  (noise from seeds, prompt encoding, batched CFG rollouts, float16 targets, metadata), no IO;
* ``bare forwards``: the same number of denoiser forwards of the same shape ``[2B, ...]`` on
  random inputs, without sampler, scheduler, guidance arithmetic or metadata;
* ``naive``: the guided teacher rollout called once per prompt (batch 1).

Printed: the median time per variant and the median of the per-repeat ratios
(a) throughput of shard_samples / bare forwards (goal >= 0.9: the pipeline adds
little beyond the network) and (b) shard_samples / naive (goal >= 3x: batching
pays). For the record it also runs ``pipeline/generate_targets.py`` once end to
end (Ray start, actor start, model load) and compares it with the same shards made
in-process with ``generate_shard``. No assertion: read the verdicts.

Uses ``artifacts/digits-teacher`` if it exists, else trains a 50-step teacher in a
temp directory: timing depends on the architecture, not on the weights' quality.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = REPO / "artifacts" / "digits-teacher"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="samples per measured run (one shard)")
    parser.add_argument("--batch-size", type=int, default=32, help="pipeline.batch_size")
    parser.add_argument("--num-steps", type=int, default=10, help="teacher.num_steps")
    parser.add_argument("--repeats", type=int, default=5, help="measured repeats (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--ray-samples", type=int, default=64,
                        help="samples of the end-to-end Ray job (2 shards, 1 worker); 0 skips it")
    parser.add_argument("--teacher", type=Path, default=None,
                        help=f"teacher directory (default {DEFAULT_TEACHER.relative_to(REPO)} if present)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from noiserefine.backends import load_backend
    from noiserefine.digits.teacher import train_digits_teacher
    from noiserefine.config import load_config
    from noiserefine.targets.identity import teacher_key
    from noiserefine.targets.generate import generate_shard, shard_samples
    from noiserefine.noise import noise_from_seed
    from noiserefine.targets.plan import Plan
    from noiserefine.guidance import guider_label, make_guider, network_calls
    from noiserefine.sampling import rollout

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        teacher = args.teacher or (DEFAULT_TEACHER if DEFAULT_TEACHER.is_dir() else None)
        if teacher is None:
            started = time.perf_counter()
            settings = load_config(REPO / "configs" / "digits.yaml", ["model.digits.train_steps=50"]).model.digits
            teacher = train_digits_teacher(settings, tmp / "digits-teacher", progress=False)
            print(f"trained a 50-step digits teacher in {time.perf_counter() - started:.0f} s "
                  f"(no {DEFAULT_TEACHER.relative_to(REPO)})")
        overrides = [f"model.path={Path(teacher).resolve()}", f"data.num_samples={args.samples}",
                     f"data.shard_size={args.samples}", f"pipeline.batch_size={args.batch_size}",
                     f"teacher.num_steps={args.num_steps}", f"data.cache_root={tmp / 'cache'}"]
        cfg = load_config(REPO / "configs" / "digits.yaml", overrides)
        backend = load_backend(cfg.model)
        guidance = make_guider(cfg.teacher)
        branches = network_calls(guidance, args.num_steps) // args.num_steps  # per step (constant for CFG)
        key = teacher_key(cfg)
        samples = Plan.from_config(cfg.data).shard(0)
        batch_sizes = [len(samples[i:i + args.batch_size]) for i in range(0, len(samples), args.batch_size)]
        num_forwards = len(batch_sizes) * args.num_steps
        dim = backend.embedding.shape[-1]
        print(f"teacher {teacher}; torch threads {torch.get_num_threads()}; {args.samples} samples, "
              f"batch {args.batch_size}, {args.num_steps} steps, {guider_label(guidance)} x{branches}; "
              f"{args.repeats} repeats (median)")

        def run_shard_samples(warmup: bool = False) -> None:
            for _ in shard_samples(backend, samples[:args.batch_size] if warmup else samples,
                                   guidance=guidance, num_steps=args.num_steps,
                                   teacher_key=key, batch_size=args.batch_size,
                                   target_dtype=cfg.data.target_dtype):
                pass

        generator = torch.Generator().manual_seed(0)
        bare_inputs = [(torch.randn(branches * b, *backend.latent_shape, generator=generator),
                        torch.randn(branches * b, 1, dim, generator=generator)) for b in batch_sizes]
        timesteps = torch.linspace(999, 0, args.num_steps).round().long()

        def run_bare_forwards(warmup: bool = False) -> None:
            with torch.no_grad():
                for x, hidden in bare_inputs[:1] if warmup else bare_inputs:
                    for t in timesteps:
                        backend.denoise(x, t, {"encoder_hidden_states": hidden})

        def run_naive(warmup: bool = False) -> None:
            with torch.no_grad():
                for sample in samples[:args.batch_size] if warmup else samples:
                    noise = noise_from_seed(sample.seed, backend.latent_shape)[None]
                    cond = backend.encode_prompts([sample.prompt])
                    rollout(backend, noise, cond, args.num_steps, guidance).to(torch.float16)

        variants = {"shard_samples": run_shard_samples, "bare_forwards": run_bare_forwards,
                    "naive": run_naive}
        for run in variants.values():  # warm-up on one batch: allocator, lazy init, first calls
            run(warmup=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            names = list(variants)
            order = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate: no position bias
            for name in order:
                started = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - started)
        ratio_a = statistics.median(b / s for b, s in zip(times["bare_forwards"], times["shard_samples"]))
        ratio_b = statistics.median(n / s for n, s in zip(times["naive"], times["shard_samples"]))

        forwards = {"shard_samples": f"{num_forwards} x [{branches}B]",
                    "bare_forwards": f"{num_forwards} x [{branches}B]",
                    "naive": f"{len(samples) * args.num_steps} x [{branches}]"}
        print(f"\n{'variant':<16} | {'median s':>8} | {'samples/s':>9} | forwards")
        for name in variants:
            median = statistics.median(times[name])
            print(f"{name:<16} | {median:8.3f} | {len(samples) / median:9.1f} | {forwards[name]}")
        print(f"\n(a) shard_samples throughput / bare forwards: {ratio_a:.3f}  (goal >= 0.9: "
              f"{'MET' if ratio_a >= 0.9 else 'NOT MET'})")
        print(f"(b) shard_samples / naive per-prompt rollout: {ratio_b:.2f}x (goal >= 3x: "
              f"{'MET' if ratio_b >= 3 else 'NOT MET'})")

        if args.ray_samples > 0:
            ray_shard = -(-args.ray_samples // 2)
            ray_overrides = [*overrides, f"data.num_samples={args.ray_samples}", f"data.shard_size={ray_shard}",
                             f"data.cache_root={tmp / 'ray-cache'}", "pipeline.num_workers=1"]
            ray_cfg = load_config(REPO / "configs" / "digits.yaml", ray_overrides)
            plan = Plan.from_config(ray_cfg.data)
            local_dir = tmp / "local-cache"
            local_dir.mkdir()
            started = time.perf_counter()
            for index in range(plan.num_shards):
                generate_shard(backend, ray_cfg, plan.shard(index), index, local_dir, teacher_key(ray_cfg))
            local = time.perf_counter() - started
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            env.pop("RAY_ADDRESS", None)
            started = time.perf_counter()
            job = subprocess.run([sys.executable, "pipeline/generate_targets.py", "--config", "configs/digits.yaml",
                                  *ray_overrides], cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if job.returncode != 0:
                print(f"\nRay job failed (exit {job.returncode}):\n{job.stderr[-3000:]}")
                return
            reported = re.search(r"^generated \d+ samples in \d+ shards in ([0-9.]+) s", job.stdout, re.M)
            job_seconds = float(reported.group(1)) if reported else float("nan")
            same = all((Path(job.stdout.strip().splitlines()[-1]) / f).read_bytes() == (local_dir / f).read_bytes()
                       for f in (p.name for p in local_dir.glob("shard-*.tar")))
            print(f"\nRay job end to end, {args.ray_samples} samples in {plan.num_shards} shards, 1 worker "
                  f"(for the record):")
            print(f"  in-process generate_shard (model loaded, tar writes): {local:6.2f} s")
            print(f"  Ray job, job-reported (Ray start + actor + model load + shards): {job_seconds:6.2f} s")
            print(f"  Ray job, subprocess wall (+ interpreter, imports, plan, manifest): {wall:6.2f} s")
            print(f"  overhead {wall - local:.1f} s ({wall / local:.1f}x in-process); shards byte-identical "
                  f"to in-process: {same}")


if __name__ == "__main__":
    main()
