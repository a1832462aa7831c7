"""The embedded default: a tiny text-conditioned diffusion model on scikit-learn's digits.

The denoiser is diffusers' ``UNet2DConditionModel`` (self- and cross-attention
transformer blocks, like Stable Diffusion) so LoRA, PAG and the samplers hit
the same code as on real models. "Text" conditioning is a learned embedding
per digit plus one null embedding: a prompt that names a digit ("a handwritten
seven", "digit 7") gets that digit's embedding, any other prompt the null one.
The teacher is trained by the project (``noiserefine.digits.teacher``), saved in
diffusers format and loaded from that directory like any real model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from .base import Backend, Conditioning

IMAGE_SIZE = 16  # sklearn's 8x8 digits upsampled; the model's latent space is pixel space
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_INDEX = 10
EMBEDDING_FILE = "prompt_embedding.safetensors"
_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)

# The scheduler the teacher is trained and sampled with (Stable Diffusion's betas;
# "trailing" spacing so the first of few steps starts at t=999, i.e. from pure noise).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt names (first match of a numeral or number word), else None."""
    match = _DIGIT_PATTERN.search(prompt)
    if match is None:
        return None
    token = match.group(1).lower()
    return int(token) if token.isdigit() else DIGIT_WORDS.index(token)


def build_unet(block_out_channels: Sequence[int], cross_attention_dim: int) -> UNet2DConditionModel:
    """A ~1M-parameter SD-style UNet for 1x16x16 images (cross-attention in the inner blocks)."""
    channels = tuple(int(c) for c in block_out_channels)
    depth = len(channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    )


class DigitsBackend(Backend):
    name = "digits"
    latent_shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    scheduler_class = DDIMScheduler

    def __init__(self, unet: UNet2DConditionModel, embedding: torch.Tensor, scheduler_config: dict,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        unet = unet.to(self.device)
        if dtype != torch.float32:  # passing dtype at all makes diffusers warn, so only when casting
            unet = unet.to(dtype=dtype)
        self.denoiser = unet.eval().requires_grad_(False)
        self.embedding = embedding.to(self.device, dtype)  # (11, 1, D): digits 0..9, then null
        self.scheduler_config = dict(scheduler_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "DigitsBackend":
        """The teacher directory ``path`` (``revision`` is unused: the digit teacher is always local)."""
        path = Path(path)
        if not (path / "unet").is_dir() or not (path / EMBEDDING_FILE).is_file():
            raise FileNotFoundError(f"no digit teacher at {path} (expected unet/, scheduler/ and "
                                    f"{EMBEDDING_FILE}); train one with `python -m noiserefine.digits.train_teacher`")
        unet = UNet2DConditionModel.from_pretrained(path / "unet")
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        embedding = load_file(str(path / EMBEDDING_FILE))["embedding"]
        return cls(unet, embedding, dict(scheduler.config), device, dtype)

    def labels_for(self, prompts: Sequence[str]) -> torch.Tensor:
        digits = [parse_digit(p) for p in prompts]
        return torch.tensor([NULL_INDEX if d is None else d for d in digits], dtype=torch.long)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        labels = self.labels_for(prompts).to(self.device)
        return {"encoder_hidden_states": self.embedding[labels]}

    def null_conditioning(self, batch_size: int) -> Conditioning:
        labels = torch.full((batch_size,), NULL_INDEX, dtype=torch.long, device=self.device)
        return {"encoder_hidden_states": self.embedding[labels]}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # In the model's dtype, out in the caller's (the MSD student rollout runs in float32), as the SD backends do.
        out = self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"],
                            return_dict=False)[0]
        return out.to(x_t.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def save_pretrained(self, directory: str | Path) -> None:
        """The layout :meth:`from_pretrained` reads: ``unet/``, ``scheduler/`` and the prompt embedding."""
        directory = Path(directory)
        self.denoiser.save_pretrained(directory / "unet")
        DDIMScheduler.from_config(self.scheduler_config).save_pretrained(directory / "scheduler")
        save_file({"embedding": self.embedding.detach().cpu().contiguous()}, str(directory / EMBEDDING_FILE))
