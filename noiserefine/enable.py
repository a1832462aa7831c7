"""One line in a stock pipeline: every later ``pipe(prompt, ...)`` starts from refined noise.

    from noiserefine.enable import enable_refiner, disable_refiner

    enable_refiner(pipe, "runs/sd21/refiner")
    images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    disable_refiner(pipe)  # the pipeline as it was
    enable_refiner(pipe, "runs/sd21/refiner-multi-w", guidance_scale=5.0)  # a refiner for a range of scales: its w

What :func:`enable_refiner` changes until :func:`disable_refiner`:

- **Noise.** The pipeline's own ``prepare_latents`` is wrapped: the noise it would draw
  (``randn_tensor`` with the call's ``generator``, drawn in float32) is refined for the
  call's prompts (each repeated ``num_images_per_prompt`` times, in the pipeline's batch
  order), then handed to the original ``prepare_latents`` as ``latents=``. So the
  pipeline's own scaling applies exactly as for user-given latents (times the scheduler's
  ``init_noise_sigma`` for SD/SDXL, as is for SD3), and ``pipe(prompts,
  generator=[torch.Generator().manual_seed(s) for s in seeds])`` equals
  ``pipe(prompts, latents=refined_latents(pipe, refiner, prompts, seeds), ...)`` bit for bit:
  a CPU generator per seed draws the project's noise of that seed
  (``noiserefine.noise``). A call that passes ``latents=`` itself gets them unchanged.
- **Scheduler and refiner.** As :func:`noiserefine.pipelines.attach_refiner`: the refiner's
  sampler replaces the pipeline's scheduler (for SDXL's shipped Euler that is DDIM, whose
  ``init_noise_sigma`` is 1), the LoRA sits on the pipeline's own denoiser, active only
  inside the refiner forward.
- **Call defaults.** ``num_inference_steps`` = the refiner's student steps, ``guidance_scale=1``
  (CFG off) and ``pag_scale=0`` on PAG pipelines: the unguided sampling the refiner was
  trained for. A call may pass its own; guidance on top of refined noise is allowed and
  warned about once per :func:`enable_refiner`.

The call-time behaviour needs the pipeline's ``__call__``, which Python looks up on the
class: the pipeline object's class is swapped for a subclass of the same name (saving,
``isinstance`` and the registry's family lookup see the original class). Prompts must be
text (``prompt_embeds`` alone cannot be refined: ``ValueError``); ``prompt_2``/``prompt_3``
go to the pipeline only, the refiner sees ``prompt``.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from . import pipelines
from .pipelines import attach_refiner, unguided_call_kwargs
from .refiner import detach_refiner
from .refiner_scales import refiner_guidance_scale, saved_refiner_config

_STATE = "_noiserefine_enabled"  # pipeline attribute: what enable_refiner changed, for disable_refiner
_SUBCLASSES: dict[type, type] = {}  # original pipeline class -> its refining subclass (one per class)


def enable_refiner(pipe, refiner_dir: str | Path, guidance_scale: float | None = None):
    """Make every later ``pipe(...)`` start from noise refined by ``refiner_dir`` (see the module docstring).

    ``guidance_scale``: the w a refiner trained for a range of scales refines for (required for such a refiner;
    a refiner of one scale takes none or its own: ``noiserefine.refiner_scales``). It is the refiner's w, not
    the pipeline call's CFG scale, which stays 1. Enabling again (another refiner, or another w) first
    disables the previous one. Returns ``pipe``."""
    w = refiner_guidance_scale(saved_refiner_config(refiner_dir), guidance_scale, refiner_dir)  # before any change
    if getattr(pipe, _STATE, None) is not None:
        disable_refiner(pipe)
    refiner_dir = Path(refiner_dir).resolve()
    state = {"class": type(pipe), "scheduler": pipe.scheduler, "attached": getattr(pipe, pipelines._ATTACHED, None),
             "adapters": _adapter_state(pipe), "warned": False}
    try:
        refiner = attach_refiner(pipe, refiner_dir)  # sets the scheduler; ValueError for another model's
    except BaseException:
        pipe.scheduler = state["scheduler"]  # set before a refusal of the refiner's architecture
        raise
    state.update(refiner=refiner, defaults=unguided_call_kwargs(pipe, refiner_dir), guidance_scale=w)
    setattr(pipe, _STATE, state)
    pipe.__class__ = _refining_subclass(state["class"])
    return pipe


def disable_refiner(pipe):
    """Undo :func:`enable_refiner`: the original class (``__call__``, ``prepare_latents``), scheduler object and
    denoiser modules (the refiner's LoRA layers removed when the denoiser had no adapters before). ``ValueError``
    if the refiner is not enabled. Returns ``pipe``."""
    state = getattr(pipe, _STATE, None)
    if state is None:
        raise ValueError(f"no refiner is enabled on this {type(pipe).__name__}; call enable_refiner first")
    pipe.__class__ = state["class"]
    object.__delattr__(pipe, _STATE)
    pipe.scheduler = state["scheduler"]  # through the pipeline's __setattr__: its config entry follows
    refiner = state["refiner"]
    if state["attached"] is not None and state["attached"][1] is refiner:
        return pipe  # attached by an earlier refined_latents call, which enable reused: it stays
    detach_refiner(refiner.denoiser)
    object.__delattr__(pipe, pipelines._ATTACHED)
    before = [adapters for module, adapters in state["adapters"] if module is refiner.denoiser]
    if before and not before[0][0]:  # no adapters before: remove the emptied LoRA wrappers, as it was built
        refiner.denoiser.unload_lora()  # (sets the instance's peft-loaded flag, which a fresh module lacks)
        vars(refiner.denoiser).pop("_hf_peft_config_loaded", None)
        if before[0][1] is not None:
            refiner.denoiser._hf_peft_config_loaded = before[0][1]
    return pipe


def _adapter_state(pipe) -> list[tuple[torch.nn.Module, tuple[dict, bool | None]]]:
    """Each module of the pipeline with its adapters (``peft_config``) and diffusers' peft-loaded flag if set on it."""
    return [(module, (dict(getattr(module, "peft_config", None) or {}), vars(module).get("_hf_peft_config_loaded")))
            for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


def _refining_subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _call, "prepare_latents": _prepare_latents,
                                                     "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _SUBCLASSES[cls]


def _call(self, *args, **kwargs):
    state = getattr(self, _STATE)
    original = state["class"]
    bound = inspect.signature(original.__call__).bind(self, *args, **kwargs)
    given = bound.arguments
    prompt = given.get("prompt")
    if prompt is None and given.get("latents") is None:
        raise ValueError("enable_refiner refines noise for text prompts: pass prompt= (prompt_embeds alone cannot "
                         "be refined), or latents= of your own")
    guided = {k: given[k] for k, off in (("guidance_scale", 1.0), ("pag_scale", 0.0)) if (given.get(k) or 0) > off}
    if guided and not state["warned"]:
        state["warned"] = True
        warnings.warn(f"refined noise with guidance on top ({guided}): the refiner replaces guidance; "
                      f"its trained setting is {state['defaults']}", stacklevel=2)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    copies = int(given.get("num_images_per_prompt") or 1)
    state["prompts"] = [str(p) for p in prompts for _ in range(copies)]  # the pipeline's batch order
    try:
        return original.__call__(self, *args, **{**{k: v for k, v in state["defaults"].items() if k not in given},
                                                 **kwargs})
    finally:
        state.pop("prompts", None)


def _prepare_latents(self, *args, **kwargs):
    state = getattr(self, _STATE)
    original = state["class"].prepare_latents
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    if given["latents"] is not None:  # the call's own latents: used as given
        return original(*bound.args, **bound.kwargs)
    backend = state["refiner"].backend
    shape = (int(given["batch_size"]), int(given["num_channels_latents"]),
             int(given["height"]) // self.vae_scale_factor, int(given["width"]) // self.vae_scale_factor)
    if tuple(shape[1:]) != tuple(backend.latent_shape):
        raise ValueError(f"the refiner makes latents of shape {tuple(backend.latent_shape)}; this call asks for "
                         f"{shape[1:]} (height {given['height']}, width {given['width']}): call without height/width")
    prompts = state["prompts"]
    if len(prompts) != shape[0]:
        raise ValueError(f"{len(prompts)} prompts for a batch of {shape[0]} latents")
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(shape, generator=given["generator"], device=backend.device, dtype=torch.float32)
    with torch.no_grad():  # as noiserefine.pipelines.refined_latents
        given["latents"] = state["refiner"].refine(noise, prompts, guidance_scale=state["guidance_scale"]).to(
            backend.dtype)
    return original(*bound.args, **bound.kwargs)
