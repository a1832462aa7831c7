"""The real-size measurements: each takes a ``realsize.Context`` and a declared case, returns its figures.

- ``generation``: bare batched denoiser forwards vs teacher CFG+PAG target generation
  (``targets.generate.shard_samples``: one forward of 3B per step), ratio ``t_bare / t_generation`` (goal >= 0.9).
- ``sampling``: refined unguided sampling (refiner forward + N unguided steps) vs CFG sampling at equal N,
  ratio (goal <= 0.55).
- ``losses``: one training step (refiner forward, loss, backward, AdamW over the LoRA) for each (loss,
  checkpointing, N) of the case's plan: seconds (synchronised, after one warm-up) and peak CUDA memory. Goals:
  MSD peak flat in N (N=50/N=10 <= 1.1), MSD <= 0.5x full gradient at N = 25; the N where full gradient runs out
  of memory is recorded (OOM is a result, not a failure).

Each also counts its FLOPs per sample exactly on one sample (``noiserefine/flops.py``) and reports achieved FLOP/s
and MFU of the timed runs under ``figures["flops"]``.
"""

from __future__ import annotations

import gc
import statistics
from types import SimpleNamespace

import torch

from bench.gpu import levers
from noiserefine import flops
from bench.gpu.cases import Case
from bench.gpu.realsize import PROMPTS, Context, MeasurementError, guarded


def training_step(refiner, optimizer, loss_fn, noise, cond, target) -> float:
    """One refiner training step as ``train.loop.train_step`` runs it without DeepSpeed; returns the loss."""
    value = forward_backward(refiner, loss_fn, noise, cond, target)
    optimizer.step()
    return value


def forward_backward(refiner, loss_fn, noise, cond, target) -> float:
    value, _ = loss_fn(refiner(noise, cond), cond, target)
    value.backward()
    return float(value.detach())


def first(cond: dict, size: int) -> dict:
    """The first ``size`` samples of a conditioning (a dict of batched tensors)."""
    return {key: value[:size] for key, value in cond.items()}


def flop_figures(ctx: Context, per_sample: dict, timed: dict) -> dict:
    """``per_sample``: stage -> FLOPs of one sample; ``timed``: workload -> (FLOPs, seconds)."""
    peak = ctx.device_peak()
    return {"per_sample": per_sample, "peak_flop_per_s": peak["peak_flop_per_s"], "peak_source": peak["peak_source"],
            "utilisation": {name: flops.utilisation(n, s, peak) for name, (n, s) in timed.items()}}


def counted(ctx: Context, count) -> dict:
    """FLOP figures from ``count()`` -> (per_sample, timed); a counting failure is recorded, not raised."""
    result, error = guarded(count)
    return flop_figures(ctx, *result) if error is None else {"error": error}


# --- generation vs bare forwards -----------------------------------------------------------------------------

def generation(ctx: Context, case: Case) -> dict:
    from noiserefine.backends.base import cat_conditioning
    from noiserefine.guidance import PipelinePAG
    from noiserefine.sampling import make_scheduler
    from noiserefine.targets.generate import shard_samples
    from noiserefine.targets.plan import PlannedSample

    backend, batch, steps = ctx.backend, case.batch, case.steps[0]
    guidance = PipelinePAG(guidance_scale=7.5, perturbed_guidance_scale=3.0, pag_layers=["mid"])

    def generate(size: int = batch, n: int = steps):
        samples = [PlannedSample(i, 1000 + i, PROMPTS[i % len(PROMPTS)], "bench") for i in range(size)]
        out = list(shard_samples(backend, samples, guidance=guidance, num_steps=n, teacher_key="gpu-check",
                                 batch_size=size, target_dtype="float16"))
        assert len(out) == size
        return out

    cond, null = ctx.conditioning(batch)
    cond3 = cat_conditioning([null, cond, cond])
    x = torch.randn(3 * batch, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(backend.device, backend.dtype)
    timesteps = make_scheduler(backend, steps).timesteps

    def bare():
        with torch.no_grad():
            for t in timesteps:
                backend.denoise(x, t, cond3)

    warm, out = ctx.time(generate)
    targets = torch.stack([torch.from_numpy(s.arrays["target"]) for s in out]).float()
    ctx.unit_s = warm / (steps * 3 * batch)  # first estimate (includes warm-up: pessimistic)
    bare_times, gen_times = [], []
    for _ in range(case.repeats):
        bare_times.append(ctx.time(bare)[0])
        gen_times.append(ctx.time(generate)[0])
    ctx.unit_s = statistics.median(bare_times) / (steps * 3 * batch)
    ratio = statistics.median(b / g for b, g in zip(bare_times, gen_times))

    def count():
        one = [x[i * batch:i * batch + 1] for i in range(3)]  # one prompt's three branches
        x1, cond1 = torch.cat(one), cat_conditioning([first(null, 1), first(cond, 1), first(cond, 1)])
        with torch.no_grad():
            branch3, _ = flops.count(lambda: backend.denoise(x1, timesteps[0], cond1))
        gen = flops.count_linear_in_steps(lambda n: generate(1, n))
        per_sample = {"denoiser_forward_per_branch": branch3 // 3, "generation_fixed": gen["fixed"],
                      "generation_per_step": gen["per_step"]}
        return per_sample, {"bare": (batch * steps * branch3, statistics.median(bare_times)),
                            "generation": (batch * flops.at_steps(gen, steps), statistics.median(gen_times))}

    return {
        "batch": batch, "forward_batch": 3 * batch, "teacher_steps": steps, "guidance": "cfg_pag (w 7.5, pag 3.0, mid)",
        "repeats": case.repeats, "warmup_s": round(warm, 3),
        "bare_s": [round(t, 4) for t in bare_times], "generation_s": [round(t, 4) for t in gen_times],
        "bare_samples_per_s": round(batch / statistics.median(bare_times), 3),
        "generation_samples_per_s": round(batch / statistics.median(gen_times), 3),
        "ratio_bare_over_generation": round(ratio, 4), "goal": ">= 0.9", "goal_met": ratio >= 0.9,
        "targets_finite": bool(torch.isfinite(targets).all()), "seconds_per_sample_forward": round(ctx.unit_s, 6),
        "flops": counted(ctx, count),
    }


# --- refined unguided sampling vs CFG ------------------------------------------------------------------------

def sampling(ctx: Context, case: Case) -> dict:
    from diffusers.guiders import ClassifierFreeGuidance

    from noiserefine.sampling import rollout

    backend, batch, steps = ctx.backend, case.batch, case.steps[0]
    refiner = ctx.refiner()
    cond, null = ctx.conditioning(batch)
    noise = ctx.noise(batch, seed=100)
    cfg = ClassifierFreeGuidance(guidance_scale=7.5)

    def refined(n, size=batch):
        with torch.no_grad():
            return rollout(backend, refiner(noise[:size], first(cond, size)), first(cond, size), n)

    def guided(n, size=batch):
        with torch.no_grad():
            return rollout(backend, noise[:size], first(cond, size), n, cfg, first(null, size))

    for fn in (refined, guided):  # warm-up (kernels, LoRA path)
        ctx.time(lambda: fn(2))
    refined_times, cfg_times = [], []
    out = None
    for _ in range(case.repeats):
        cfg_times.append(ctx.time(lambda: guided(steps))[0])
        seconds, out = ctx.time(lambda: refined(steps))
        refined_times.append(seconds)
    ratio = statistics.median(r / c for r, c in zip(refined_times, cfg_times))
    if ctx.unit_s is None:
        ctx.unit_s = statistics.median(cfg_times) / (steps * 2 * batch)

    def count():
        plain = flops.count_linear_in_steps(lambda n: refined(n, 1))
        guided_one = flops.count_linear_in_steps(lambda n: guided(n, 1))
        per_sample = {"refiner_forward": plain["fixed"], "denoiser_forward": plain["per_step"],
                      "cfg_step": guided_one["per_step"]}
        with torch.no_grad():  # not timed here; what decoding a sample to pixels costs (evaluation does it)
            decoded, error = guarded(flops.count, lambda: backend.decode(out[:1]))
        per_sample["vae_decode"] = decoded[0] if error is None else error
        return per_sample, {"refined": (batch * flops.at_steps(plain, steps), statistics.median(refined_times)),
                            "cfg": (batch * flops.at_steps(guided_one, steps), statistics.median(cfg_times))}

    return {
        "batch": batch, "steps": steps, "repeats": case.repeats, "cfg_scale": 7.5,
        "refined_s": [round(t, 4) for t in refined_times], "cfg_s": [round(t, 4) for t in cfg_times],
        "network_calls_refined": f"2 (refiner) + {steps} of batch {batch}",
        "network_calls_cfg": f"{steps} of batch {2 * batch}",
        "ratio_refined_over_cfg": round(ratio, 4), "goal": "<= 0.55", "goal_met": ratio <= 0.55,
        "output_finite": bool(torch.isfinite(out).all()) if out is not None else None,
        "flops": counted(ctx, count),
    }


# --- MSD vs full gradient training steps ---------------------------------------------------------------------

def loss_cost(loss: str, checkpointing: bool, steps: int, batch: int) -> float:
    """Estimated single-sample network calls of one training step (backward ~ 2 forwards)."""
    refiner = 2 + 2  # base + LoRA forward, backward through the LoRA forward
    rollout = steps if loss == "msd" else steps * (4 if checkpointing else 3)
    return (refiner + rollout) * batch


def row_key(loss: str, checkpointing: bool, steps: int | None = None) -> str:
    return f"{loss}{'_ckpt' if checkpointing else ''}" + (f"_N{steps}" if steps is not None else "")


def losses(ctx: Context, case: Case) -> dict:
    from noiserefine.losses import build_loss

    backend, batch = ctx.backend, case.batch
    refiner = ctx.refiner()
    params = refiner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cond, _ = ctx.conditioning(batch)
    noise = ctx.noise(batch, seed=200)  # float32, as the trainer feeds it
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, torch.float16)

    def loss_fn(loss: str, steps: int, checkpointing: bool):
        # the three keys build_loss reads (load_config per step cost ~0.3-0.9 s each on a busy CPU)
        cfg = SimpleNamespace(train=SimpleNamespace(loss=loss, gradient_checkpointing=checkpointing),
                              student=SimpleNamespace(num_steps=steps))
        return build_loss(cfg, backend)

    def step(loss: str, steps: int, checkpointing: bool) -> dict:
        fn = loss_fn(loss, steps, checkpointing)
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        base = ctx.peak_start()
        seconds, value = ctx.time(lambda: training_step(refiner, optimizer, fn, noise, cond, target))
        memory = ctx.peak_gb(base)
        optimizer.zero_grad(set_to_none=True)
        return {"seconds": round(seconds, 4), **memory, "loss_value": value}

    rows: list[dict] = []
    warmups: dict = {}
    figures = {"batch": batch, "lora_rank": refiner.cfg["lora_rank"],
               "trainable_parameters": sum(p.numel() for p in params),
               "lora_dtype": str(params[0].dtype).removeprefix("torch."), "warmup": warmups, "rows": rows}
    for loss, checkpointing in (("msd", False), ("full_gradient", False)):  # kernels, allocator, AdamW state
        result, error = guarded(step, loss, 1, checkpointing)
        warmups[loss] = result["seconds"] if result else error
    oom_at: dict[bool, int] = {}
    failures = []
    for loss, checkpointing, all_steps in case.plan:
        for steps in all_steps:
            optional = steps in case.optional_steps
            row = {"loss": loss, "checkpointing": checkpointing, "steps": steps}
            fits, estimate = ctx.fits(loss_cost(loss, checkpointing, steps, batch) * (1.5 if optional else 1.0))
            if loss == "full_gradient" and checkpointing in oom_at and steps > oom_at[checkpointing]:
                row.update(status="oom", reason=f"not run: out of memory already at N={oom_at[checkpointing]}")
            elif not fits:
                row.update(status="skipped", reason=f"time budget (estimated {estimate:.1f} s, "
                                                     f"{max(ctx.remaining(), 0):.1f} s left)")
            else:
                print(f"  {loss}{' +ckpt' if checkpointing else ''} N={steps} (estimated {estimate:.1f} s)", flush=True)
                result, error = guarded(step, loss, steps, checkpointing)
                if result is not None:
                    row.update(status="ok", **result)
                    if result["seconds"] > 0:  # the estimate follows the latest real training step
                        ctx.unit_s = result["seconds"] / loss_cost(loss, checkpointing, steps, batch)
                elif error["oom"]:
                    row.update(status="oom", error=error)
                    oom_at.setdefault(checkpointing, steps)
                else:
                    row.update(status="failed", error=error)
                    failures.append(row)
            rows.append(row)
            ctx.partial(case, figures)
    summarise_losses(case, figures, rows, oom_at)

    def count():
        """Forward + backward of one sample: ``fixed + N * per_step``. The fixed part (the refiner's forward and
        backward) is the same for every loss: counted with MSD at N = 1, 2; each other loss at N = 1 only."""
        def one(loss, checkpointing, n):
            fn = loss_fn(loss, n, checkpointing)
            value = forward_backward(refiner, fn, noise[:1], first(cond, 1), target[:1])
            optimizer.zero_grad(set_to_none=True)
            return value

        msd = flops.count_linear_in_steps(lambda n: one("msd", False, n))
        linear = {"msd": msd}
        for loss, ckpt, _ in case.plan:
            if row_key(loss, ckpt) not in linear:
                at_one, _ = flops.count(lambda: one(loss, ckpt, 1))
                linear[row_key(loss, ckpt)] = {"fixed": msd["fixed"], "per_step": at_one - msd["fixed"]}
        per_sample = {"refiner_forward_backward": msd["fixed"]}
        per_sample.update({f"{key}_per_step": value["per_step"] for key, value in linear.items()})
        timed = {row_key(r["loss"], r["checkpointing"], r["steps"]):
                 (batch * flops.at_steps(linear[row_key(r["loss"], r["checkpointing"])], r["steps"]), r["seconds"])
                 for r in rows if r["status"] == "ok"}
        return per_sample, timed

    figures["flops"] = counted(ctx, count)
    if failures:
        raise MeasurementError(f"{len(failures)} measurement(s) failed", figures)
    return figures


def summarise_losses(case: Case, figures: dict, rows: list[dict], oom_at: dict[bool, int]) -> None:
    """The goals of the losses case from its rows (memory flat in N, MSD time vs full gradient, OOM N)."""
    def get(loss, checkpointing, steps, key):
        for row in rows:
            if (row["loss"], row["checkpointing"], row["steps"]) == (loss, checkpointing, steps) \
                    and row["status"] == "ok":
                return row.get(key)
        return None

    msd_steps = next((ns for loss, ckpt, ns in case.plan if loss == "msd"), ())
    if not msd_steps:
        return
    lo, hi = min(msd_steps), max(msd_steps)
    msd_lo, msd_hi = get("msd", False, lo, "step_peak_gb"), get("msd", False, hi, "step_peak_gb")
    if msd_lo and msd_hi is not None:
        figures[f"msd_step_peak_ratio_N{hi}_over_N{lo}"] = round(msd_hi / msd_lo, 4)
        figures["msd_memory_goal"] = "<= 1.1"
        figures["msd_memory_goal_met"] = msd_hi / msd_lo <= 1.1
    mid = sorted(msd_steps)[len(msd_steps) // 2]  # 25 (the goal's N); 5 with --tiny
    msd_mid = get("msd", False, mid, "seconds")
    for key, checkpointing in (("full_gradient", False), ("full_gradient_ckpt", True)):
        fg_mid = get("full_gradient", checkpointing, mid, "seconds")
        if msd_mid is not None and fg_mid:
            figures[f"msd_over_{key}_time_N{mid}"] = round(msd_mid / fg_mid, 4)
    best = figures.get(f"msd_over_full_gradient_time_N{mid}", figures.get(f"msd_over_full_gradient_ckpt_time_N{mid}"))
    if best is not None:
        figures["msd_time_goal"] = f"<= 0.5 (vs full gradient at N={mid}; with checkpointing if only that fits)"
        figures["msd_time_goal_met"] = best <= 0.5
    figures["full_gradient_oom_at_N"] = oom_at.get(False)
    figures["full_gradient_ckpt_oom_at_N"] = oom_at.get(True)
    fitted = [r["steps"] for r in rows if r["loss"] == "full_gradient" and not r["checkpointing"] and r["status"] == "ok"]
    figures["full_gradient_max_N_fitted"] = max(fitted) if fitted else None


MEASURES = {"generation": generation, "sampling": sampling, "losses": losses, "levers": levers.levers}
# Rough minimum cost of a case in single-sample network calls (to skip it when it cannot fit at all).
MIN_COST = {"generation": lambda c: c.steps[0] * 3 * c.batch * 2,
            "sampling": lambda c: c.steps[0] * 3 * c.batch,
            "losses": lambda c: loss_cost("msd", False, min(c.plan[0][2]), c.batch) * 3,
            "levers": lambda c: c.steps[0] * 3 * c.batch * 2}
