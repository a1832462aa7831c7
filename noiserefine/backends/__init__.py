"""Model families behind one interface (see ``base.Backend``)."""

from __future__ import annotations

import importlib

import torch

from .base import Backend, Conditioning, cat_conditioning

# model.backend -> (module, class); each loads from a local pipeline directory, never downloading.
_REAL_BACKENDS = {
    "stable_diffusion": ("stable_diffusion", "StableDiffusionBackend"),
    "sdxl": ("sdxl", "SDXLBackend"),
    "sit": ("sit", "SiTBackend"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backend(model_cfg) -> Backend:
    """Build the backend named by ``model.backend`` from ``model.path`` (a local directory or model id)."""
    dtype = _DTYPES[model_cfg.dtype]
    if model_cfg.backend == "digits":
        from .digits import DigitsBackend

        return DigitsBackend.from_pretrained(model_cfg.path, device=model_cfg.device, dtype=dtype)
    if model_cfg.backend in _REAL_BACKENDS:
        module_name, class_name = _REAL_BACKENDS[model_cfg.backend]
        module = importlib.import_module(f".{module_name}", __name__)
        return getattr(module, class_name).from_pretrained(
            model_cfg.path, revision=model_cfg.revision, device=model_cfg.device, dtype=dtype)
    raise ValueError(f"model.backend {model_cfg.backend!r} is not implemented; available: "
                     f"{['digits', *_REAL_BACKENDS]}")


__all__ = ["Backend", "Conditioning", "cat_conditioning", "load_backend"]
