"""Model families behind one interface (see ``base.Backend``), registered once in ``registry``.

Importing this package is cheap (``registry`` needs neither torch nor diffusers): ``Backend`` and
friends, and each backend module, are imported when first used.
"""

from __future__ import annotations

from .registry import architecture_names, family

_INITS = ("pretrained", "random")
_DTYPES = ("float32", "bfloat16", "float16")


def load_backend(model_cfg):
    """Build the backend named by ``model.backend`` (a registered family, see ``registry``).

    ``model.init=pretrained`` (the default) loads ``model.path`` (a local
    directory or a model id in the local Hugging Face cache). ``model.init=random``
    builds ``model.architecture`` (a directory of ``backends/architectures/``) at
    its published size with RANDOM WEIGHTS: for speed/memory measurements and
    smoke tests; samples are noise. ``model.path`` is then ignored.
    """
    import torch

    if model_cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of {_DTYPES}")
    dtype = getattr(torch, model_cfg.dtype)
    init = getattr(model_cfg, "init", "pretrained")
    if init not in _INITS:
        raise ValueError(f"model.init {init!r} is not one of {_INITS}")
    chosen = family(model_cfg.backend)
    cls = chosen.backend_class()
    if init == "random":
        if not chosen.architectures:
            raise ValueError(f"model.init=random: no {chosen.label} architecture is shipped for the {chosen.name} "
                             f"backend (noiserefine/backends/architectures/ holds {list(architecture_names())})")
        architecture = getattr(model_cfg, "architecture", "")
        if not architecture:
            raise ValueError(f"model.init=random needs model.architecture, one of {chosen.architectures}")
        return cls.from_architecture(architecture, device=model_cfg.device, dtype=dtype)
    return cls.from_pretrained(model_cfg.path, revision=getattr(model_cfg, "revision", ""), device=model_cfg.device,
                               dtype=dtype)


def __getattr__(name: str):
    """``Backend``, ``Conditioning`` and ``cat_conditioning`` from ``base`` (imported on first use: torch)."""
    if name in ("Backend", "Conditioning", "cat_conditioning"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "Conditioning", "cat_conditioning", "load_backend"]
