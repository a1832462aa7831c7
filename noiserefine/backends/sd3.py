"""Stable Diffusion 3 (flow matching, MMDiT) from a local ``StableDiffusion3Pipeline`` directory; CFG only.

Components: ``transformer/`` (``SD3Transformer2DModel``), ``vae/``, ``text_encoder/`` +
``tokenizer/`` (CLIP-L), ``text_encoder_2/`` + ``tokenizer_2/`` (CLIP-G), optionally
``text_encoder_3/`` + ``tokenizer_3/`` (T5; without it the T5 part of the conditioning
is zeros, as the pipeline does), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``).

Conditioning is computed by ``StableDiffusion3Pipeline.encode_prompt`` itself (a
pipeline object holding this backend's own modules): ``encoder_hidden_states`` (CLIP
penultimate states, padded/cut to ``joint_attention_dim``, then T5's, along the
sequence) and ``pooled_projections``. The null conditioning is the encoding of "",
the pipeline's default negative prompt.

Sampling is the model's own Euler flow-matching scheduler (diffusers' convention:
``x_sigma = (1 - sigma) x_0 + sigma eps``, the transformer predicts the velocity
``eps - x_0`` at ``timestep = 1000 sigma``, with the config's fixed ``shift``). A step
``x_next = x + (sigma_next - sigma) v`` is affine in ``x`` with ``a_t = 1``, so the MSD
gain read off the scheduler (:func:`sampling.rollout_gain`) is exactly 1.
``use_dynamic_shifting`` (a resolution-dependent ``mu``) is refused. PAG for SD3 needs
joint-attention PAG processors (``StableDiffusion3PAGPipeline``) and is not implemented:
``teacher.guidance=cfg_pag`` is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .base import Backend, Conditioning
from .stable_diffusion import check_dtype, frozen, pipeline_placement, read_scheduler_config, resolve_model_dir

SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
EXPECTED_MODEL = ("a Stable Diffusion 3 pipeline (StableDiffusion3Pipeline layout: transformer/ vae/ text_encoder/ "
                  "text_encoder_2/ tokenizer/ tokenizer_2/ [text_encoder_3/ tokenizer_3/] scheduler/)")


class SD3Backend(Backend):
    """SD3: conditioning ``{"encoder_hidden_states", "pooled_projections"}``; flow matching, CFG."""

    name = "sd3"
    scheduler_class = FlowMatchEulerDiscreteScheduler
    init = "pretrained"
    architecture = ""
    weights = "pretrained"

    def __init__(self, transformer: SD3Transformer2DModel, vae: AutoencoderKL, text_encoder, tokenizer,
                 text_encoder_2, tokenizer_2, scheduler_config: dict, text_encoder_3=None, tokenizer_3=None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype | None = None, max_sequence_length: int = 256):
        check_dtype(device, dtype)
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config)).config)
        if scheduler_config.get("use_dynamic_shifting", False):
            raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting needs a resolution-dependent "
                             "mu; SD3 samples with a fixed shift: set use_dynamic_shifting=false")
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3 (T5) come together or not at all")
        from diffusers import StableDiffusion3Pipeline

        self.device = torch.device(device)
        self.dtype = dtype
        self.denoiser = frozen(transformer, self.device, dtype)
        self.vae = frozen(vae, self.device, vae_dtype or dtype)
        encoders = [frozen(e, self.device, dtype) if e is not None else None
                    for e in (text_encoder, text_encoder_2, text_encoder_3)]
        self.scheduler_config = scheduler_config
        self.max_sequence_length = int(max_sequence_length)
        # The stock pipeline's encode_prompt over this backend's own modules: conditioning as the pipeline makes it.
        self.text_pipeline = StableDiffusion3Pipeline(
            transformer=self.denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
            vae=self.vae, text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
            tokenizer_2=tokenizer_2, text_encoder_3=encoders[2], tokenizer_3=tokenizer_3)
        config = transformer.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(config.in_channels), int(height), int(width))
        self._null: dict[int, Conditioning] = {}

    @staticmethod
    def load_components(directory: Path, dtype: torch.dtype) -> dict:
        """The constructor's keyword arguments, loaded offline from a StableDiffusion3Pipeline directory."""
        offline = dict(local_files_only=True)
        components = dict(
            transformer=SD3Transformer2DModel.from_pretrained(directory, subfolder="transformer", torch_dtype=dtype,
                                                              **offline),
            vae=AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=dtype, **offline),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(directory, subfolder="text_encoder", dtype=dtype,
                                                                     **offline),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(directory, subfolder="text_encoder_2",
                                                                       dtype=dtype, **offline),
            tokenizer=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer", **offline),
            tokenizer_2=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer_2", **offline),
            scheduler_config=read_scheduler_config(directory))
        if (directory / "text_encoder_3").is_dir():
            from transformers import AutoTokenizer, T5EncoderModel

            components["text_encoder_3"] = T5EncoderModel.from_pretrained(directory, subfolder="text_encoder_3",
                                                                          dtype=dtype, **offline)
            components["tokenizer_3"] = AutoTokenizer.from_pretrained(directory, subfolder="tokenizer_3", **offline)
        return components

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SD3Backend":
        check_dtype(device, dtype)
        directory = resolve_model_dir(path, revision, SD3_COMPONENTS, EXPECTED_MODEL)
        config = SD3Transformer2DModel.load_config(directory, subfolder="transformer", local_files_only=True)
        if config.get("_class_name") != SD3Transformer2DModel.__name__:
            raise ValueError(f"model.path {str(directory)!r} holds a {config.get('_class_name')} transformer, not "
                             f"{EXPECTED_MODEL}")
        return cls(**cls.load_components(directory, dtype), device=device, dtype=dtype)

    @classmethod
    def from_pipeline(cls, pipe, scheduler_class: type, scheduler_config: dict) -> "SD3Backend":
        """A backend around a stock ``StableDiffusion3Pipeline``'s own modules (its flow-matching scheduler)."""
        device, dtype = pipeline_placement(pipe, "transformer")
        return cls(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                   pipe.tokenizer_2, scheduler_config, text_encoder_3=getattr(pipe, "text_encoder_3", None),
                   tokenizer_3=getattr(pipe, "tokenizer_3", None), device=device, dtype=dtype,
                   vae_dtype=pipe.vae.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        embeds, _, pooled, _ = self.text_pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def null_conditioning(self, batch_size: int) -> Conditioning:
        """The encoding of ``[""] * batch_size``, batched as the pipeline batches its negative prompt (the text
        encoders' float32 results depend on the batch size at round-off level); cached per batch size."""
        if batch_size not in self._null:
            self._null[batch_size] = self.encode_prompts([""] * batch_size)
        return self._null[batch_size]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        timestep = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        out = self.denoiser(hidden_states=x_t.to(self.dtype), timestep=timestep,
                            encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        return out.to(x_t.dtype)

    def pag_attention_modules(self, layers: Sequence[str]):
        raise ValueError("PAG is not implemented for SD3 (its joint attention needs StableDiffusion3PAGPipeline's "
                         "processors); use teacher.guidance=cfg")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z / scaling_factor + shift_factor)`` mapped from [-1, 1] to [0, 1], float32."""
        config = self.vae.config
        z = latents.to(self.device, self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
