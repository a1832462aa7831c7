"""The model families: each is registered once, here, and everything that depends on the family reads it.

A :class:`Family` says what the rest of the code needs to know about a backend without importing it:

- ``name``: the ``model.backend`` value (``config_checks`` offers exactly the registered names);
- ``backend``: ``"<module>:<class>"`` in ``noiserefine.backends``, imported on first use by ``load_backend``;
- ``pipelines``: the diffusers pipeline classes whose modules the backend wraps
  (``noiserefine.pipelines``: ``Backend.from_pipeline``); a pipeline of no registered class is refused;
- ``latent_channels``, ``latent_scale`` (image pixels per latent pixel) and ``resolution`` (the image
  size its models are published at; None when they come at several): the latent shape where no
  architecture tells it (``capacity``);
- ``architectures``: its directories under ``backends/architectures/`` (``model.init=random``), and
  ``path_hints``: (part of a model directory's name, architecture) for ``capacity``.

This module imports nothing heavy (no torch, no diffusers), so the config checks stay cheap.
Adding a family is one module (a ``Backend`` subclass with ``from_pretrained``, and ``from_pipeline``
if it has pipelines, ``from_architecture`` if it has architectures) and one ``Family`` in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    label: str  # for messages: "SDXL", "DiT/SiT"
    backend: str
    latent_channels: int
    latent_scale: int
    resolution: int | None
    pipelines: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    path_hints: tuple[tuple[str, str], ...] = ()

    def backend_class(self) -> type:
        module_name, class_name = self.backend.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(C, H, W) of a square image of ``resolution`` pixels (default: the family's published one)."""
        size = resolution or self.resolution
        if size is None:
            raise ValueError(f"{self.label} models come at several resolutions: name the architecture "
                             f"({', '.join(self.architectures)}) or the latent shape")
        if size % self.latent_scale:
            raise ValueError(f"resolution {size} is not a multiple of {self.label}'s latent scale {self.latent_scale}")
        return (self.latent_channels, size // self.latent_scale, size // self.latent_scale)


FAMILIES = (
    Family("digits", "digits", "digits:DigitsBackend", latent_channels=1, latent_scale=1, resolution=16),
    Family("stable_diffusion", "Stable Diffusion 1.x/2.x", "stable_diffusion:StableDiffusionBackend",
           latent_channels=4, latent_scale=8, resolution=None,
           pipelines=("StableDiffusionPipeline", "StableDiffusionPAGPipeline"),
           architectures=("sd15", "sd21", "sd21_768"),
           path_hints=(("2-1-base", "sd21"), ("2-1", "sd21_768"), ("v1-5", "sd15"), ("1-5", "sd15"))),
    Family("sdxl", "SDXL", "sdxl:SDXLBackend", latent_channels=4, latent_scale=8, resolution=1024,
           pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLPAGPipeline"), architectures=("sdxl",),
           path_hints=(("xl-base", "sdxl"), ("sdxl", "sdxl"))),
    Family("sit", "DiT/SiT", "sit:SiTBackend", latent_channels=4, latent_scale=8, resolution=256,
           pipelines=("DiTPipeline",), architectures=("dit_xl2", "sit_xl2"),
           path_hints=(("dit", "dit_xl2"), ("sit", "sit_xl2"))),
    Family("sd3", "SD3", "sd3:SD3Backend", latent_channels=16, latent_scale=8, resolution=1024,
           pipelines=("StableDiffusion3Pipeline",)),
)


def family_names() -> tuple[str, ...]:
    return tuple(family.name for family in FAMILIES)


def family(name: str) -> Family:
    """The family ``model.backend = name``; ``ValueError`` naming the registered ones."""
    for candidate in FAMILIES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"model.backend {name!r} is not a registered model family; known: {list(family_names())}")


def architecture_names() -> tuple[str, ...]:
    """Every registered architecture (``model.architecture`` values), sorted."""
    return tuple(sorted(arch for family in FAMILIES for arch in family.architectures))


def family_of_architecture(architecture: str) -> Family:
    for candidate in FAMILIES:
        if architecture in candidate.architectures:
            return candidate
    raise ValueError(f"architecture {architecture!r} is registered by no model family; known: "
                     f"{list(architecture_names())}")


def pipeline_names() -> dict[str, str]:
    """Registered diffusers pipeline class -> family name."""
    return {pipeline: family.name for family in FAMILIES for pipeline in family.pipelines}


def family_for_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline object, by its class (or a class it derives from); ``ValueError``
    naming the registered pipeline classes for any other: a pipeline is never guessed into a family."""
    known = pipeline_names()
    for cls in type(pipe).__mro__:
        if cls.__name__ in known:
            return family(known[cls.__name__])
    raise ValueError(f"{type(pipe).__name__} is not a registered pipeline; refined latents work with "
                     f"{sorted(known)} (a new family registers its pipelines in noiserefine/backends/registry.py)")


def architecture_for_path(path: str) -> str | None:
    """The architecture a model directory's name suggests (the longest matching hint wins), else None."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1].lower()
    hints = [(hint, arch) for family in FAMILIES for hint, arch in family.path_hints if hint in name]
    return max(hints, key=lambda pair: len(pair[0]))[1] if hints else None
