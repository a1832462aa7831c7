"""Speed levers (``performance.*`` in the config; README "Performance"), applied in this one place.

Every lever is off by default until measured on a GPU (``bench/gpu_check.py --cases sd21_levers``). None changes
results beyond float rounding (each has a CPU equivalence test in ``tests/test_performance.py``):

- ``compile``: ``nn.Module.compile(mode=...)`` of the denoiser, in place (the backend keeps its module, its
  config and its PEFT adapters). ``reduce-overhead`` and ``max-autotune`` capture CUDA graphs: CUDA only.
- ``channels_last``: the denoiser's weights and its image input in channels-last memory format (NHWC convs).
- ``sdpa_backend``: the attention kernel (``torch.nn.attention.sdpa_kernel``); ``efficient``/``cudnn``: CUDA only.
- ``autocast``: ``bfloat16`` runs the denoiser under ``torch.autocast`` with float32 weights (``model.dtype``
  float32) -- the alternative to bf16 weights (``model.dtype=bfloat16``).
- ``refiner_micro_batch``: :func:`refine_in_micro_batches`.

:func:`apply_levers` is called where a denoiser is made ready for work: the teacher job's worker, the trainer
(after the refiner's LoRA is attached, so the compiled graph includes it) and ``python -m noiserefine.sample``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
# torch.nn.attention.SDPBackend members by config value ("" = torch picks)
SDPA_BACKENDS = {"": None, "math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
CUDA_ONLY_SDPA = ("efficient", "cudnn")  # torch has no CPU kernel for these
AUTOCAST_DTYPES = ("", "bfloat16")
APPLIED = "_noiserefine_levers"  # attribute of a denoiser the levers were applied to


@dataclass
class PerformanceConfig:
    """The config's ``performance`` section (config.py). Levers change speed and memory, not results (equal
    within float rounding), so a resumed training run may change them (not compared with its checkpoint; the
    teacher's are pinned per cache).
    Imports nothing heavy: config.py loads it."""

    compile: str = ""  # "" off | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    channels_last: bool = False  # the denoiser's convolutions in channels-last (NHWC) memory format
    sdpa_backend: str = ""  # "" torch picks | math | flash | efficient | cudnn (efficient, cudnn: CUDA only)
    autocast: str = ""  # "" off | bfloat16: float32 weights (model.dtype=float32) under torch.autocast
    # 0 off | n: the refiner's forward/backward in checkpointed chunks of n samples, so the per-rank batch (the
    # MSD rollout's no-grad batch) can exceed what the refiner's backward fits (costs one more refiner forward)
    refiner_micro_batch: int = 0


# The levers a teacher job runs with (they change target bits: pinned per cache, targets/cache.py); the refiner's
# micro-batch is the trainer's alone.
TEACHER_LEVERS = ("compile", "channels_last", "sdpa_backend", "autocast")


def teacher_levers(cfg) -> dict:
    return {key: cfg.performance[key] for key in TEACHER_LEVERS}


class LeverError(ValueError):
    """A lever value that cannot run here; ``key``: the config key at fault (``performance.<name>``)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def check_levers(perf, device_type: str, model_dtype: str) -> None:
    """Refuse (:class:`LeverError` naming the key) a value that is unknown or cannot run on ``device_type``
    with weights of ``model_dtype``. Called by the config checks and again by :func:`apply_levers`."""
    choices = {"compile": COMPILE_MODES, "sdpa_backend": tuple(SDPA_BACKENDS), "autocast": AUTOCAST_DTYPES}
    for name, allowed in choices.items():
        if getattr(perf, name) not in allowed:
            raise LeverError(f"config key 'performance.{name}' is {getattr(perf, name)!r}; expected one of "
                             f"{allowed}", f"performance.{name}")
    if int(perf.refiner_micro_batch) < 0:
        raise LeverError(f"config key 'performance.refiner_micro_batch' must be >= 0 (0 = off), got "
                         f"{perf.refiner_micro_batch}", "performance.refiner_micro_batch")
    if device_type != "cuda" and perf.compile in CUDA_GRAPH_MODES:
        raise LeverError(f"config key 'performance.compile' is {perf.compile!r}, which captures CUDA graphs: it needs "
                         f"a CUDA device (the model runs on {device_type}); use 'default' or "
                         "'max-autotune-no-cudagraphs'", "performance.compile")
    if device_type != "cuda" and perf.sdpa_backend in CUDA_ONLY_SDPA:
        raise LeverError(f"config key 'performance.sdpa_backend' is {perf.sdpa_backend!r}, a CUDA-only attention "
                         f"kernel (the model runs on {device_type}); use 'math', 'flash' or ''",
                         "performance.sdpa_backend")
    if perf.autocast and model_dtype != "float32":
        raise LeverError(f"config key 'performance.autocast' is {perf.autocast!r} but model.dtype is {model_dtype}: "
                         "autocast is the alternative to low-precision weights; set model.dtype=float32",
                         "performance.autocast")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def apply_levers(backend, perf) -> dict:
    """Apply ``perf`` (the config's ``performance`` section) to ``backend.denoiser`` in place; returns what was
    applied. Twice on one denoiser is refused (a second compile or wrapper would stack)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    denoiser, device = backend.denoiser, torch.device(backend.device)
    check_levers(perf, device.type, _dtype_name(backend.dtype))
    if getattr(denoiser, APPLIED, None) is not None:
        raise RuntimeError(f"speed levers were already applied to this denoiser ({getattr(denoiser, APPLIED)})")
    applied = {"compile": perf.compile, "channels_last": bool(perf.channels_last),
               "sdpa_backend": perf.sdpa_backend, "autocast": perf.autocast,
               "refiner_micro_batch": int(perf.refiner_micro_batch)}
    if perf.channels_last:
        denoiser.to(memory_format=torch.channels_last)  # 4-D (conv) weights only; others are unchanged
    contexts = []
    if perf.sdpa_backend:
        contexts.append(functools.partial(sdpa_kernel, getattr(SDPBackend, SDPA_BACKENDS[perf.sdpa_backend])))
    if perf.autocast:
        contexts.append(functools.partial(torch.autocast, device.type, dtype=getattr(torch, perf.autocast)))
    if contexts or perf.channels_last:
        _wrap_forward(denoiser, contexts, bool(perf.channels_last))
    if perf.compile:
        denoiser.compile(mode=None if perf.compile == "default" else perf.compile)
    setattr(denoiser, APPLIED, applied)
    return applied


def _wrap_forward(module: torch.nn.Module, contexts: list, channels_last: bool) -> None:
    """The module's own ``forward`` runs inside ``contexts``, its 4-D first input in channels-last format. An
    instance attribute, so every caller (``backend.denoise``, PAG hooks, a later ``compile``) goes through it."""
    import torch

    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if channels_last:
            args, kwargs = _image_channels_last(args, kwargs)
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context())
            return inner(*args, **kwargs)

    module.forward = forward


def _image_channels_last(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The image input (first positional, else ``sample=`` / ``hidden_states=`` as SD3 passes it), if 4-D."""
    import torch

    def convert(x):
        return x.contiguous(memory_format=torch.channels_last) if torch.is_tensor(x) and x.ndim == 4 else x

    if args:
        return (convert(args[0]), *args[1:]), kwargs
    return args, {key: convert(value) if key in ("sample", "hidden_states") else value
                  for key, value in kwargs.items()}


def refine_in_micro_batches(refine, noise, cond: dict, guidance_scale, size: int):
    """``refine(noise, cond, guidance_scale=...)`` in chunks of ``size`` samples, each under activation
    checkpointing; ``size`` 0 (or >= the batch) is one plain call.

    Why: the refiner's forward keeps its activations for backward; the MSD student rollout after it runs without
    gradients and needs far less memory per sample. Checkpointed chunks keep only their inputs in the forward and
    recompute one chunk at a time in backward, so the per-rank batch -- the rollout's batch -- can be larger than
    the refiner's backward fits. Cost: one more refiner forward per sample. Same values and gradients (tested).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    batch = noise.shape[0]
    if size <= 0 or batch <= size:
        return refine(noise, cond, guidance_scale=guidance_scale)
    per_sample = torch.is_tensor(guidance_scale) and guidance_scale.ndim > 0
    pieces = []
    for start in range(0, batch, size):
        part = slice(start, start + size)
        scale = guidance_scale[part] if per_sample else guidance_scale
        pieces.append(checkpoint(lambda n, c, s: refine(n, c, guidance_scale=s), noise[part],
                                 {key: value[part] for key, value in cond.items()}, scale, use_reentrant=False))
    return torch.cat(pieces)
