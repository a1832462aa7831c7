"""Model families behind one interface (see ``base.Backend``)."""

from __future__ import annotations

import torch

from .base import Backend, Conditioning, cat_conditioning, index_conditioning

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backend(model_cfg) -> Backend:
    """Build the backend named by ``model.backend`` from ``model.path`` (a local directory or model id)."""
    dtype = _DTYPES[model_cfg.dtype]
    if model_cfg.backend == "digits":
        from .digits import DigitsBackend

        return DigitsBackend.from_pretrained(model_cfg.path, device=model_cfg.device, dtype=dtype)
    raise ValueError(f"model.backend {model_cfg.backend!r} is not implemented yet; available: digits")


__all__ = ["Backend", "Conditioning", "cat_conditioning", "index_conditioning", "load_backend"]
