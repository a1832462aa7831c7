"""Which guidance scale w to tell a saved refiner, from what a command or helper was given.

A refiner records what it was trained for in its ``config.yaml`` (the resolved training config, written by
``save_refiner``): ``refiner.guidance_timestep_slope`` k and the scales of its teacher caches
(``data.guidance_scales``, or the ``teacher.guidance_scale`` of each ``data.mixture`` component, or the one
``teacher.guidance_scale``). A refiner saved before the slope existed loads with k = 0 (the schema's default).

The rules (:func:`refiner_guidance_scale`), the same for ``python -m noiserefine.sample``,
``python -m noiserefine.evaluate``, ``pipelines.refined_latents`` and ``enable.enable_refiner``:

- **A refiner of one scale (k = 0)** takes no w: ``None`` is passed to it. A ``guidance_scale`` equal to the
  scale it was trained for is accepted (a script may pass the same w to every refiner of a set of per-w
  refiners); any other w is refused (``ValueError`` naming both): such a refiner cannot refine for another
  strength, and silently ignoring the request would give images of the wrong strength.
- **A refiner told w (k > 0)** needs one: without it, ``ValueError`` listing the trained scales. No silent
  default: w is the knob of such a refiner, and the middle scale picked for the user would hide which
  strength the images have. (``evaluate`` compares with its guided row, so there w defaults to that row's
  ``teacher.guidance_scale``, as the trainer's periodic evaluation does.)
- **Outside the trained range** [min, max] of its scales: a warning (an extrapolation, never compared with a
  teacher there), not an error; between trained scales it interpolates (measured:
  ``bench/results/2026-12-07-multi-w.md``). A w whose refiner time ``timestep - k (w - 1)`` is negative or a
  w that is not finite is refused.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from omegaconf import DictConfig


def trained_scales(cfg: DictConfig) -> list[float]:
    """The guidance scales of the teacher caches ``cfg`` trains on, sorted and distinct."""
    from .mixture import components

    found = components(cfg)
    return sorted({c.scale for c in found} if found else {float(cfg.teacher.guidance_scale)})


def saved_refiner_config(refiner_dir: str | Path) -> DictConfig:
    """The resolved training config saved with the refiner in ``refiner_dir`` (its ``config.yaml``)."""
    from .config import load_config
    from .refiner import CONFIG_FILE

    path = Path(refiner_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {refiner_dir}")
    return load_config(path)


def refiner_guidance_scale(saved_cfg: DictConfig, guidance_scale: float | None, source: str | Path) -> float | None:
    """The w to pass to the refiner whose saved config is ``saved_cfg`` for a requested ``guidance_scale``
    (``None`` for a refiner of one scale); ``ValueError`` naming ``source`` and the value (module docstring)."""
    slope = float(saved_cfg.refiner.guidance_timestep_slope)
    scales = trained_scales(saved_cfg)
    if guidance_scale is not None:
        try:
            w = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: guidance_scale {guidance_scale!r} is not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"{source}: guidance_scale {w} is not finite")
    if slope == 0:
        if guidance_scale is None or w in scales:
            return None
        raise ValueError(f"{source}: this refiner was trained for guidance scale {_listed(scales)} only "
                         f"(refiner.guidance_timestep_slope = 0), not told w: guidance_scale={w:g} needs another "
                         "refiner (one trained at that scale, or one for a range of scales); leave it out to use "
                         "this one")
    if guidance_scale is None:
        raise ValueError(f"{source}: this refiner was trained for a range of guidance scales ({_listed(scales)}, "
                         f"told w with refiner.guidance_timestep_slope = {slope:g}): give the guidance scale w "
                         f"to refine for (e.g. guidance_scale={scales[len(scales) // 2]:g}; the commands take "
                         "--guidance-scale)")
    time = float(saved_cfg.refiner.timestep) - slope * (w - 1)
    if time < 0:
        raise ValueError(f"{source}: guidance_scale={w:g} gives the refiner time refiner.timestep - "
                         f"refiner.guidance_timestep_slope * (w - 1) = {time:g} < 0 (trained scales "
                         f"{_listed(scales)})")
    if not scales[0] <= w <= scales[-1]:
        warnings.warn(f"{source}: guidance_scale={w:g} is outside the scales this refiner was trained on "
                      f"[{scales[0]:g}, {scales[-1]:g}]: an extrapolation, never matched to a teacher there",
                      stacklevel=3)
    return w


def _listed(scales: list[float]) -> str:
    return ", ".join(f"{w:g}" for w in scales)
