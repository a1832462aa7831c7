"""Real-size models with random weights: build, measuring context, and the process that runs one family's cases.

    python -m bench.gpu.realsize --cases sd21_generation,sd21_losses --device cuda --deadline EPOCH_S \\
        --results FILE.jsonl [--tiny]

``build_backend`` builds an architecture of ``noiserefine/backends/architectures`` with ``model.init=random``
(``load_backend``: the published architecture, RANDOM WEIGHTS; the costs do not depend on the values), or with
``tiny`` a tiny variant of the same classes (small widths) for CPU smoke runs. ``bench/bench_real_size.py`` and
the GPU check (``bench/gpu_check.py``) both build and measure through this module and ``bench/gpu/measure.py``.

As a process it builds one family once and runs the named cases (declared in ``bench/gpu/cases.py``, all of one
family) in the order generation, sampling, losses; a case whose estimated cost does not fit before
``--deadline`` is recorded as skipped. One JSON object per line goes to ``--results``: ``{"case", "event":
"start"}``, ``{"case", "event": "partial", "figures"}`` during the losses case, then ``{"case", "status",
"reason", "seconds", "figures", "error"}``, so a process killed at the deadline still leaves what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
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

from noiserefine import flops  # noqa: E402
from bench.gpu.cases import MEASURE_ORDER, Case, resolve  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow, golden hour",
           "an oil painting of a lighthouse in a storm", "a bowl of ramen, studio lighting",
           "a watercolor map of an imaginary island", "a robot reading a newspaper in a cafe",
           "macro photo of a dragonfly on a leaf", "a cathedral made of glass at night"]


# --- building ------------------------------------------------------------------------------------------------

def tiny_architecture(name: str):
    """The shipped architecture ``name`` with tiny widths: same classes, same component set, same scheduler."""
    from noiserefine.backends.random_init import read_architecture

    arch = read_architecture(name)
    if name not in ("sd21", "sdxl"):
        raise ValueError(f"tiny variant of architecture {name!r}: only sd21 and sdxl have one")
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


def build_backend(architecture: str, device: str, dtype: torch.dtype, tiny: bool = False):
    """``architecture`` with random weights on ``device`` in ``dtype`` (tiny widths with ``tiny``)."""
    from noiserefine.backends import load_backend
    from noiserefine.backends.random_init import RandomWeightsWarning, mark_random, read_architecture

    arch = read_architecture(architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        if not tiny:
            cfg = SimpleNamespace(backend=arch.backend, init="random", architecture=architecture, device=device,
                                  dtype=str(dtype).removeprefix("torch."), path="", revision="")
            return load_backend(cfg)
        from noiserefine.backends.sdxl import SDXLBackend
        from noiserefine.backends.stable_diffusion import StableDiffusionBackend

        cls = SDXLBackend if arch.backend == "sdxl" else StableDiffusionBackend
        arch = tiny_architecture(architecture)
        # what from_architecture does, with the tiny configs instead of the shipped files
        backend = cls(**cls.random_components(arch, device, dtype), device=device, dtype=dtype,
                      **cls.pipeline_options(arch.pipeline))
        return mark_random(backend, arch)


# --- measuring -----------------------------------------------------------------------------------------------

def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def error_record(error: BaseException) -> dict:
    message = str(error).strip()
    return {"type": type(error).__name__, "message": message.splitlines()[0][:400] if message else "",
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


class MeasurementError(RuntimeError):
    """Some measurements of a case failed (not OOM); the figures of the others are kept."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


class Context:
    """One built model on one device, with a clock, a deadline and a time estimate per sample-forward."""

    def __init__(self, backend, device: torch.device, deadline: float, results=None):
        self.backend, self.device, self.deadline, self.results = backend, device, deadline, results
        self.cuda = device.type == "cuda"
        self.unit_s: float | None = None  # seconds per single-sample network call (set by the first timing)
        self._refiner = None
        self._peak: dict | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> tuple[float, object]:
        """``(seconds, fn())``, synchronised on CUDA."""
        self.sync()
        started = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - started, out

    def remaining(self) -> float:
        return self.deadline - time.time()

    def fits(self, sample_forwards: float, margin: float = 2.0) -> tuple[bool, float]:
        """Does work of ``sample_forwards`` single-sample network calls fit before the deadline (30 % slack)?"""
        estimate = (self.unit_s or 0.0) * sample_forwards
        return 1.3 * estimate + margin < self.remaining(), estimate

    def partial(self, case: Case, figures: dict) -> None:
        if self.results is not None:
            self.results.write({"case": case.name, "event": "partial", "figures": figures})

    def peak_start(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_gb(self, base: int) -> dict:
        if not self.cuda:
            return {"peak_gb": None, "step_peak_gb": None}
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"peak_gb": round(peak / 2**30, 3), "step_peak_gb": round((peak - base) / 2**30, 3)}

    def device_peak(self) -> dict:
        """The device's peak FLOP/s (datasheet, or measured on the CPU), measured once."""
        if self._peak is None:
            self._peak = flops.device_peak(self.device, self.backend.dtype)
        return self._peak

    def conditioning(self, batch: int):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        return self.backend.encode_prompts(prompts), self.backend.null_conditioning(batch)

    def noise(self, batch: int, seed: int = 0) -> torch.Tensor:
        from noiserefine.noise import noise_from_seeds

        return noise_from_seeds(range(seed, seed + batch), self.backend.latent_shape).to(self.device)

    def refiner(self):
        """The default refiner (``refiner`` config: LoRA rank 8), built once with seed 0."""
        if self._refiner is None:
            from noiserefine.config import load_config
            from noiserefine.refiner import Refiner

            torch.manual_seed(0)
            self._refiner = Refiner(self.backend, load_config().refiner)
        return self._refiner


# --- the per-family process ----------------------------------------------------------------------------------

class Results:
    """Appends one JSON line per event to the results file (flushed: survives a kill)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def done(self, case: Case, status: str, seconds: float, figures: dict, error: dict | None = None,
             reason: str = "") -> None:
        self.write({"case": case.name, "status": status, "reason": reason, "seconds": round(seconds, 3),
                    "figures": figures, "error": error})
        print(f"[{case.name}] {status}{': ' + reason if reason else ''} in {seconds:.1f} s "
              f"{json.dumps(figures, default=str)[:1500]}" + (f" error {error}" if error else ""), flush=True)


def build_figures(backend, device: torch.device, dtype: torch.dtype, family: str, tiny: bool, build_s: float) -> dict:
    build = {"build_s": round(build_s, 2), "architecture": f"{family}{' (tiny)' if tiny else ''}",
             "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    if backend is not None:
        build.update(latent_shape=list(backend.latent_shape), weights=backend.weights,
                     denoiser_parameters=sum(p.numel() for p in backend.denoiser.parameters()))
        if device.type == "cuda":
            build["model_memory_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    return build


def run_family(cases: list[Case], device: torch.device, deadline: float, results: Results, tiny: bool) -> None:
    from bench.gpu import measure

    families = {case.family for case in cases}
    if len(families) != 1 or any(case.runner != "realsize" for case in cases):
        raise ValueError(f"one process runs the real-size cases of one family, got {[c.name for c in cases]}")
    family = families.pop()
    # bfloat16 on the GPU; float32 on the CPU (CPU bfloat16 kernels are erratically slow there)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    backend, error = guarded(build_backend, family, str(device), dtype, tiny)
    build = build_figures(backend, device, dtype, family, tiny, time.perf_counter() - started)
    print(f"[{family}] built: {build}" + (f" error {error}" if error else ""), flush=True)
    ctx = Context(backend, device, deadline, results) if backend is not None else None
    for case in sorted(cases, key=lambda c: MEASURE_ORDER.index(c.measure)):
        results.write({"case": case.name, "event": "start", "time": time.time()})
        if ctx is None:
            results.done(case, "failed", 0.0, {"build": build}, error, reason="model build failed")
            continue
        fits, estimate = ctx.fits(measure.MIN_COST[case.measure](case))
        if ctx.remaining() <= 0 or not fits:
            results.done(case, "skipped", 0.0, {"estimated_s": round(estimate, 1)}, reason="time budget")
            continue
        case_started = time.perf_counter()
        figures, failure = None, None
        try:
            figures = measure.MEASURES[case.measure](ctx, case)
        except MeasurementError as partly:
            figures, failure = partly.figures, error_record(partly)
        except Exception as crash:  # noqa: BLE001
            failure = error_record(crash)
            failure["traceback"] = traceback.format_exc(limit=8)[-2000:]
        free_memory()
        results.done(case, "failed" if failure else "ok", time.perf_counter() - case_started,
                     {**(figures or {}), "build": build}, failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", required=True, help="comma list of declared real-size cases of one family")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths of the same architecture (CPU smoke run)")
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds: skip what does not fit")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--sample-batch", type=int, default=0, help="override the sampling case's batch")
    args = parser.parse_args(argv)
    cases = resolve(args.cases.split(","), args.tiny)
    if args.sample_batch:
        cases = [dataclasses.replace(c, batch=args.sample_batch) if c.measure == "sampling" else c for c in cases]
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    run_family(cases, device, args.deadline, Results(args.results), args.tiny)
    return 0


if __name__ == "__main__":
    # Run as bench.gpu.realsize, the module bench/gpu/measure.py imports: one MeasurementError class, not two.
    from bench.gpu import realsize

    sys.exit(realsize.main())
