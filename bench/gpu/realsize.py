"""Real-size cases of ``bench/gpu_check.py`` for ONE model family, run in its own process.

    python bench/gpu/realsize.py --model sd21 --device cuda --deadline EPOCH_S --results FILE.jsonl [--tiny]

Builds the model with ``model.init=random`` (``load_backend``: the published
architecture, RANDOM WEIGHTS; the costs do not depend on the values) in
bfloat16, or with ``--tiny`` a tiny variant of the same architecture files (same
classes and constructor path, small widths) for the CPU smoke run. Then three
cases, each guarded (an exception, CUDA OOM included, is recorded and the next
measurement goes on after ``torch.cuda.empty_cache()``):

- ``<model>_generation`` (a): bare batched denoiser forwards vs teacher CFG+PAG
  target generation (``targets.generate.shard_samples``: one forward of 3B per
  step), ratio ``t_bare / t_generation`` (goal >= 0.9).
- ``<model>_sampling`` (c): refined unguided sampling (refiner forward + N
  unguided steps) vs CFG sampling at equal N = 25, ratio (goal <= 0.55).
- ``<model>_losses`` (b): one training step (refiner forward, loss, backward,
  AdamW step over the LoRA parameters) with MSD, full gradient, and full
  gradient with activation checkpointing at several N: seconds (synchronised,
  after one warm-up) and peak CUDA memory. Goals: MSD peak flat in N (N=50/N=10
  <= 1.1), MSD <= 0.5x full gradient at N = 25; the N where full gradient runs
  out of memory is recorded (OOM is a result, not a failure).

They run in the order a, c, b (b is the long one and the rest of the time goes
to it); a measurement whose estimated cost (from the measured forward time) does
not fit before ``--deadline`` is recorded as skipped. One JSON object per line
goes to ``--results``: ``{"case", "event": "start"}`` when a case starts,
``{"case", "event": "partial", "figures"}`` after each measurement of (b), then
``{"case", "status", "reason", "seconds", "figures", "error"}``, so a process
killed at the deadline still leaves what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow, golden hour",
           "an oil painting of a lighthouse in a storm", "a bowl of ramen, studio lighting",
           "a watercolor map of an imaginary island", "a robot reading a newspaper in a cafe",
           "macro photo of a dragonfly on a leaf", "a cathedral made of glass at night"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backend: str
    architecture: str
    gen_batch: int  # prompts per generation batch (the forward runs 3x this: uncond, cond, PAG-perturbed)
    gen_steps: int  # teacher steps N' per generation batch
    gen_repeats: int
    loss_batch: int  # samples per training step
    msd_steps: tuple[int, ...]
    fg_steps: tuple[int, ...]
    fg_ckpt_steps: tuple[int, ...]
    optional_steps: tuple[int, ...]  # run only if the estimated time leaves room
    sample_batch: int
    sample_steps: int = 25
    sample_repeats: int = 1


MODELS = {
    # Full gradient without checkpointing also at N = 2 and 5: it may run out of memory well below N = 10
    # (then larger N are not tried), and the small N bracket where it does.
    "sd21": ModelSpec("stable_diffusion", "sd21", gen_batch=4, gen_steps=10, gen_repeats=2, loss_batch=4,
                      msd_steps=(10, 25, 50), fg_steps=(2, 5, 10, 25, 50), fg_ckpt_steps=(10, 25, 50),
                      optional_steps=(), sample_batch=4, sample_repeats=2),
    "sdxl": ModelSpec("sdxl", "sdxl", gen_batch=2, gen_steps=10, gen_repeats=1, loss_batch=1,
                      msd_steps=(10, 25, 50), fg_steps=(2, 5, 10, 25), fg_ckpt_steps=(10, 25, 50),
                      optional_steps=(50,), sample_batch=2),
}
# --tiny (CPU smoke run): the same plan with few steps; the figures keep their names, with the N they used.
TINY_STEPS = {2: 1, 5: 2, 10: 3, 25: 5, 50: 10}


def tiny_spec(spec: ModelSpec) -> ModelSpec:
    def small(steps):
        return tuple(TINY_STEPS[n] for n in steps)

    return dataclasses.replace(spec, gen_steps=3, gen_repeats=1, msd_steps=small(spec.msd_steps),
                               fg_steps=small(spec.fg_steps), fg_ckpt_steps=small(spec.fg_ckpt_steps),
                               optional_steps=small(spec.optional_steps), sample_steps=5, sample_repeats=1)
CASES = ("generation", "sampling", "losses")  # execution order; the report lists a, b, c


# --- tiny variants of the shipped architectures (CPU smoke run) ---------------------------------------------

def tiny_architecture(name: str):
    """The shipped architecture ``name`` with tiny widths: same classes, same component set, same scheduler."""
    from noiserefine.backends.random_init import read_architecture

    arch = read_architecture(name)
    configs = {key: dict(value) for key, value in arch.configs.items()}
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    for key in ("text_encoder", "text_encoder_2"):
        if key in configs:
            configs[key].update(text)
    configs["vae"].update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4,
                          sample_size=16)
    unet = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=[2, 4],
                sample_size=8)
    if name == "sdxl":
        unet.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 1],
                    cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    else:
        unet.update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
    configs["unet"].update(unet)
    return dataclasses.replace(arch, name=f"{name}-tiny", configs=configs)


def build_backend(spec: ModelSpec, device: str, dtype: torch.dtype, tiny: bool):
    from noiserefine.backends import load_backend
    from noiserefine.backends.random_init import RandomWeightsWarning, mark_random

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        if not tiny:
            cfg = SimpleNamespace(backend=spec.backend, init="random", architecture=spec.architecture,
                                  device=device, dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
                                  path="", revision="")
            return load_backend(cfg)
        from noiserefine.backends.sdxl import SDXLBackend
        from noiserefine.backends.stable_diffusion import StableDiffusionBackend

        cls = SDXLBackend if spec.backend == "sdxl" else StableDiffusionBackend
        arch = tiny_architecture(spec.architecture)
        # what from_architecture does, with the tiny configs instead of the shipped files
        backend = cls(**cls.random_components(arch, device, dtype), device=device, dtype=dtype,
                      **cls.pipeline_options(arch.pipeline))
        return mark_random(backend, arch)


# --- measurement helpers -----------------------------------------------------------------------------------

def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def error_record(error: BaseException) -> dict:
    return {"type": type(error).__name__, "message": str(error).strip().splitlines()[0][:400] if str(error) else "",
            "oom": is_oom(error)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(fn, *args, **kwargs) -> tuple[object, dict | None]:
    """``(fn(...), None)``, or ``(None, error record)`` after any exception (CUDA OOM included); memory is freed."""
    try:
        return fn(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - every failure is a recorded result
        record = error_record(error)
        if not record["oom"]:
            record["traceback"] = traceback.format_exc(limit=6)[-1500:]
        del error
        free_memory()
        return None, record


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> tuple[float, object]:
        self.sync()
        started = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - started, out


class Results:
    """Appends one JSON line per event to the results file (flushed: survives a kill)."""

    def __init__(self, path: Path, model: str):
        self.path, self.model = path, model

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def start(self, case: str) -> None:
        self.write({"case": f"{self.model}_{case}", "event": "start", "time": time.time()})

    def partial(self, case: str, figures: dict) -> None:
        """What a long case has measured so far (kept if the process is killed before the case ends)."""
        self.write({"case": f"{self.model}_{case}", "event": "partial", "figures": figures})

    def done(self, case: str, status: str, seconds: float, figures: dict, error: dict | None = None,
             reason: str = "") -> None:
        self.write({"case": f"{self.model}_{case}", "status": status, "reason": reason, "seconds": round(seconds, 3),
                    "figures": figures, "error": error})
        print(f"[{self.model}_{case}] {status}{': ' + reason if reason else ''} in {seconds:.1f} s "
              f"{json.dumps(figures, default=str)[:1500]}" + (f" error {error}" if error else ""), flush=True)


class Context:
    def __init__(self, spec: ModelSpec, backend, device: torch.device, deadline: float,
                 results: Results | None = None):
        self.spec, self.backend, self.device, self.deadline = spec, backend, device, deadline
        self.results = results
        self.clock = Clock(device)
        self.unit_s: float | None = None  # seconds per sample-forward (set by the first timing)
        self._refiner = None

    def remaining(self) -> float:
        return self.deadline - time.time()

    def fits(self, sample_forwards: float, margin: float = 2.0) -> tuple[bool, float]:
        """Does work of ``sample_forwards`` single-sample network calls fit before the deadline (30 % slack)?"""
        estimate = (self.unit_s or 0.0) * sample_forwards
        return 1.3 * estimate + margin < self.remaining(), estimate

    def partial(self, case: str, figures: dict) -> None:
        if self.results is not None:
            self.results.partial(case, figures)

    def peak_start(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_gb(self, base: int) -> dict:
        if self.device.type != "cuda":
            return {"peak_gb": None, "step_peak_gb": None}
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"peak_gb": round(peak / 2**30, 3), "step_peak_gb": round((peak - base) / 2**30, 3)}

    def conditioning(self, batch: int):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        return self.backend.encode_prompts(prompts), self.backend.null_conditioning(batch)

    def noise(self, batch: int, seed: int = 0) -> torch.Tensor:
        from noiserefine.noise import noise_from_seeds

        return noise_from_seeds(range(seed, seed + batch), self.backend.latent_shape).to(self.device)

    def refiner(self):
        if self._refiner is None:
            from noiserefine.config import load_config
            from noiserefine.refiner import Refiner

            torch.manual_seed(0)
            self._refiner = Refiner(self.backend, load_config().refiner)
        return self._refiner


# --- (a) generation vs bare forwards -----------------------------------------------------------------------

def case_generation(ctx: Context) -> dict:
    from noiserefine.backends.base import cat_conditioning
    from noiserefine.guidance import PipelinePAG
    from noiserefine.sampling import make_scheduler
    from noiserefine.targets.generate import shard_samples
    from noiserefine.targets.plan import PlannedSample

    spec, backend = ctx.spec, ctx.backend
    batch, steps = spec.gen_batch, spec.gen_steps
    guidance = PipelinePAG(guidance_scale=7.5, perturbed_guidance_scale=3.0, pag_layers=["mid"])
    samples = [PlannedSample(i, 1000 + i, PROMPTS[i % len(PROMPTS)], "bench") for i in range(batch)]

    def generation():
        out = list(shard_samples(backend, samples, guidance=guidance, num_steps=steps, teacher_key="gpu-check",
                                 batch_size=batch, target_dtype="float16"))
        assert len(out) == batch
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

    warm, out = ctx.clock.time(generation)
    targets = torch.stack([torch.from_numpy(s.arrays["target"]) for s in out]).float()
    finite = bool(torch.isfinite(targets).all())
    ctx.unit_s = warm / (steps * 3 * batch)  # first estimate (includes warm-up: pessimistic)
    bare_times, gen_times = [], []
    for _ in range(spec.gen_repeats):
        bare_times.append(ctx.clock.time(bare)[0])
        gen_times.append(ctx.clock.time(generation)[0])
    ctx.unit_s = statistics.median(bare_times) / (steps * 3 * batch)
    ratios = [b / g for b, g in zip(bare_times, gen_times)]
    ratio = statistics.median(ratios)
    return {
        "batch": batch, "forward_batch": 3 * batch, "teacher_steps": steps, "guidance": "cfg_pag (w 7.5, pag 3.0, mid)",
        "repeats": spec.gen_repeats, "warmup_s": round(warm, 3),
        "bare_s": [round(t, 4) for t in bare_times], "generation_s": [round(t, 4) for t in gen_times],
        "bare_samples_per_s": round(batch / statistics.median(bare_times), 3),
        "generation_samples_per_s": round(batch / statistics.median(gen_times), 3),
        "ratio_bare_over_generation": round(ratio, 4), "goal": ">= 0.9", "goal_met": ratio >= 0.9,
        "targets_finite": finite, "seconds_per_sample_forward": round(ctx.unit_s, 6),
    }


# --- (c) refined unguided sampling vs CFG ------------------------------------------------------------------

def case_sampling(ctx: Context) -> dict:
    from diffusers.guiders import ClassifierFreeGuidance

    from noiserefine.sampling import rollout

    spec, backend = ctx.spec, ctx.backend
    batch, steps = spec.sample_batch, spec.sample_steps
    refiner = ctx.refiner()
    cond, null = ctx.conditioning(batch)
    noise = ctx.noise(batch, seed=100)
    cfg = ClassifierFreeGuidance(guidance_scale=7.5)

    def refined(n):
        with torch.no_grad():
            return rollout(backend, refiner(noise, cond), cond, n)

    def guided(n):
        with torch.no_grad():
            return rollout(backend, noise, cond, n, cfg, null)

    for fn in (refined, guided):  # warm-up (kernels, LoRA path)
        ctx.clock.time(lambda: fn(2))
    refined_times, cfg_times = [], []
    out = None
    for _ in range(spec.sample_repeats):
        cfg_times.append(ctx.clock.time(lambda: guided(steps))[0])
        seconds, out = ctx.clock.time(lambda: refined(steps))
        refined_times.append(seconds)
    ratio = statistics.median(r / c for r, c in zip(refined_times, cfg_times))
    if ctx.unit_s is None:
        ctx.unit_s = statistics.median(cfg_times) / (steps * 2 * batch)
    return {
        "batch": batch, "steps": steps, "repeats": spec.sample_repeats, "cfg_scale": 7.5,
        "refined_s": [round(t, 4) for t in refined_times], "cfg_s": [round(t, 4) for t in cfg_times],
        "network_calls_refined": f"2 (refiner) + {steps} of batch {batch}",
        "network_calls_cfg": f"{steps} of batch {2 * batch}",
        "ratio_refined_over_cfg": round(ratio, 4), "goal": "<= 0.55", "goal_met": ratio <= 0.55,
        "output_finite": bool(torch.isfinite(out).all()) if out is not None else None,
    }


# --- (b) MSD vs full gradient training steps ---------------------------------------------------------------

def loss_cost(loss: str, checkpointing: bool, steps: int, batch: int) -> float:
    """Estimated single-sample network calls of one training step (backward ~ 2 forwards)."""
    refiner = 2 + 2  # base + LoRA forward, backward through the LoRA forward
    if loss == "msd":
        rollout = steps
    else:
        rollout = steps * (4 if checkpointing else 3)
    return (refiner + rollout) * batch


def case_losses(ctx: Context) -> dict:
    from noiserefine.config import load_config
    from noiserefine.losses import build_loss

    spec, backend = ctx.spec, ctx.backend
    batch = spec.loss_batch
    refiner = ctx.refiner()
    params = refiner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cond, _ = ctx.conditioning(batch)
    noise = ctx.noise(batch, seed=200)  # float32, as the trainer feeds it
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device, torch.float16)

    def step(loss: str, steps: int, checkpointing: bool) -> dict:
        cfg = load_config(overrides=[f"train.loss={loss}", f"student.num_steps={steps}",
                                     f"train.gradient_checkpointing={str(checkpointing).lower()}"])
        loss_fn = build_loss(cfg, backend)
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        base = ctx.peak_start()

        def run():
            value, _ = loss_fn(refiner(noise, cond), cond, target)
            value.backward()
            optimizer.step()
            return float(value.detach())

        seconds, value = ctx.clock.time(run)
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
    plan = [("msd", False, n, n in spec.optional_steps) for n in spec.msd_steps]
    plan += [("full_gradient", False, n, n in spec.optional_steps) for n in spec.fg_steps]
    plan += [("full_gradient", True, n, n in spec.optional_steps) for n in spec.fg_ckpt_steps]
    oom_at: dict[bool, int] = {}
    failures = []
    for loss, checkpointing, steps, optional in plan:
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
        ctx.partial("losses", figures)

    def get(loss, checkpointing, steps, key):
        for row in rows:
            if (row["loss"], row["checkpointing"], row["steps"]) == (loss, checkpointing, steps) \
                    and row["status"] == "ok":
                return row.get(key)
        return None

    lo, hi = min(spec.msd_steps), max(spec.msd_steps)
    msd_lo, msd_hi = get("msd", False, lo, "step_peak_gb"), get("msd", False, hi, "step_peak_gb")
    if msd_lo and msd_hi is not None:
        figures[f"msd_step_peak_ratio_N{hi}_over_N{lo}"] = round(msd_hi / msd_lo, 4)
        figures["msd_memory_goal"] = "<= 1.1"
        figures["msd_memory_goal_met"] = msd_hi / msd_lo <= 1.1
    mid = sorted(spec.msd_steps)[len(spec.msd_steps) // 2]  # 25 (the goal's N); 5 with --tiny
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
    if failures:
        raise MeasurementError(f"{len(failures)} measurement(s) failed", figures)
    return figures


class MeasurementError(RuntimeError):
    """Some measurements of a case failed (not OOM); the figures of the others are kept."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


CASE_FUNCTIONS = {"generation": case_generation, "sampling": case_sampling, "losses": case_losses}
# Rough minimum cost of a case in single-sample network calls (to skip it when it cannot fit at all).
MIN_COST = {"generation": lambda s: s.gen_steps * 3 * s.gen_batch * 2,
            "sampling": lambda s: s.sample_steps * 3 * s.sample_batch,
            "losses": lambda s: loss_cost("msd", False, min(s.msd_steps), s.loss_batch) * 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths of the same architecture (CPU smoke run)")
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds: skip what does not fit")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sample-batch", type=int, default=0, help="override the sampling case's batch")
    args = parser.parse_args(argv)
    spec, results = MODELS[args.model], Results(args.results, args.model)
    if args.tiny:
        spec = tiny_spec(spec)
    if args.sample_batch:
        spec = dataclasses.replace(spec, sample_batch=args.sample_batch)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    # bfloat16 on the GPU; float32 on the CPU (CPU bfloat16 kernels are erratically slow there)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [c for c in CASES if c in args.cases.split(",")]

    started = time.perf_counter()
    backend, error = guarded(build_backend, spec, str(device), dtype, args.tiny)
    build_s = time.perf_counter() - started
    build = {"build_s": round(build_s, 2), "architecture": f"{spec.architecture}{' (tiny)' if args.tiny else ''}",
             "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    if backend is not None:
        build.update(latent_shape=list(backend.latent_shape), weights=backend.weights,
                     denoiser_parameters=sum(p.numel() for p in backend.denoiser.parameters()))
        if device.type == "cuda":
            build["model_memory_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    print(f"[{args.model}] built: {build}" + (f" error {error}" if error else ""), flush=True)
    ctx = Context(spec, backend, device, args.deadline, results) if backend is not None else None
    for case in cases:
        results.start(case)
        if ctx is None:
            results.done(case, "failed", 0.0, {"build": build}, error, reason="model build failed")
            continue
        fits, estimate = ctx.fits(MIN_COST[case](spec))
        if ctx.remaining() <= 0 or not fits:
            results.done(case, "skipped", 0.0, {"estimated_s": round(estimate, 1)}, reason="time budget")
            continue
        case_started = time.perf_counter()
        figures, error = None, None
        try:
            figures = CASE_FUNCTIONS[case](ctx)
        except MeasurementError as failure:
            figures, error = failure.figures, error_record(failure)
        except Exception as failure:  # noqa: BLE001
            error = error_record(failure)
            error["traceback"] = traceback.format_exc(limit=8)[-2000:]
        free_memory()
        seconds = time.perf_counter() - case_started
        figures = {**(figures or {}), "build": build}
        results.done(case, "failed" if error else "ok", seconds, figures, error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
