"""What every model family provides to the pipeline, the trainer and the evaluation.

A backend owns its denoiser (a diffusers model), the scheduler config it was
trained with, prompt conditioning, the latent shape and decoding. Nothing
outside ``backends/`` knows which family it runs, so Stable Diffusion 1.x/2.x
(CLIP text encoder, VAE, epsilon or v prediction), SDXL (two text encoders,
pooled embeddings and ``add_time_ids`` in the conditioning dict) and SiT/DiT
(class labels; flow matching with its own time convention converted inside
``denoise``) fit behind the same methods.

Conditioning is a plain ``dict[str, Tensor]`` with every tensor batched along
dim 0, so guidance can concatenate ``[null, cond]`` without knowing its keys.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention
from diffusers.schedulers.scheduling_utils import SchedulerMixin

Conditioning = dict[str, torch.Tensor]


def cat_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    """Concatenate conditionings along the batch (e.g. ``[null, cond]`` for CFG)."""
    keys = conds[0].keys()
    for cond in conds[1:]:
        if cond.keys() != keys:
            raise ValueError(f"conditionings have different keys: {sorted(keys)} vs {sorted(cond.keys())}")
    return {key: torch.cat([cond[key] for cond in conds]) for key in keys}


def _layer_prefix(layer: str) -> str:
    """diffusers PAG layer ids ("mid", "down.block_1", "up.block_0.attentions_1") -> module prefixes.

    A prefix already in module form ("mid_block", "transformer_blocks.3") passes through.
    """
    parts = layer.split(".")
    head = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}.get(parts[0], parts[0])
    rest = []
    for part in parts[1:]:
        match = re.fullmatch(r"(block|attentions|transformer_blocks)_(\d+)", part)
        if match:
            name, number = match.groups()
            rest.extend([number] if name == "block" else [name, number])
        else:
            rest.append(part)
    return ".".join([head, *rest])


class Backend(abc.ABC):
    """Base class of all model families."""

    name: str
    denoiser: torch.nn.Module
    scheduler_config: dict
    scheduler_class: type[SchedulerMixin]
    latent_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    # Guidance applies to the first ``guided_channels`` output channels only (SiT's own
    # sampler guides 3 of 4); None guides all of them (diffusers' DiT, SD, SDXL).
    guided_channels: int | None = None

    def make_scheduler(self) -> SchedulerMixin:
        """A fresh scheduler: schedulers keep per-rollout state, so never share one."""
        return self.scheduler_class.from_config(self.scheduler_config)

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning for a batch of prompts (or class names)."""

    @abc.abstractmethod
    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The unconditional conditioning used by CFG, batched."""

    @abc.abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Network output in the scheduler's prediction type (epsilon, v or flow velocity)."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [0, 1], shape (B, C, H, W)."""

    def pag_attention_modules(self, layers: Sequence[str]) -> dict[str, Attention]:
        """Self-attention modules of the denoiser under the given layer ids (exact, dot-bounded).

        Matching is on whole path components so "down_blocks.1" never matches
        "down_blocks.10" (the regex trap of diffusers issue 13594). diffusers' PAG
        pipelines instead search each id as a regex anywhere in the module names: for
        "mid" and for full prefixes ("up_blocks.0", "down_blocks.1.attentions.0") both
        select the same modules (tests/test_stock_pipelines.py); a partial id such as
        "attentions.0" selects modules in every block there and is an error here, and
        the older "down.block_1" form, accepted here, matches nothing in diffusers 0.42.
        """
        prefixes = [_layer_prefix(layer) for layer in layers]
        found: dict[str, Attention] = {}
        for name, module in self.denoiser.named_modules():
            if not isinstance(module, Attention) or module.is_cross_attention:
                continue
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                found[name] = module
        if not found:
            raise ValueError(f"PAG layers {list(layers)} match no self-attention module of the "
                             f"{self.name} denoiser")
        return found
