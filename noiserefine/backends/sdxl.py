"""Stable Diffusion XL from a local diffusers pipeline directory.

As ``StableDiffusionXLPipeline.encode_prompt``: both CLIP encoders run with
``output_hidden_states``; their penultimate hidden states are concatenated
along the feature axis (``encoder_hidden_states``, (B, 77, 768 + 1280)) and
the second encoder's projected pooled output is ``text_embeds``. ``time_ids``
is ``(original_h, original_w, crop_top=0, crop_left=0, target_h, target_w)``
with both sizes the image size of the latent shape (latent size x VAE scale).
The null conditioning follows ``force_zeros_for_empty_prompt`` of
``model_index.json`` (default True, like the pipeline): zeros shaped like the
prompt embeddings, else the encoding of "". The VAE runs in float32 (the
original SDXL VAE overflows in float16; a VAE handed over by a stock pipeline
keeps the pipeline's dtype). Sampled with DDIM like SD.

``from_architecture("sdxl")`` (``model.init=random``) builds the published
SDXL-base sizes with RANDOM WEIGHTS and built-in tokenizers: for speed/memory
measurements and smoke tests; samples are noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .base import Conditioning
from .stable_diffusion import SD_COMPONENTS, StableDiffusionBackend, frozen

SDXL_COMPONENTS = SD_COMPONENTS + ("text_encoder_2", "tokenizer_2")


class SDXLBackend(StableDiffusionBackend):
    """SDXL: conditioning ``{"encoder_hidden_states", "text_embeds", "time_ids"}``."""

    name = "sdxl"
    required_components = SDXL_COMPONENTS
    expected_model = ("an SDXL pipeline (StableDiffusionXLPipeline layout: unet/ vae/ text_encoder/ text_encoder_2/ "
                      "tokenizer/ tokenizer_2/ scheduler/)")
    vae_in_float32 = True

    def __init__(self, unet, vae, text_encoder, tokenizer, text_encoder_2: CLIPTextModelWithProjection,
                 tokenizer_2: CLIPTokenizer, scheduler_config: dict, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, force_zeros_for_empty_prompt: bool = True,
                 vae_dtype: torch.dtype = torch.float32):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config, device, dtype,
                         vae_dtype=vae_dtype)
        self.text_encoder_2 = frozen(text_encoder_2, self.device, dtype)
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        _, height, width = self.latent_shape
        size = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        self.time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=self.device)
        self._check_added_embedding()

    def _check_added_embedding(self) -> None:
        """The UNet's ``add_embedding`` must take 6 time ids plus the pooled projection (as the pipeline checks)."""
        config = self.denoiser.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"the UNet's addition_embed_type is {config.addition_embed_type!r}; SDXL needs "
                             "'text_time' (is this an SD 1.x/2.x model? use model.backend=stable_diffusion)")
        passed = config.addition_time_embed_dim * self.time_ids.shape[1] + self.text_encoder_2.config.projection_dim
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"SDXL time ids + pooled embedding give {passed} features but the UNet expects "
                             f"{expected} (an SDXL refiner with aesthetic scores is not supported)")

    @classmethod
    def check_pipeline_config(cls, directory: Path) -> None:
        unet_config = UNet2DConditionModel.load_config(directory, subfolder="unet", local_files_only=True)
        if unet_config.get("addition_embed_type") != "text_time":
            raise ValueError(f"model.path {str(directory)!r} holds a UNet with addition_embed_type "
                             f"{unet_config.get('addition_embed_type')!r}, not {cls.expected_model} (is this an "
                             "SD 1.x/2.x model? use model.backend=stable_diffusion)")

    @classmethod
    def load_components(cls, directory: Path, dtype: torch.dtype) -> dict:
        offline = dict(local_files_only=True)
        components = super().load_components(directory, dtype)
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            directory, subfolder="text_encoder_2", dtype=dtype, **offline)
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer_2", **offline)
        return components

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        """``force_zeros_for_empty_prompt`` (default True, like the pipeline)."""
        return {"force_zeros_for_empty_prompt": model_index.get("force_zeros_for_empty_prompt", True)}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = self.tokenize(tokenizer, prompts)
            output = encoder(tokens.input_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = getattr(output, "text_embeds", None)
        if pooled is None:
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled text_embeds)")
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(self.dtype),
                "text_embeds": pooled.to(self.dtype),
                "time_ids": self.time_ids.repeat(len(prompts), 1)}

    def empty_prompt_conditioning(self) -> Conditioning:
        if self._null is None:
            null = self.encode_prompts([""])
            if self.force_zeros_for_empty_prompt:
                null = {key: value if key == "time_ids" else torch.zeros_like(value) for key, value in null.items()}
            self._null = null
        return self._null

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        out = self.denoiser(x_t.to(self.dtype), t, encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs=added, return_dict=False)[0]
        return out.to(x_t.dtype)
