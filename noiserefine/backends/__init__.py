"""Model families behind one interface (see ``base.Backend``)."""

from __future__ import annotations

import importlib

import torch

from .base import Backend, Conditioning, cat_conditioning

# model.backend -> (module, class); each loads from a local pipeline directory, never downloading,
# or (model.init=random) builds a shipped architecture with random weights (see random_init).
_REAL_BACKENDS = {
    "stable_diffusion": ("stable_diffusion", "StableDiffusionBackend"),
    "sdxl": ("sdxl", "SDXLBackend"),
    "sit": ("sit", "SiTBackend"),
    "sd3": ("sd3", "SD3Backend"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INITS = ("pretrained", "random")


def load_backend(model_cfg) -> Backend:
    """Build the backend named by ``model.backend``.

    ``model.init=pretrained`` (the default) loads ``model.path`` (a local
    directory or a model id in the local Hugging Face cache). ``model.init=random``
    builds ``model.architecture`` (a directory of ``backends/architectures/``) at
    its published size with RANDOM WEIGHTS: for speed/memory measurements and
    smoke tests; samples are noise. ``model.path`` is then ignored.
    """
    dtype = _DTYPES[model_cfg.dtype]
    init = getattr(model_cfg, "init", "pretrained")
    if init not in _INITS:
        raise ValueError(f"model.init {init!r} is not one of {_INITS}")
    if model_cfg.backend == "digits":
        if init == "random":
            raise ValueError("model.init=random builds the published architectures of the real families "
                             "(model.backend stable_diffusion, sdxl, sit); the digits backend has no such size")
        from .digits import DigitsBackend

        return DigitsBackend.from_pretrained(model_cfg.path, device=model_cfg.device, dtype=dtype)
    if model_cfg.backend in _REAL_BACKENDS:
        module_name, class_name = _REAL_BACKENDS[model_cfg.backend]
        module = importlib.import_module(f".{module_name}", __name__)
        cls = getattr(module, class_name)
        if init == "random":
            architecture = getattr(model_cfg, "architecture", "")
            if not architecture:
                from .random_init import architecture_names

                raise ValueError(f"model.init=random needs model.architecture, one of {architecture_names()}")
            return cls.from_architecture(architecture, device=model_cfg.device, dtype=dtype)
        return cls.from_pretrained(model_cfg.path, revision=model_cfg.revision, device=model_cfg.device,
                                   dtype=dtype)
    raise ValueError(f"model.backend {model_cfg.backend!r} is not implemented; available: "
                     f"{['digits', *_REAL_BACKENDS]}")


__all__ = ["Backend", "Conditioning", "cat_conditioning", "load_backend"]
