"""Class-conditional DiT / SiT: diffusers' ``DiTTransformer2DModel`` + ``AutoencoderKL``.

The directory is a ``DiTPipeline`` layout (``transformer/ vae/ scheduler/``,
optional ``model_index.json`` with ``id2label``). Its scheduler picks the mode:

- **DiT** (any non-flow scheduler, sampled as DDIM eta = 0, ``clip_sample`` off):
  epsilon prediction at integer timesteps in [0, 1000); all channels guided
  (as diffusers' ``DiTPipeline``).
- **SiT** (``FlowMatchEulerDiscreteScheduler``): diffusers' convention is
  ``x_sigma = (1 - sigma) x_0 + sigma eps`` (sigma = 1 is noise) with velocity
  ``eps - x_0``; SiT's own time runs from 0 (noise) to 1 (data) with velocity
  ``dx/dt`` toward the data, and its network takes that continuous time. So
  ``denoise`` feeds ``t_sit = 1 - timestep / num_train_timesteps`` and returns
  ``-v_sit``. Guidance covers the first 3 of 4 channels, as SiT's sampler.

With a learned sigma (``out_channels == 2 C``) only the first C channels are kept.

Prompt -> class label (``prompt_label``): a prompt that is an integer ("207"),
or that contains "class N" / "label N" ("a photo of class 207"), names class
N; otherwise a prompt equal (case-insensitively, stripped) to one of the
comma-separated names of an ``id2label`` entry ("golden retriever") names that
class. Anything else, including an index >= the number of classes, is the
null class ``num_embeds_ada_norm`` (the CFG embedding).

``from_architecture`` (``model.init=random``: dit_xl2, sit_xl2) builds the
XL/2 transformer and the VAE at their published sizes with RANDOM WEIGHTS (no
``id2label``: prompts name classes by number): for speed/memory measurements and
smoke tests; samples are noise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.loaders import PeftAdapterMixin

from .base import Backend, Conditioning
from .random_init import build_components, mark_random, read_architecture
from .stable_diffusion import (check_dtype, frozen, pipeline_placement, read_model_index, read_scheduler_config,
                               resolve_model_dir)

SIT_COMPONENTS = ("transformer", "vae", "scheduler")
EXPECTED_MODEL = "a class-conditional DiT/SiT pipeline (DiTPipeline layout: transformer/ vae/ scheduler/)"
_WHOLE_INDEX = re.compile(r"\s*(\d+)\s*")
_TAGGED_INDEX = re.compile(r"\b(?:class|label)\s*[:#=]?\s*(\d+)\b", re.IGNORECASE)


class PeftDiTTransformer2DModel(DiTTransformer2DModel, PeftAdapterMixin):
    """diffusers' DiT plus the PEFT adapter methods (``add_adapter``, ``enable/disable_adapters``) that
    the refiner's LoRA needs and diffusers' DiT class lacks. It adds no state, so a loaded DiT can be re-classed."""


def label_names(id2label: Mapping[str | int, str] | None) -> dict[str, int]:
    """``id2label`` (DiTPipeline's format: "0": "tench, Tinca tinca") -> lower-cased name -> id."""
    names: dict[str, int] = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            if name.strip():
                names.setdefault(name.strip().lower(), int(key))
    return names


def prompt_label(prompt: str, num_classes: int, names: Mapping[str, int] | None = None) -> int:
    """The class a prompt names (rule in the module docstring); the null class ``num_classes`` if none."""
    match = _WHOLE_INDEX.fullmatch(prompt) or _TAGGED_INDEX.search(prompt)
    if match is not None:
        index = int(match.group(1))
        return index if index < num_classes else num_classes
    return (names or {}).get(prompt.strip().lower(), num_classes)


def sampler_for(raw: Mapping) -> tuple[type, dict]:
    """A raw scheduler config -> (scheduler class, its config): flow matching stays Euler (SiT), anything
    else becomes DDIM eta = 0 with ``clip_sample`` and thresholding off (DiT)."""
    if raw.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__:
        scheduler_class, overrides = FlowMatchEulerDiscreteScheduler, {}
    else:
        scheduler_class, overrides = DDIMScheduler, dict(clip_sample=False, thresholding=False)
    return scheduler_class, dict(scheduler_class.from_config(dict(raw), **overrides).config)


class SiTBackend(Backend):
    """DiT (DDIM, epsilon) or SiT (flow matching) by ``scheduler_class``; conditioning ``{"class_labels"}``."""

    name = "sit"
    # How the weights were made: "pretrained" (model.path) or "random" (from_architecture: samples are noise).
    init = "pretrained"
    architecture = ""
    weights = "pretrained"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL, scheduler_class: type,
                 scheduler_config: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 id2label: Mapping[str | int, str] | None = None):
        check_dtype(device, dtype)
        if scheduler_class not in (DDIMScheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"scheduler_class must be DDIMScheduler (DiT) or FlowMatchEulerDiscreteScheduler "
                             f"(SiT), got {scheduler_class.__name__}")
        if scheduler_config.get("use_dynamic_shifting", False):
            raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting needs a resolution-"
                             "dependent mu; SiT uses a fixed shift: set use_dynamic_shifting=false")
        self.device = torch.device(device)
        self.dtype = dtype
        if type(transformer) is DiTTransformer2DModel:
            transformer.__class__ = PeftDiTTransformer2DModel
        self.denoiser = frozen(transformer, self.device, dtype)
        self.vae = frozen(vae, self.device, dtype)
        self.scheduler_class = scheduler_class
        self.scheduler_config = dict(scheduler_config)
        self.flow = scheduler_class is FlowMatchEulerDiscreteScheduler
        self.num_train_timesteps = int(scheduler_config["num_train_timesteps"])
        config = transformer.config
        if config.num_embeds_ada_norm is None:
            raise ValueError("the transformer has no class embedding (num_embeds_ada_norm is None)")
        self.num_classes = int(config.num_embeds_ada_norm)
        self.label_names = label_names(id2label)
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(config.in_channels), int(height), int(width))
        self.guided_channels = 3 if self.flow and config.in_channels > 3 else None

    @staticmethod
    def load_components(directory: Path, dtype: torch.dtype) -> dict:
        """The constructor's keyword arguments, loaded offline from a DiTPipeline-layout directory in ``dtype``."""
        offline = dict(local_files_only=True)
        config = DiTTransformer2DModel.load_config(directory, subfolder="transformer", **offline)
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("num_embeds_ada_norm") is None:
            raise ValueError(f"model.path {str(directory)!r} holds a {config.get('_class_name')} with norm_type "
                             f"{config.get('norm_type')!r} and num_embeds_ada_norm {config.get('num_embeds_ada_norm')}"
                             f", not {EXPECTED_MODEL} (ada_norm_zero with a class embedding)")
        scheduler_class, scheduler_config = sampler_for(read_scheduler_config(directory))
        transformer = PeftDiTTransformer2DModel.from_pretrained(directory, subfolder="transformer",
                                                                torch_dtype=dtype, **offline)
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", torch_dtype=dtype, **offline)
        return dict(transformer=transformer, vae=vae, scheduler_class=scheduler_class,
                    scheduler_config=scheduler_config, id2label=read_model_index(directory).get("id2label"))

    @staticmethod
    def random_components(arch, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
        """The constructor's keyword arguments at ``arch``'s published size, RANDOM WEIGHTS, built on ``device``."""
        built = build_components(arch, device, dtype, seed=seed)
        scheduler_class, scheduler_config = sampler_for(built["scheduler"])
        return dict(transformer=built["transformer"], vae=built["vae"], scheduler_class=scheduler_class,
                    scheduler_config=scheduler_config, id2label=arch.pipeline.get("id2label"))

    @classmethod
    def from_pretrained(cls, path: str | Path, revision: str = "", device: str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "SiTBackend":
        check_dtype(device, dtype)
        directory = resolve_model_dir(path, revision, SIT_COMPONENTS, EXPECTED_MODEL)
        return cls(**cls.load_components(directory, dtype), device=device, dtype=dtype)

    @classmethod
    def from_architecture(cls, architecture: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          seed: int = 0) -> "SiTBackend":
        """The shipped ``architecture`` (dit_xl2, sit_xl2) at its published size with RANDOM WEIGHTS: for
        speed/memory measurements and smoke tests; samples are noise (``backend.init == "random"``; warns once)."""
        check_dtype(device, dtype)
        arch = read_architecture(architecture, backend=cls.name)
        backend = cls(**cls.random_components(arch, device, dtype, seed), device=device, dtype=dtype)
        return mark_random(backend, arch)

    @classmethod
    def from_pipeline(cls, pipe, scheduler_class: type, scheduler_config: dict) -> "SiTBackend":
        """A backend around a stock ``DiTPipeline``'s own modules; its ``labels`` (name -> id) name the classes."""
        device, dtype = pipeline_placement(pipe, "transformer")
        id2label: dict[str, str] = {}
        for name, index in (getattr(pipe, "labels", None) or {}).items():
            id2label[str(index)] = f"{id2label[str(index)]}, {name}" if str(index) in id2label else name
        return cls(pipe.transformer, pipe.vae, scheduler_class, scheduler_config, device=device, dtype=dtype,
                   id2label=id2label)

    def labels_for(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        labels = [prompt_label(p, self.num_classes, self.label_names) for p in prompts]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return {"class_labels": self.labels_for(prompts)}

    def null_conditioning(self, batch_size: int) -> Conditioning:
        return {"class_labels": torch.full((batch_size,), self.num_classes, dtype=torch.long, device=self.device)}

    def model_time(self, t: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The transformer's time input: the DDIM timestep (DiT) or SiT's ``1 - sigma`` (0 = noise)."""
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        return 1.0 - t.float() / self.num_train_timesteps if self.flow else t

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.denoiser(x_t.to(self.dtype), timestep=self.model_time(t, x_t.shape[0]),
                            class_labels=cond["class_labels"], return_dict=False)[0]
        channels = self.latent_shape[0]
        if out.shape[1] == 2 * channels:  # learned sigma: keep the mean prediction
            out = out[:, :channels]
        out = out.to(x_t.dtype)
        return -out if self.flow else out  # diffusers' velocity (toward noise) = -SiT's (toward data)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor,
                                return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
