"""Stable Diffusion 1.x / 2.x (epsilon or v prediction) from a local diffusers pipeline directory.

Components come from the standard layout (``unet/ vae/ text_encoder/ tokenizer/
scheduler/``). The model's own scheduler config (PNDM, DDIM or Euler) is
sampled with ``DDIMScheduler`` (eta = 0, ``clip_sample`` and thresholding off so
the step stays affine), keeping ``prediction_type`` (v for SD 2.1-768),
``timestep_spacing``, ``steps_offset`` and the betas. Conditioning is the CLIP
text encoder's last hidden state; the null conditioning is the encoding of the
empty prompt, as in the diffusers pipeline. Nothing is ever downloaded: a
``model.path`` that is not a directory must be a model id already in the
local Hugging Face cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .base import Backend, Conditioning

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model_dir(path: str | Path, revision: str = "", required: Sequence[str] = ()) -> Path:
    """``model.path`` -> a local directory holding every ``required`` subfolder; never downloads.

    A path that is not a directory is tried as a model id (at ``revision``) in
    the local Hugging Face cache only. ``revision`` is ignored for a directory.
    """
    if not str(path):
        raise ValueError("model.path is empty; set it to a local diffusers pipeline directory")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(path), revision=revision or None, local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"model.path {str(path)!r} is neither a local directory nor a model id in the local "
                f"Hugging Face cache (revision {revision or 'main'!r}); weights are never downloaded"
            ) from None
    missing = [name for name in required if not (directory / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.path {str(directory)!r} is not a complete diffusers pipeline "
                                f"directory: missing {missing}")
    return directory


def read_model_index(directory: Path) -> dict:
    """``model_index.json`` (the pipeline config), or {} when absent."""
    index = directory / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def ddim_scheduler_config(directory: Path) -> dict:
    """The model's scheduler config as a deterministic, affine DDIM config."""
    raw = DDIMScheduler.load_config(directory, subfolder="scheduler", local_files_only=True)
    scheduler = DDIMScheduler.from_config(raw, clip_sample=False, thresholding=False)
    return dict(scheduler.config)


def check_dtype(device: str | torch.device, dtype: torch.dtype) -> None:
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        raise ValueError("model.dtype float16 is GPU only; use float32 (or bfloat16) on the CPU")


def frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """On ``device`` in ``dtype``, eval mode, no gradients (cast only if needed: diffusers warns on casts)."""
    module = module.to(device)
    if module.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


class StableDiffusionBackend(Backend):
    """SD 1.x/2.x: conditioning ``{"encoder_hidden_states": (B, 77, D)}``."""

    name = "stable_diffusion"
    scheduler_class = DDIMScheduler

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler_config: dict, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None):
        check_dtype(device, dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.denoiser = frozen(unet, self.device, dtype)
        self.vae = frozen(vae, self.device, vae_dtype or dtype)
        self.text_encoder = frozen(text_encoder, self.device, dtype)
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(unet.config.in_channels), int(height), int(width))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._null: Conditioning | None = None

    @staticmethod
    def load_components(directory: Path, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> dict:
        """The SD components shared with SDXL, loaded offline in ``dtype``."""
        offline = dict(local_files_only=True)
        return dict(
            unet=UNet2DConditionModel.from_pretrained(directory, subfolder="unet", torch_dtype=dtype, **offline),
            vae=AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=vae_dtype or dtype,
                                              **offline),
            text_encoder=CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=dtype, **offline),
            tokenizer=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer", **offline),
            scheduler_config=ddim_scheduler_config(directory),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "StableDiffusionBackend":
        check_dtype(device, dtype)
        directory = resolve_model_dir(path, revision, SD_COMPONENTS)
        return cls(**cls.load_components(directory, dtype), device=device, dtype=dtype)

    def tokenize(self, tokenizer: CLIPTokenizer, prompts: Sequence[str]):
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        tokens = self.tokenize(self.tokenizer, prompts)
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        hidden = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask if use_mask else None)[0]
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def empty_prompt_conditioning(self) -> Conditioning:
        """The unconditional conditioning of one sample (cached)."""
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null

    def null_conditioning(self, batch_size: int) -> Conditioning:
        null = self.empty_prompt_conditioning()
        return {key: value.repeat(batch_size, *[1] * (value.ndim - 1)) for key, value in null.items()}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"],
                            return_dict=False)[0]
        return out.to(x_t.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z / scaling_factor (+ shift_factor))`` mapped from [-1, 1] to [0, 1], float32."""
        config = self.vae.config
        z = latents.to(self.device, self.vae.dtype) / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
