"""Training losses for the refiner, built once from the config: MSD (the default) and its two ablations.

Each loss is a callable ``loss_fn(refined, cond, target) -> (loss, x0)`` holding its
own options (rollout gain, checkpointing), so the training step never asks which
one it runs. ``refined`` = ``x̂_T`` carries the refiner's autograd graph (the
refiner forward happens in the caller); ``target`` is the cached ``x0_guide``.
``loss = mean((x0 - target)^2)`` in float32; targets may arrive as float16.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
import torch.nn.functional as F

from .backends.base import Backend, Conditioning
from .inversion import ddim_invert
from .sampling import rollout, rollout_gain


class LossFn(Protocol):
    def __call__(self, refined: torch.Tensor, cond: Conditioning,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.to(prediction.device, torch.float32))


class MSDLoss:
    """Multi-step Score Distillation.

    ``x̂_0 = rollout_N(x̂_T)`` (unguided, under ``no_grad``). With every network output
    held fixed each step is affine, ``x_prev = a_t x_t + b_t sg(eps)``, so
    ``d x̂_0 / d x̂_T = K = sigma_init * prod_t a_t`` (:func:`sampling.rollout_gain`).
    Straight-through: ``x0 = K x̂_T + sg(rollout(x̂_T) - K x̂_T)``, whose value is the
    rollout and whose gradient is ``K dL/dx0``. Only the refiner's graph is kept, so
    memory does not grow with ``num_steps``.
    """

    def __init__(self, backend: Backend, num_steps: int):
        self.backend, self.num_steps = backend, num_steps
        self.gain = rollout_gain(backend, num_steps)  # depends on the scheduler and N only

    def __call__(self, refined, cond, target):
        with torch.no_grad():
            sampled = rollout(self.backend, refined.detach(), cond, self.num_steps)
            offset = sampled - self.gain * refined.detach()
        x0 = self.gain * refined + offset
        return _mse(x0, target), x0


class FullGradientLoss:
    """Ablation: backpropagate through all ``num_steps`` network calls of ``x̂_0 = rollout_N(x̂_T)``.

    Activation memory grows linearly with ``num_steps``; ``checkpoint_steps``
    recomputes each network call in backward instead of storing its activations.
    """

    def __init__(self, backend: Backend, num_steps: int, checkpoint_steps: bool = False):
        self.backend, self.num_steps, self.checkpoint_steps = backend, num_steps, checkpoint_steps

    def __call__(self, refined, cond, target):
        x0 = rollout(self.backend, refined, cond, self.num_steps, checkpoint_steps=self.checkpoint_steps)
        return _mse(x0, target), x0


def _sample_key(target: torch.Tensor, cond: Conditioning, index: int) -> bytes:
    """The bytes of sample ``index``'s target and conditioning, hashed: what its inversion is a function of."""
    digest = hashlib.blake2b(target[index].detach().cpu().numpy().tobytes(), digest_size=20)
    for name in sorted(cond):
        digest.update(name.encode() + cond[name][index].detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class NoiseSpaceLoss:
    """Ablation: regress ``x̂_T`` onto ``DDIM-invert_N(x0_guide)``: ``mean((x̂_T - inv(x0_guide))^2)``.

    A sample's inversion depends on its target and conditioning only (the teacher is frozen), and it costs
    ``N`` network calls, as much as the MSD rollout: each one is kept (by the hash of those inputs, up to
    ``memo_bytes``), so a sample seen again in a later epoch is not inverted again. A resumed run starts
    with an empty memo and inverts again what it meets (the same values, up to float rounding).
    """

    def __init__(self, backend: Backend, num_steps: int, memo_bytes: int = 1 << 30):
        self.backend, self.num_steps, self.memo_bytes = backend, num_steps, memo_bytes
        self.memo: dict[bytes, torch.Tensor] = {}
        self._memo_used = 0

    def __call__(self, refined, cond, target):
        target = target.to(torch.float32)
        keys = [_sample_key(target, cond, i) for i in range(target.shape[0])]
        inverted = dict(zip(keys, (self.memo.get(key) for key in keys)))
        missing = [i for i, key in enumerate(keys) if inverted[key] is None]
        if missing:
            pick = torch.tensor(missing, device=target.device)
            fresh = ddim_invert(self.backend, target[pick], {k: v[pick] for k, v in cond.items()}, self.num_steps)
            for i, value in zip(missing, fresh.detach()):
                inverted[keys[i]] = value
                if self._memo_used + value.nbytes <= self.memo_bytes:
                    self.memo[keys[i]] = value
                    self._memo_used += value.nbytes
        return _mse(refined, torch.stack([inverted[key] for key in keys])), None


def build_loss(cfg, backend: Backend) -> LossFn:
    """The loss named by ``train.loss`` over ``student.num_steps`` unguided steps."""
    name, num_steps = cfg.train.loss, int(cfg.student.num_steps)
    if name == "msd":
        return MSDLoss(backend, num_steps)
    if name == "full_gradient":
        return FullGradientLoss(backend, num_steps, checkpoint_steps=bool(cfg.train.gradient_checkpointing))
    if name == "noise_space":
        return NoiseSpaceLoss(backend, num_steps)
    raise ValueError(f"train.loss {name!r} is not one of msd, full_gradient, noise_space")
