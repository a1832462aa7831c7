"""Deterministic rollouts (DDIM eta=0, Euler, Euler flow matching), guided by a diffusers guider; affine coefficients.

A sampler step is affine in the sample once the network output is held fixed:
``x_prev = a_t * x_t + b_t * model_out``. ``a_t`` is read off the scheduler
itself by stepping with model output 0 and sample 1, and ``K = sigma_init *
prod_t a_t`` is the Jacobian of the whole rollout with respect to the initial
noise when every network output is frozen (the MSD gradient).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.guiders import BaseGuidance
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .backends.base import Backend, Conditioning, cat_conditioning
from .guidance import _ID, PipelinePAG, capture_branch, per_branch_forwards, perturbs_model

# Single-step schedulers whose step is affine in (sample, model output). Multistep
# solvers (DPM++, UniPC, ...) mix earlier outputs and break the MSD Jacobian.
AFFINE_SCHEDULERS = (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)


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


def bind(guider: BaseGuidance | None, backend: Backend) -> None:
    """Resolve what a guider needs from the backend (PipelinePAG: the PAG layers, matched exactly)."""
    if isinstance(guider, PipelinePAG):
        guider.bind(list(backend.pag_attention_modules(guider.pag_layers)), backend.denoiser)


def _denoise_branches(backend: Backend, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      branch_hooks: list[dict]) -> torch.Tensor:
    """One denoiser call over all branches, each perturbed module running its branch's hooked forward."""
    with per_branch_forwards(branch_hooks, x_t.shape[0] // len(branch_hooks)):
        return backend.denoise(x_t, t, cond)


def guided_output(backend: Backend, guider: BaseGuidance, x_t: torch.Tensor, t: torch.Tensor,
                  cond: Conditioning, null_cond: Conditioning, checkpoint: bool = False) -> torch.Tensor:
    """One guided network output: the guider's branches in ONE batched denoiser call, combined by the guider.

    The caller has called ``guider.set_state`` for this step. Branches are laid out unconditional
    first ([uncond, cond] as the stock pipelines batch them; [uncond, cond, cond_skip] for PAG).
    ``checkpoint`` recomputes the denoiser call in backward; the guider's combination (which may
    update its state, as APG's momentum) runs once.
    """
    branches = guider.prepare_inputs({key: (cond[key], null_cond[key]) for key in cond})
    perturbing = perturbs_model(guider)
    hooks = [capture_branch(guider, backend.denoiser, perturbing) for _ in branches]  # the guider's order
    order = sorted(range(len(branches)), key=lambda i: getattr(branches[i], _ID) != "pred_uncond")
    if len(branches) == 1:
        batch, conds = x_t, {key: getattr(branches[0], key) for key in cond}
    else:
        batch = torch.cat([x_t] * len(branches))
        conds = cat_conditioning([{key: getattr(branches[i], key) for key in cond} for i in order])
    arguments = (backend, batch, t, conds, [hooks[i] for i in order])
    if checkpoint and torch.is_grad_enabled():
        outputs = torch.utils.checkpoint.checkpoint(_denoise_branches, *arguments, use_reentrant=False)
    else:
        outputs = _denoise_branches(*arguments)
    outputs = outputs.chunk(len(branches))
    channels = backend.guided_channels  # SiT guides only its first channels; the rest is the conditional output
    for position, i in enumerate(order):
        branches[i].noise_pred = outputs[position] if channels is None else outputs[position][:, :channels]
    guided = guider(branches).pred
    if channels is not None:
        conditional = outputs[next(p for p, i in enumerate(order) if getattr(branches[i], _ID) == "pred_cond")]
        guided = torch.cat([guided, conditional[:, channels:]], dim=1)
    return guided


def rollout(backend: Backend, noise: torch.Tensor, cond: Conditioning, num_steps: int,
            guider: BaseGuidance | None = None, null_cond: Conditioning | None = None,
            checkpoint_steps: bool = False) -> torch.Tensor:
    """Sample ``x_0`` from ``noise`` (``x_T``, unit variance) in ``num_steps`` deterministic steps.

    ``guider``: a ``diffusers.guiders`` guider (None: unguided); it is told every step
    (``set_state``) and keeps its own per-rollout state. Gradients flow if the caller has them
    enabled (the full-gradient loss); ``checkpoint_steps`` recomputes each network call in backward
    to save memory. The scheduler's ``init_noise_sigma`` is applied here exactly once.
    """
    if guider is not None:
        bind(guider, backend)
        if null_cond is None:
            null_cond = backend.null_conditioning(noise.shape[0])
    scheduler = make_scheduler(backend, num_steps)
    latents = noise * initial_sigma(scheduler)
    checkpoint = checkpoint_steps and torch.is_grad_enabled()
    for step, t in enumerate(scheduler.timesteps):
        model_in = scale_model_input(scheduler, latents, t)
        if guider is not None:
            guider.set_state(step=step, num_inference_steps=num_steps, timestep=t)
            out = guided_output(backend, guider, model_in, t, cond, null_cond, checkpoint)
        elif checkpoint:
            out = torch.utils.checkpoint.checkpoint(backend.denoise, model_in, t, cond, use_reentrant=False)
        else:
            out = backend.denoise(model_in, t, cond)
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
