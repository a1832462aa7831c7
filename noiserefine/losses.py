"""Training losses for the refiner: MSD (the default) and its two ablations.

All are pure functions of ``refined`` = ``x̂_T`` (carrying the refiner's
autograd graph; the refiner forward happens in the caller) and the teacher
target ``x0_guide``. Each returns ``(loss, x0)`` where ``loss = mean((x0 -
target)^2)`` in float32; targets may arrive as float16 and are cast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .backends.base import Backend, Conditioning
from .inversion import ddim_invert
from .sampling import rollout, rollout_gain


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.to(prediction.device, torch.float32))


def msd_loss(backend: Backend, refined: torch.Tensor, cond: Conditioning, target: torch.Tensor,
             num_steps: int, gain: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step Score Distillation.

    ``x̂_0 = rollout_N(x̂_T)`` (unguided, run under ``no_grad``). With every network
    output held fixed each step is affine, ``x_prev = a_t x_t + b_t sg(eps)``, so
    ``d x̂_0 / d x̂_T ≈ K = sigma_init * prod_t a_t`` (``sampling.rollout_gain``).
    Straight-through: ``x0 = K x̂_T + sg(rollout(x̂_T) - K x̂_T)``, whose value is
    the rollout and whose gradient is ``K dL/dx0``. Only the refiner's graph is
    kept, so memory does not grow with ``num_steps``. ``gain`` depends only on the
    scheduler and ``num_steps``; pass it to skip recomputing it.
    """
    if gain is None:
        gain = rollout_gain(backend, num_steps)
    with torch.no_grad():
        sampled = rollout(backend, refined.detach(), cond, num_steps)
        offset = sampled - gain * refined.detach()
    x0 = gain * refined + offset
    return _mse(x0, target), x0


def full_gradient_loss(backend: Backend, refined: torch.Tensor, cond: Conditioning, target: torch.Tensor,
                       num_steps: int, checkpoint_steps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation: backpropagate through all ``num_steps`` network calls of ``x̂_0 = rollout_N(x̂_T)``.

    Activation memory grows linearly with ``num_steps``; ``checkpoint_steps``
    recomputes each network call in backward instead of storing its activations.
    """
    x0 = rollout(backend, refined, cond, num_steps, checkpoint_steps=checkpoint_steps)
    return _mse(x0, target), x0


def noise_space_loss(backend: Backend, refined: torch.Tensor, cond: Conditioning, target: torch.Tensor,
                     num_steps: int, inverted: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """Ablation: regress ``x̂_T`` onto ``DDIM-invert_N(x0_guide)``: ``mean((x̂_T - inv(x0_guide))^2)``.

    ``inverted`` may be precomputed (it does not depend on the refiner).
    """
    if inverted is None:
        inverted = ddim_invert(backend, target.to(torch.float32), cond, num_steps)
    return _mse(refined, inverted.detach()), None


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "msd": msd_loss,
    "full_gradient": full_gradient_loss,
    "noise_space": noise_space_loss,
}


def compute_loss(name: str, backend: Backend, refined: torch.Tensor, cond: Conditioning,
                 target: torch.Tensor, num_steps: int, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to ``LOSSES[name]``; ``options`` are that loss's keyword arguments."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name](backend, refined, cond, target, num_steps, **options)
