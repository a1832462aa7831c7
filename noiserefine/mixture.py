"""A data mixture: the components of a run's training data, each one teacher cache, and their shares.

``data.mixture`` lists components (``config.MixtureComponentConfig``): a name, a weight and overlays of
``data`` (prompt sources, sample count, plan: :data:`DATA_KEYS`) and ``teacher`` (guidance kind, scales,
PAG layers, guider arguments, steps) merged onto the run's config. The merged config is the component's
config: its cache is ``cache_dir_for`` of it, keyed and generated exactly as any one cache
(``pipeline/generate_targets.py --config <run config> --component NAME``).

``data.guidance_scales = [w1, ..., wS]`` is the mixture of S components of equal weight, component ``s``
named ``scale_label(ws)`` with the config at ``teacher.guidance_scale = ws`` (:func:`at_guidance_scale`):
one mechanism for both (the stream and its schedule: ``train/mixture.py``).

Weights are shares of the global batches; a weight left out is the component's ``data.num_samples`` (each
component's samples then come round equally often). They are reduced to coprime integers (exactly:
``0.4, 0.6`` -> ``2, 3``), which the schedule needs. Both stages import this module; it imports no stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from math import gcd, lcm

from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

# What a component may set in its ``data`` overlay: what makes its cache (and where it is). The rest of
# ``data`` (cache_root, object-store I/O, the mixture itself) belongs to the run.
DATA_KEYS = ("sources", "num_samples", "shard_size", "base_seed", "dedup", "max_prompt_chars", "target_dtype",
             "cache_dir", "allow_partial_cache")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a JSON key, a command-line value, a log word


@dataclass(frozen=True)
class Component:
    """One cache of a run: its ``name``, its integer ``share`` of the global batches and its config."""

    name: str
    share: int
    cfg: DictConfig

    @property
    def scale(self) -> float:
        """Its teacher's ``guidance_scale`` (the w a refiner told w is given for its samples)."""
        return float(self.cfg.teacher.guidance_scale)


def at_guidance_scale(cfg, scale: float) -> DictConfig:
    """``cfg`` with ``teacher.guidance_scale = scale``: the config whose teacher cache holds that scale's targets."""
    return OmegaConf.merge(cfg, {"teacher": {"guidance_scale": float(scale)}})


def scale_label(scale: float) -> str:
    """The name of scale ``scale``'s component (the key of its shard rows in a checkpoint)."""
    return repr(float(scale))


def component_config(cfg, entry) -> DictConfig:
    """``cfg`` with the component ``entry``'s overlays merged in: the config of ONE cache, a valid config on its
    own (no ``data.mixture``, and so no refiner told w: ``refiner.guidance_timestep_slope = 0``; the run's
    refiner is the run's). Lists (``data.sources``, ``teacher.pag_layers``) and ``teacher.guider_args`` are
    replaced, not merged; a component that sets ``teacher.guidance`` has no guider arguments unless it gives them. ``ValueError`` naming an unknown or mistyped key."""
    data = OmegaConf.to_container(entry.data) if isinstance(entry.data, DictConfig) else dict(entry.data)
    teacher = OmegaConf.to_container(entry.teacher) if isinstance(entry.teacher, DictConfig) else dict(entry.teacher)
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"its data overlay sets {unknown}; a component may set only data.{{{', '.join(DATA_KEYS)}}} "
                         "(the rest of data belongs to the run)")
    try:
        merged = OmegaConf.merge(cfg, {"data": {**data, "mixture": []}, "teacher": teacher,
                                       "refiner": {"guidance_timestep_slope": 0.0}})
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ValueError(f"bad key '{key}' in its overlay: {str(error).splitlines()[0]}") from None
    if "guider_args" in teacher or "guidance" in teacher:  # a mapping would merge key by key: the component's
        with read_write(merged):  # arguments replace the run's; another guidance starts from none
            merged.teacher.guider_args = teacher.get("guider_args", {})
    return merged


def integer_shares(weights: list[float]) -> list[int]:
    """Positive weights as coprime integers in the same ratio, exactly (``[0.4, 0.6]`` -> ``[2, 3]``)."""
    fractions = [Fraction(str(float(w))) for w in weights]  # str: 0.1 is 1/10, not the nearest binary float
    if any(f <= 0 for f in fractions):
        raise ValueError(f"mixture weights must be > 0, got {list(weights)}")
    denominator = lcm(*(f.denominator for f in fractions))
    integers = [int(f * denominator) for f in fractions]
    divisor = gcd(*integers)
    return [i // divisor for i in integers]


def components(cfg) -> list[Component]:
    """The components of ``cfg``'s data: ``data.mixture``'s, else one per ``data.guidance_scales`` w, else none
    (one cache: ``cfg``'s own)."""
    if cfg.data.mixture:
        entries = list(cfg.data.mixture)
        configs = [component_config(cfg, entry) for entry in entries]
        weights = [entry.weight if entry.weight is not None else c.data.num_samples
                   for entry, c in zip(entries, configs)]
        names = [str(entry.name) for entry in entries]
    elif cfg.data.guidance_scales:
        configs = [at_guidance_scale(cfg, w) for w in cfg.data.guidance_scales]
        weights = [1] * len(configs)
        names = [scale_label(w) for w in cfg.data.guidance_scales]
    else:
        return []
    return [Component(name, share, c) for name, share, c in zip(names, integer_shares(weights), configs)]


def component_named(cfg, name: str) -> Component:
    """The component ``name`` of ``cfg``'s data; ``ValueError`` listing the components there are."""
    found = components(cfg)
    for component in found:
        if component.name == name:
            return component
    listed = ", ".join(c.name for c in found) or "none: it has no data.mixture or data.guidance_scales"
    raise ValueError(f"--component {name!r}: no such component in this config's data mixture (components: {listed})")
