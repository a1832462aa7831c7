"""Cost of one teacher CFG step (and one MSD step) of a real-size model family, built with RANDOM WEIGHTS.

    .venv/bin/python bench/bench_real_size.py --arch sd21 --device cpu --dtype float32 [--threads 1] [--msd]
    python bench/bench_real_size.py --arch sdxl --device cuda --dtype bfloat16 --repeats 5 --msd --msd-steps 4

Builds ``--arch`` (sd15, sd21, sd21_768, sdxl, dit_xl2, sit_xl2) at its published
size through ``load_backend`` exactly as ``model.init=random`` does (random weights:
for speed/memory measurements and smoke tests; samples are noise), then times
``--repeats`` teacher steps: one CFG step of the teacher rollout
(``sampling.rollout`` with one step: ``[uncond, cond]`` in one batched forward of
``2 x --batch`` samples, the guidance combination and the scheduler step).

With ``--msd`` it then times one refiner training step as the trainer runs it
without DeepSpeed: the refiner (the default ``refiner`` config: LoRA rank 8 on
attention and resnet convs) forward with its autograd graph, the MSD loss over an
unguided ``--msd-steps``-step rollout under ``no_grad``, backward into the LoRA and
an AdamW step, on ``--batch`` samples against a random target.

Printed: parameters per component, build seconds, seconds per step (the first
includes one-time costs, the median of the rest is the figure to quote), and
peak memory: the process's peak RSS, and on CUDA the peak allocated GPU memory.
The costs do not depend on the weights' values, so they are those of the real
model at this dtype and device. Also printed: the FLOPs of one teacher CFG step and of the MSD step, counted
with torch's ``FlopCounterMode`` on one sample, and the achieved FLOP/s and MFU (peak: the GPU's datasheet
figure, or on the CPU a measured matmul roofline; ``noiserefine/flops.py``). ``--tiny`` builds a tiny variant of
the same classes (sd21, sdxl; for smoke tests). Building and the training step are the GPU check's own
(``bench/gpu/realsize.py``, ``bench/gpu/measure.py``). No assertion: read the numbers.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from noiserefine import flops  # noqa: E402
from bench.gpu.measure import first, training_step  # noqa: E402
from bench.gpu.realsize import build_backend  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd21", help="a directory of noiserefine/backends/architectures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1, help="prompts per step (the forward runs 2x this)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps (the first includes warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--msd", action="store_true", help="also time one MSD training step of the refiner")
    parser.add_argument("--msd-steps", type=int, default=1, help="unguided student steps of the MSD rollout")
    parser.add_argument("--tiny", action="store_true", help="tiny widths of the same classes (sd21, sdxl)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from noiserefine.backends.random_init import count_parameters, read_architecture
    from diffusers.guiders import ClassifierFreeGuidance

    from noiserefine.sampling import rollout

    arch = read_architecture(args.arch)
    dtype = getattr(torch, args.dtype)
    cuda = torch.device(args.device).type == "cuda"
    print(f"arch {args.arch}{' (tiny)' if args.tiny else ''} ({arch.pipeline.get('published_as', '')}), backend "
          f"{arch.backend}, device {args.device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, dtype "
          f"{args.dtype}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    started = time.perf_counter()
    backend = build_backend(args.arch, args.device, dtype, tiny=args.tiny)
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter() - started
    print(f"built in {built:.1f} s: {backend.weights}")
    total = 0
    for name in ("denoiser", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(backend, name, None)
        if module is not None:
            count = count_parameters(module)
            total += count
            print(f"  {name:<15} {type(module).__name__:<30} {count:>15,} parameters  {module.dtype}")
    print(f"  {'total':<15} {'':<30} {total:>15,} parameters")
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = flops.device_peak(torch.device(args.device), dtype)

    prompts = ["207" if arch.backend == "sit" else "a photograph of an astronaut riding a horse"] * args.batch
    cond = backend.encode_prompts(prompts)
    null = backend.null_conditioning(args.batch)
    noise = torch.randn(args.batch, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    noise = noise.to(backend.device)
    guidance = ClassifierFreeGuidance(guidance_scale=args.guidance_scale)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            started = time.perf_counter()
            out = rollout(backend, noise, cond, 1, guidance, null)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        step_flops, _ = flops.count(lambda: rollout(backend, noise[:1], first(cond, 1), 1, guidance, first(null, 1)))
    assert out.shape == noise.shape
    rest = times[1:] or times
    median = statistics.median(rest)
    print(f"one teacher CFG step (one forward of {2 * args.batch} samples of {tuple(backend.latent_shape)}): "
          + ", ".join(f"{t:.3f} s" for t in times) + f"; median after the first {median:.3f} s")
    print_flops("teacher CFG step", step_flops, args.batch, median, peak)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak_rss:.2f} GB (after the build {rss_built:.2f} GB)")
    if cuda:
        print(f"peak GPU memory allocated during the steps {torch.cuda.max_memory_allocated() / 2**30:.2f} GB; "
              f"model memory {torch.cuda.memory_allocated() / 2**30:.2f} GB")
    if args.msd:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, loss, msd_flops = msd_step(backend, cond, noise, args.msd_steps)
        print(f"one MSD step (refiner forward + backward, {args.msd_steps}-step unguided rollout, AdamW; batch "
              f"{args.batch}): {seconds:.3f} s, loss {loss:.4g}")
        print_flops("MSD step", msd_flops, args.batch, seconds, peak)
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
        if cuda:
            print(f"peak GPU memory allocated during the MSD step {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")
    print("random weights: for speed/memory measurements and smoke tests; samples are noise")


def print_flops(what: str, per_sample: int, batch: int, seconds: float, peak: dict) -> None:
    use = flops.utilisation(per_sample * batch, seconds, peak)
    mfu = f"{use['mfu']:.4f}" if use["mfu"] is not None else "n/a"
    print(f"{what}: {per_sample / 1e9:.4g} GFLOP per sample; achieved {use['achieved_flop_per_s'] / 1e12:.4g} "
          f"TFLOP/s, MFU {mfu} (peak: {peak['peak_source']})")


def msd_step(backend, cond, noise, num_steps: int = 1, seed: int = 0) -> tuple[float, float, int]:
    """One refiner training step as ``train.loop.train_step`` runs it, without DeepSpeed: refiner forward (LoRA
    graph), MSD loss against a random target, backward, AdamW. Returns (seconds, loss, FLOPs of one sample's
    forward + backward, counted after the timed step); the refiner stays attached."""
    from noiserefine.config_schema import RefinerConfig
    from noiserefine.losses import MSDLoss
    from noiserefine.refiner import Refiner

    torch.manual_seed(seed)
    refiner = Refiner(backend, RefinerConfig())
    optimizer = torch.optim.AdamW(refiner.trainable_parameters(), lr=1e-4)
    loss_fn = MSDLoss(backend, num_steps)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed + 1)).to(noise.device)
    cuda = noise.device.type == "cuda"
    started = time.perf_counter()
    loss = training_step(refiner, optimizer, loss_fn, noise, cond, target)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    optimizer.zero_grad(set_to_none=True)
    counted, _ = flops.count(lambda: loss_fn(refiner(noise[:1], first(cond, 1)), first(cond, 1), target[:1])[0]
                             .backward())
    optimizer.zero_grad(set_to_none=True)
    return seconds, loss, counted


if __name__ == "__main__":
    main()
