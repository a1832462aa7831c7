"""What a refiner was trained against (``sampler.json``): the denoiser's architecture and the student's sampler.

A refiner only makes sense in front of the same architecture and the same unguided
sampler (its MSD targets were reached through that sampler). These records and checks
let :func:`noiserefine.refiner.load_refiner` and :mod:`noiserefine.pipelines` refuse
another architecture, another sampler or a pipeline of another model, naming the
differing keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backends.base import Backend

SAMPLER_FILE = "sampler.json"
# Scheduler keys that belong to the MODEL (its noise schedule and what it predicts), not to the sampler:
# a stock pipeline whose scheduler differs in these holds another model (``check_model_schedule``).
MODEL_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "rescale_betas_zero_snr", "shift", "use_dynamic_shifting")


def diffusers_class_name(module: torch.nn.Module) -> str:
    """The diffusers/transformers class of a denoiser (``PeftDiTTransformer2DModel`` -> ``DiTTransformer2DModel``)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("diffusers.", "transformers.")):
            return cls.__name__
    return type(module).__name__


def scheduler_record(scheduler_class: type | str, scheduler_config: dict) -> dict:
    """A scheduler as stored in ``sampler.json``: class name and the config keys the class takes, defaults filled
    (keys carried over from another scheduler's config, e.g. PNDM's ``skip_prk_steps``, are dropped)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, scheduler_class) if isinstance(scheduler_class, str) else scheduler_class
    config = dict(cls.from_config(dict(scheduler_config)).config)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {"scheduler_class": cls.__name__,
            "scheduler_config": json.loads(json.dumps({k: v for k, v in config.items() if k in accepted}))}


def denoiser_config(denoiser: torch.nn.Module) -> dict:
    """The denoiser's public config (its architecture), JSON-safe."""
    config = getattr(denoiser, "config", {}) or {}
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


def sampler_record(backend: Backend, num_steps: int) -> dict:
    """What a refiner was trained against: the denoiser's architecture and the unguided student's sampler."""
    return {"backend": backend.name, "denoiser_class": diffusers_class_name(backend.denoiser),
            "denoiser_config": denoiser_config(backend.denoiser), "latent_shape": [int(n) for n in backend.latent_shape],
            **scheduler_record(backend.scheduler_class, backend.scheduler_config), "num_steps": int(num_steps)}


def read_sampler_record(directory: str | Path) -> dict | None:
    """``sampler.json`` of a refiner directory, or None for a refiner saved before it existed."""
    path = Path(directory) / SAMPLER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable sampler record: {error}") from None
    if not isinstance(record, dict) or not {"denoiser_class", "latent_shape", "scheduler_class",
                                             "scheduler_config", "num_steps"} <= set(record):
        raise ValueError(f"{path}: not a sampler record (needs denoiser_class, latent_shape, scheduler_class, "
                         "scheduler_config, num_steps)")
    steps = record["num_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # 2.7 must not run 2 steps
        raise ValueError(f"{path}: num_steps {steps!r} is not a positive integer")
    return record


def _config_differences(ours: dict, theirs: dict, keys=None) -> list[str]:
    keys = sorted(set(ours) | set(theirs)) if keys is None else keys
    return [f"{key}: {ours.get(key)!r} vs {theirs.get(key)!r}" for key in keys if ours.get(key) != theirs.get(key)]


def architecture_error(record: dict, backend: Backend, source: str | Path, differing: list[str]) -> ValueError:
    return ValueError(f"{source}: the refiner was trained for another architecture ({record.get('backend')} "
                      f"{record['denoiser_class']}, latents {tuple(record['latent_shape'])}); this model is "
                      f"{backend.name} {diffusers_class_name(backend.denoiser)}, latents "
                      f"{tuple(backend.latent_shape)} (differs in: {'; '.join(differing)})")


def check_architecture(record: dict, backend: Backend, source: str | Path) -> list[str]:
    """``ValueError`` naming both architectures if ``backend``'s denoiser class or latent shape is not the one the
    refiner was trained on. Returns the differences of the denoiser configs on the keys both name (a newer
    diffusers may add keys): the caller decides on them once it knows whether the weights fit."""
    here = {"denoiser_class": diffusers_class_name(backend.denoiser),
            "latent_shape": [int(n) for n in backend.latent_shape]}
    differing = _config_differences({k: record.get(k) for k in here}, here)
    if differing:
        raise architecture_error(record, backend, source, differing)
    ours, theirs = record.get("denoiser_config", {}), denoiser_config(backend.denoiser)
    return _config_differences(ours, theirs, sorted(set(ours) & set(theirs)))


def check_same_sampler(record: dict, backend: Backend, source: str | Path) -> None:
    """``ValueError`` naming the differing keys if ``backend`` samples with another scheduler than the refiner's."""
    here = scheduler_record(backend.scheduler_class, backend.scheduler_config)
    differing = _config_differences({"scheduler_class": record["scheduler_class"], **record["scheduler_config"]},
                                    {"scheduler_class": here["scheduler_class"], **here["scheduler_config"]})
    if differing:
        raise ValueError(f"{source}: the refiner was trained against another sampler than this model's "
                         f"(refiner vs model: {'; '.join(differing)}); sample with the refiner's sampler "
                         f"({SAMPLER_FILE}) or pass check_sampler=False if you mean it")


def check_model_schedule(record: dict, scheduler_config: dict, source: str | Path) -> None:
    """``ValueError`` if a pipeline's scheduler config says its model has another noise schedule or prediction
    type than the refiner's model (``MODEL_SCHEDULE_KEYS``; the sampler keys are the refiner's to set)."""
    theirs = scheduler_record(record["scheduler_class"], {k: v for k, v in dict(scheduler_config).items()
                                                          if k in MODEL_SCHEDULE_KEYS})["scheduler_config"]
    keys = [k for k in MODEL_SCHEDULE_KEYS if k in record["scheduler_config"]]
    differing = _config_differences(record["scheduler_config"], theirs, keys)
    if differing:
        raise ValueError(f"{source}: the pipeline's scheduler describes another model than the one the refiner "
                         f"was trained on (refiner vs pipeline: {'; '.join(differing)})")
