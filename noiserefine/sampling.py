"""Deterministic rollouts (DDIM eta=0, Euler, Euler flow matching), guidance, affine coefficients.

A sampler step is affine in the sample once the network output is held fixed:
``x_prev = a_t * x_t + b_t * model_out``. ``a_t`` is read off the scheduler
itself by stepping with model output 0 and sample 1, and ``K = sigma_init *
prod_t a_t`` is the Jacobian of the whole rollout with respect to the initial
noise when every network output is frozen (the MSD gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .backends.base import Backend, Conditioning, cat_conditioning

# Single-step schedulers whose step is affine in (sample, model output). Multistep
# solvers (DPM++, UniPC, ...) mix earlier outputs and break the MSD Jacobian.
AFFINE_SCHEDULERS = (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)


@dataclass(frozen=True)
class Guidance:
    """``none``; ``cfg``: eps_u + w (eps_c - eps_u); ``cfg_pag``: adds s (eps_c - eps_perturbed)."""

    kind: str = "none"
    scale: float = 1.0
    pag_scale: float = 0.0
    pag_layers: tuple[str, ...] = ("mid",)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "cfg", "cfg_pag"):
            raise ValueError(f"guidance kind must be none, cfg or cfg_pag, got {self.kind!r}")

    @classmethod
    def from_teacher(cls, teacher) -> "Guidance":
        return cls(kind=teacher.guidance, scale=float(teacher.guidance_scale),
                   pag_scale=float(teacher.pag_scale), pag_layers=tuple(teacher.pag_layers))

    @property
    def num_branches(self) -> int:
        """Network evaluations per sample per step."""
        return {"none": 1, "cfg": 2, "cfg_pag": 3}[self.kind]


UNGUIDED = Guidance()


def make_scheduler(backend: Backend, num_steps: int) -> SchedulerMixin:
    """A fresh scheduler of the backend's config with ``num_steps`` timesteps set."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = backend.make_scheduler()
    if not isinstance(scheduler, AFFINE_SCHEDULERS):
        raise ValueError(f"scheduler {type(scheduler).__name__} is not a deterministic single-step "
                         f"sampler; use one of {[c.__name__ for c in AFFINE_SCHEDULERS]}")
    for flag in ("clip_sample", "thresholding"):
        if scheduler.config.get(flag, False):
            raise ValueError(f"scheduler config '{flag}' is on; it makes the step non-affine "
                             "(MSD needs it off)")
    if isinstance(scheduler, DDIMScheduler) and scheduler.config.get("eta", 0.0):
        raise ValueError("DDIM eta must be 0")
    scheduler.set_timesteps(num_steps, device=backend.device)
    return scheduler


@contextlib.contextmanager
def pag_processors(backend: Backend, layers: tuple[str, ...]) -> Iterator[None]:
    """Install diffusers' PAG+CFG identity-attention processors; always restore the originals."""
    modules = backend.pag_attention_modules(layers)
    originals = {name: module.processor for name, module in modules.items()}
    processor = PAGCFGIdentitySelfAttnProcessor2_0()
    try:
        for module in modules.values():
            module.set_processor(processor)
        yield
    finally:
        for name, module in modules.items():
            module.set_processor(originals[name])


def guided_output(backend: Backend, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                  null_cond: Conditioning | None, guidance: Guidance) -> torch.Tensor:
    """One guided network output from one batched forward ([uncond, cond] or [uncond, cond, cond]).

    For ``cfg_pag`` the caller must hold :func:`pag_processors` around this call.
    """
    if guidance.kind == "none":
        return backend.denoise(x_t, t, cond)
    branches = guidance.num_branches
    batch = torch.cat([x_t] * branches)
    conds = cat_conditioning([null_cond] + [cond] * (branches - 1))
    outputs = backend.denoise(batch, t, conds).chunk(branches)
    uncond, conditional = outputs[0], outputs[1]
    guided = uncond + guidance.scale * (conditional - uncond)
    if guidance.kind == "cfg_pag":
        guided = guided + guidance.pag_scale * (conditional - outputs[2])
    channels = backend.guided_channels
    if channels is not None:  # SiT guides only the first channels
        guided = torch.cat([guided[:, :channels], conditional[:, channels:]], dim=1)
    return guided


def rollout(backend: Backend, noise: torch.Tensor, cond: Conditioning, num_steps: int,
            guidance: Guidance = UNGUIDED, null_cond: Conditioning | None = None,
            checkpoint_steps: bool = False) -> torch.Tensor:
    """Sample ``x_0`` from ``noise`` (``x_T``, unit variance) in ``num_steps`` deterministic steps.

    Gradients flow if the caller has them enabled (the full-gradient loss);
    ``checkpoint_steps`` recomputes each network call in backward to save memory.
    The scheduler's ``init_noise_sigma`` is applied here exactly once.
    """
    if guidance.kind != "none" and null_cond is None:
        null_cond = backend.null_conditioning(noise.shape[0])
    scheduler = make_scheduler(backend, num_steps)
    latents = noise * initial_sigma(scheduler)
    pag = pag_processors(backend, guidance.pag_layers) if guidance.kind == "cfg_pag" \
        else contextlib.nullcontext()
    with pag:
        for t in scheduler.timesteps:
            model_in = scale_model_input(scheduler, latents, t)
            if checkpoint_steps and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(
                    guided_output, backend, model_in, t, cond, null_cond, guidance, use_reentrant=False)
            else:
                out = guided_output(backend, model_in, t, cond, null_cond, guidance)
            latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def initial_sigma(scheduler: SchedulerMixin) -> float:
    """Standard deviation of ``x_T`` the scheduler expects (1 for DDIM and flow matching)."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def scale_model_input(scheduler: SchedulerMixin, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network input at ``t`` (Euler/Karras schedulers rescale it; flow matching has no such step)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def affine_coefficients(backend: Backend, num_steps: int) -> torch.Tensor:
    """``a_t`` for every step of an ``num_steps`` rollout: step(model_out=0, sample=1).

    Stepped in order on one fresh scheduler, since some schedulers keep a step index.
    Returned in float64 on the CPU.
    """
    scheduler = make_scheduler(backend, num_steps)
    one = torch.ones((1,), dtype=torch.float64)
    coefficients = []
    for t in scheduler.timesteps:
        # scale_model_input only scales the *network input*; with the output frozen it
        # does not enter a_t, but Euler schedulers warn if it was not called.
        scale_model_input(scheduler, one, t)
        coefficients.append(scheduler.step(torch.zeros_like(one), t, one, return_dict=False)[0].item())
    return torch.tensor(coefficients, dtype=torch.float64)


def rollout_gain(backend: Backend, num_steps: int) -> float:
    """``K = init_noise_sigma * prod_t a_t`` = d x_0 / d x_T with all network outputs frozen."""
    scheduler = make_scheduler(backend, num_steps)
    return initial_sigma(scheduler) * float(affine_coefficients(backend, num_steps).prod())
