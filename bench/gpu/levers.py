"""The speed levers (``performance.*``, ``noiserefine/performance.py``) measured on/off on one real-size model.

Denoiser levers (compile, CUDA graphs, channels-last, SDPA kernel, bf16 autocast): each on its own copy of the
denoiser (``apply_levers`` changes a denoiser in place), timed on the teacher's workload (``steps`` batched
forwards of 3 x batch: CFG+PAG's three branches) against the baseline (no lever; bf16 weights on CUDA, where
``autocast_bf16`` runs float32 weights under autocast instead). Reported per lever: warm-up seconds (compile time
included), the median of the timed runs, ``speedup`` = baseline / lever, and the largest difference of its output
from the baseline's. ``refiner_micro_batch``: one MSD training step at the case's batch with the refiner in
checkpointed chunks of half of it, vs whole: time and peak CUDA memory.

A lever that fails (a kernel torch cannot run here, OOM) is recorded in its row and the next one runs. Levers that
need CUDA are "not run" on the CPU, as the config refuses them there.
"""

from __future__ import annotations

import copy
import statistics

import torch

from bench.gpu.cases import Case
from bench.gpu.realsize import Context, guarded

# lever -> its performance.* values; needs CUDA (the config refuses it elsewhere)
DENOISER_LEVERS = {
    "compile": ({"compile": "default"}, False),
    "compile_cuda_graphs": ({"compile": "reduce-overhead"}, True),
    "channels_last": ({"channels_last": True}, False),
    "sdpa_math": ({"sdpa_backend": "math"}, False),
    "sdpa_flash": ({"sdpa_backend": "flash"}, False),
    "sdpa_efficient": ({"sdpa_backend": "efficient"}, True),
    "sdpa_cudnn": ({"sdpa_backend": "cudnn"}, True),
    "autocast_bf16": ({"autocast": "bfloat16"}, False),
}
MICRO_BATCH = "refiner_micro_batch"
ALL_LEVERS = (*DENOISER_LEVERS, MICRO_BATCH)


def _variant(backend, values: dict):
    """A shallow copy of ``backend`` with its own copy of the denoiser, the levers ``values`` applied."""
    from noiserefine.performance import PerformanceConfig, apply_levers

    variant = copy.copy(backend)
    variant.denoiser = copy.deepcopy(backend.denoiser)
    if values.get("autocast"):  # autocast is the alternative to bf16 weights: float32 weights under it
        variant.denoiser.float()
        variant.dtype = torch.float32
    apply_levers(variant, PerformanceConfig(**values))
    return variant


def _teacher_workload(ctx: Context, case: Case):
    """``forward(backend)``: ``steps`` batched forwards of 3 x batch on fixed inputs; returns the last output."""
    from noiserefine.backends.base import cat_conditioning
    from noiserefine.sampling import make_scheduler

    cond, null = ctx.conditioning(case.batch)
    cond3 = cat_conditioning([null, cond, cond])
    x = torch.randn(3 * case.batch, *ctx.backend.latent_shape, generator=torch.Generator().manual_seed(0))
    timesteps = make_scheduler(ctx.backend, case.steps[0]).timesteps

    def forward(backend):
        out = None
        with torch.no_grad():
            for t in timesteps:
                out = backend.denoise(x.to(backend.device, backend.dtype), t, cond3)
        return out.float()

    return forward


def _timed(ctx: Context, fn, repeats: int) -> dict:
    warm, out = ctx.time(fn)
    times = [ctx.time(fn)[0] for _ in range(repeats)]
    return {"warmup_s": round(warm, 4), "seconds": round(statistics.median(times), 5), "output": out}


def denoiser_row(ctx: Context, case: Case, forward, baseline: dict, name: str) -> dict:
    values, cuda_only = DENOISER_LEVERS[name]
    if cuda_only and not ctx.cuda:
        return {"lever": name, "values": values, "status": "not run", "reason": "needs CUDA"}
    if not ctx.fits(case.steps[0] * 3 * case.batch * (case.repeats + 1) * 3)[0]:
        return {"lever": name, "values": values, "status": "skipped", "reason": "time budget"}

    def measure():
        variant = _variant(ctx.backend, values)
        try:
            return _timed(ctx, lambda: forward(variant), case.repeats)
        finally:
            del variant

    result, error = guarded(measure)
    if error is not None:
        return {"lever": name, "values": values, "status": "failed", "error": error}
    out = result.pop("output")
    return {"lever": name, "values": values, "status": "ok", **result,
            "speedup": round(baseline["seconds"] / result["seconds"], 4),
            "max_abs_diff": float((out - baseline["output"]).abs().max())}


def micro_batch_row(ctx: Context, case: Case) -> dict:
    """One MSD step (refiner forward/backward, rollout of ``steps``) whole vs in checkpointed halves."""
    from noiserefine.losses import MSDLoss

    size = max(1, case.batch // 2)
    refiner = ctx.refiner()
    cond, _ = ctx.conditioning(case.batch)
    noise = ctx.noise(case.batch, seed=300)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3)).to(ctx.device)
    loss_fn = MSDLoss(ctx.backend, case.steps[0])
    params = refiner.trainable_parameters()

    def step(micro: int):
        for p in params:
            p.grad = None
        base = ctx.peak_start()
        seconds, loss = ctx.time(lambda: _msd_backward(refiner, loss_fn, noise, cond, target, micro))
        grads = torch.cat([p.grad.flatten().float() for p in params if p.grad is not None])
        return {"seconds": round(seconds, 5), **ctx.peak_gb(base), "loss": loss, "grads": grads}

    def measure():
        step(size)  # warm-up
        whole, chunked = step(0), step(size)
        scale = float(whole["grads"].abs().max())
        return {"batch": case.batch, "micro_batch": size, "whole": {k: whole[k] for k in ("seconds", "step_peak_gb")},
                "chunked": {k: chunked[k] for k in ("seconds", "step_peak_gb")},
                "speedup": round(whole["seconds"] / chunked["seconds"], 4),
                "loss_diff": abs(whole["loss"] - chunked["loss"]),
                "grad_max_rel_diff": float((whole["grads"] - chunked["grads"]).abs().max()) / max(scale, 1e-30)}

    result, error = guarded(measure)
    for p in params:
        p.grad = None
    if error is not None:
        return {"lever": MICRO_BATCH, "status": "failed", "error": error}
    return {"lever": MICRO_BATCH, "values": {MICRO_BATCH: size}, "status": "ok", **result}


def _msd_backward(refiner, loss_fn, noise, cond, target, micro: int) -> float:
    from noiserefine.performance import refine_in_micro_batches

    loss, _ = loss_fn(refine_in_micro_batches(refiner, noise, cond, None, micro), cond, target)
    loss.backward()
    return float(loss.detach())


def levers(ctx: Context, case: Case) -> dict:
    forward = _teacher_workload(ctx, case)
    result, error = guarded(_timed, ctx, lambda: forward(ctx.backend), case.repeats)
    if error is not None:
        raise RuntimeError(f"baseline forwards failed: {error['type']}: {error['message']}")
    baseline = {"seconds": result["seconds"], "output": result["output"]}
    if ctx.unit_s is None:
        ctx.unit_s = baseline["seconds"] / (case.steps[0] * 3 * case.batch)
    figures = {"batch": case.batch, "forward_batch": 3 * case.batch, "steps": case.steps[0], "repeats": case.repeats,
               "baseline_dtype": str(ctx.backend.dtype).removeprefix("torch."),
               "baseline_s": baseline["seconds"], "baseline_warmup_s": result["warmup_s"], "rows": []}
    for name in case.levers:
        row = micro_batch_row(ctx, case) if name == MICRO_BATCH else denoiser_row(ctx, case, forward, baseline, name)
        figures["rows"].append(row)
        ctx.partial(case, figures)
    return figures
