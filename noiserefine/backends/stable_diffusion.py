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

``from_architecture`` (``model.init=random``) builds the same components at a
published size (sd15, sd21, sd21_768) with RANDOM WEIGHTS and a built-in
tokenizer: for speed/memory measurements and smoke tests; samples are noise.
Both paths end in the same constructor, ``cls(**components, device, dtype)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .base import Backend, Conditioning
from .random_init import build_components, mark_random, read_architecture

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def resolve_model_dir(path: str | Path, revision: str = "", required: Sequence[str] = (),
                      expected: str = "a diffusers pipeline") -> Path:
    """``model.path`` -> a local directory holding every ``required`` subfolder; never downloads.

    A path that is not a directory is tried as a model id (at ``revision``) in
    the local Hugging Face cache only. ``revision`` is ignored for a directory.
    Every error names the path and ``expected`` (the model type the backend
    loads), and what the directory holds instead when its ``model_index.json`` says.
    """
    if not str(path):
        raise ValueError(f"model.path is empty; set it to a local directory holding {expected}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(path), revision=revision or None, local_files_only=True))
        except Exception:
            raise FileNotFoundError(
                f"model.path {str(path)!r} is neither a local directory nor a model id in the local "
                f"Hugging Face cache (revision {revision or 'main'!r}); expected {expected}; weights are "
                "never downloaded"
            ) from None
    missing = [name for name in required if not (directory / name).is_dir()]
    if missing:
        holds = read_model_index(directory).get("_class_name")
        found = f"; its model_index.json says it holds a {holds}" if holds else ""
        raise FileNotFoundError(f"model.path {str(directory)!r} is not a complete diffusers pipeline "
                                f"directory of {expected}: missing {missing}{found}")
    return directory


def read_model_index(directory: Path) -> dict:
    """``model_index.json`` (the pipeline config), or {} when absent."""
    index = directory / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def read_scheduler_config(directory: Path) -> dict:
    """The raw ``scheduler/scheduler_config.json`` of a pipeline directory (``_class_name`` included)."""
    return dict(DDIMScheduler.load_config(directory, subfolder="scheduler", local_files_only=True))


def ddim_scheduler_config(raw: Path | dict) -> dict:
    """The model's scheduler config (from a pipeline directory or a raw dict) as a deterministic, affine DDIM config."""
    if not isinstance(raw, dict):
        raw = read_scheduler_config(Path(raw))
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


def pipeline_placement(pipe, denoiser: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a stock pipeline's denoiser (``pipe.unet`` / ``pipe.transformer``), which a backend
    around it keeps; its text encoders must be in that dtype (the backend would cast them, changing the pipeline)."""
    module = getattr(pipe, denoiser, None)
    if module is None:
        raise ValueError(f"{type(pipe).__name__} has no {denoiser}")
    if module.device.type == "meta":
        raise ValueError("move the whole pipeline to one device first (pipe.to(device)); offloading is not supported")
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    wrong = [f"{type(e).__name__} {e.dtype}" for e in encoders if e is not None and e.dtype != module.dtype]
    if wrong:
        raise ValueError(f"the pipeline's text encoders ({', '.join(wrong)}) are not in its {denoiser}'s dtype "
                         f"{module.dtype}")
    return module.device, module.dtype


class StableDiffusionBackend(Backend):
    """SD 1.x/2.x: conditioning ``{"encoder_hidden_states": (B, 77, D)}``."""

    name = "stable_diffusion"
    scheduler_class = DDIMScheduler
    required_components = SD_COMPONENTS
    expected_model = "a Stable Diffusion 1.x/2.x pipeline (StableDiffusionPipeline layout: unet/ vae/ text_encoder/ " \
                     "tokenizer/ scheduler/)"
    vae_in_float32 = False  # SDXL: its VAE overflows in float16
    # How the weights were made: "pretrained" (model.path) or "random" (from_architecture: samples are noise).
    init = "pretrained"
    architecture = ""
    weights = "pretrained"

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

    @classmethod
    def load_components(cls, directory: Path, dtype: torch.dtype) -> dict:
        """The constructor's keyword arguments, loaded offline from a pipeline directory in ``dtype``."""
        offline = dict(local_files_only=True)
        cls.check_pipeline_config(directory)
        vae_dtype = torch.float32 if cls.vae_in_float32 else dtype
        return dict(
            unet=UNet2DConditionModel.from_pretrained(directory, subfolder="unet", torch_dtype=dtype, **offline),
            vae=AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=vae_dtype, **offline),
            text_encoder=CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=dtype, **offline),
            tokenizer=CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer", **offline),
            scheduler_config=ddim_scheduler_config(directory),
        )

    @classmethod
    def check_pipeline_config(cls, directory: Path) -> None:
        """Refuse an SDXL pipeline before loading gigabytes: its UNet needs ``added_cond_kwargs`` SD never passes."""
        unet_config = UNet2DConditionModel.load_config(directory, subfolder="unet", local_files_only=True)
        if unet_config.get("addition_embed_type") == "text_time":
            raise ValueError(f"model.path {str(directory)!r} holds an SDXL UNet (addition_embed_type 'text_time'), "
                             f"not {cls.expected_model}; use model.backend=sdxl")

    @classmethod
    def random_components(cls, arch, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        """The constructor's keyword arguments at ``arch``'s published size, RANDOM WEIGHTS, built on ``device``.

        The architecture's component names are the constructor's arguments (SDXL adds ``text_encoder_2``
        and ``tokenizer_2``); its scheduler becomes the same DDIM config as a loaded one.
        """
        dtypes = {"vae": torch.float32} if cls.vae_in_float32 else {}
        components = build_components(arch, device, dtype, dtypes=dtypes, seed=seed)
        return dict(components, scheduler_config=ddim_scheduler_config(components.pop("scheduler")))

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "StableDiffusionBackend":
        check_dtype(device, dtype)
        directory = resolve_model_dir(path, revision, cls.required_components, cls.expected_model)
        return cls(**cls.load_components(directory, dtype), device=device, dtype=dtype,
                   **cls.pipeline_options(read_model_index(directory)))

    @classmethod
    def from_architecture(cls, architecture: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          seed: int = 0) -> "StableDiffusionBackend":
        """The shipped ``architecture`` at its published size with RANDOM WEIGHTS: for speed/memory
        measurements and smoke tests; samples are noise (``backend.init == "random"``; warns once)."""
        check_dtype(device, dtype)
        arch = read_architecture(architecture, backend=cls.name)
        backend = cls(**cls.random_components(arch, device, dtype, seed), device=device, dtype=dtype,
                      **cls.pipeline_options(arch.pipeline))
        return mark_random(backend, arch)

    @classmethod
    def from_pipeline(cls, pipe, scheduler_class: type, scheduler_config: dict) -> "StableDiffusionBackend":
        """A backend around a stock pipeline's own modules (nothing copied, moved or cast; ``noiserefine.pipelines``)
        sampling with ``scheduler_class`` and ``scheduler_config``."""
        device, dtype = pipeline_placement(pipe, "unet")
        names = [name for name in cls.required_components if name != "scheduler"]
        missing = [name for name in names if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"{type(pipe).__name__} has no {', '.join(missing)}; {cls.expected_model} needs them")
        backend = cls(**{name: getattr(pipe, name) for name in names}, scheduler_config=scheduler_config,
                      device=device, dtype=dtype, vae_dtype=pipe.vae.dtype, **cls.pipeline_options(dict(pipe.config)))
        backend.scheduler_class = scheduler_class
        return backend

    @classmethod
    def pipeline_options(cls, model_index: dict) -> dict:
        """Constructor options from ``model_index.json`` (pretrained) or ``pipeline.json`` (random): none for SD."""
        return {}

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
