"""The teacher's guidance is a ``diffusers.guiders`` guider; this module builds it and runs its branches batched.

``teacher.guidance`` names a guider class of ``diffusers.guiders`` (``teacher.guider_args`` holds its
arguments; ``guidance_scale`` comes from ``teacher.guidance_scale``) or one of two short forms kept
for existing configs and caches: ``cfg`` (ClassifierFreeGuidance) and ``cfg_pag``
(:class:`PipelinePAG`, CFG plus PAG as StableDiffusion(XL)PAGPipeline runs it).

Per step the guider is driven as diffusers' modular pipelines drive it (``set_state``,
``prepare_inputs``, ``prepare_models``/``cleanup_models`` around each branch, then the guider
combines the outputs), except that all branches go through ONE denoiser call: a guider that
perturbs the model (PAG, SLG, SEG) installs its hooks for one branch, so the hooked forwards are
captured and the batched call runs, in each hooked module, the hooked forward on that branch's
rows only (what the PAG pipelines' own processors do for their third chunk).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping

import diffusers.guiders
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance, PerturbedAttentionGuidance
from diffusers.hooks.layer_skip import LayerSkipConfig
from omegaconf import OmegaConf

SHORT_FORMS = ("cfg", "cfg_pag")
_ID = BaseGuidance._identifier_key


class PipelinePAG(PerturbedAttentionGuidance):
    """CFG + PAG exactly as StableDiffusion(XL)PAGPipeline: PAG at every step, layers named as there.

    diffusers' PerturbedAttentionGuidance tests ``start < step``, so its PAG never runs at step 0
    even with ``perturbed_guidance_start=0``; the stock pipelines perturb every step.
    ``pag_layers`` are the PAG pipelines' layer ids ("mid", "up_blocks.0"), matched exactly by
    the backend (:meth:`Backend.pag_attention_modules`) when :func:`bind` is called.
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, perturbed_guidance_scale: float = 3.0,
                 pag_layers: list[str] | tuple[str, ...] = ("mid",)):
        super().__init__(guidance_scale=guidance_scale, perturbed_guidance_scale=perturbed_guidance_scale,
                         perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0, perturbed_guidance_config=[])
        self.pag_layers = tuple(pag_layers)

    def bind(self, attention_module_names: list[str], denoiser: torch.nn.Module) -> None:
        """Perturb the transformer blocks holding the named self-attention modules."""
        self.skip_layer_config = block_configs(attention_module_names, denoiser)
        self._skip_layer_hook_names = [f"SkipLayerGuidance_{i}" for i in range(len(self.skip_layer_config))]

    def _is_slg_enabled(self) -> bool:
        return self._enabled and not math.isclose(self.skip_layer_guidance_scale, 0.0)


def block_configs(attention_module_names: list[str], denoiser: torch.nn.Module) -> list[LayerSkipConfig]:
    """LayerSkipConfigs (attention scores -> identity) of the blocks ``<fqn>.<i>`` holding the named modules."""
    indices: dict[str, list[int]] = {}
    for name in attention_module_names:
        parts = name.split(".")
        for j in range(len(parts) - 1, 0, -1):  # the innermost ModuleList holding the module
            if parts[j].isdigit() and isinstance(denoiser.get_submodule(".".join(parts[:j])), torch.nn.ModuleList):
                indices.setdefault(".".join(parts[:j]), []).append(int(parts[j]))
                break
        else:
            raise ValueError(f"PAG: attention module {name!r} is in no block list of the denoiser")
    return [LayerSkipConfig(indices=sorted(set(found)), fqn=fqn, skip_attention=False,
                            skip_attention_scores=True, skip_ff=False) for fqn, found in indices.items()]


GUIDERS: dict[str, type[BaseGuidance]] = {
    name: getattr(diffusers.guiders, name) for name in dir(diffusers.guiders)
    if name.endswith("Guidance") and name != "BaseGuidance"}
GUIDERS[PipelinePAG.__name__] = PipelinePAG  # adding a guider = one entry here


@contextlib.contextmanager
def _quiet_guider_init() -> Iterator[None]:
    """Every guider's __init__ logs an "experimental feature" warning; building one per config is routine."""
    logger = logging.getLogger("diffusers.guiders.guider_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def make_guider(teacher, guidance_scale: float | None = None) -> BaseGuidance:
    """The guider of a ``teacher`` config section (``guidance_scale`` overrides ``teacher.guidance_scale``)."""
    name = str(teacher.guidance)
    scale = float(teacher.guidance_scale if guidance_scale is None else guidance_scale)
    args = getattr(teacher, "guider_args", None) or {}
    args = dict(OmegaConf.to_container(args, resolve=True) if OmegaConf.is_config(args) else args)
    if name in SHORT_FORMS and args:
        raise ValueError(f"teacher.guider_args is for a named guider class; teacher.guidance={name} takes "
                         f"teacher.guidance_scale, teacher.pag_scale, teacher.pag_layers (got {sorted(args)})")
    if name == "cfg":
        cls, args = GUIDERS["ClassifierFreeGuidance"], {"guidance_scale": scale}
    elif name == "cfg_pag":
        cls, args = PipelinePAG, {"guidance_scale": scale, "perturbed_guidance_scale": float(teacher.pag_scale),
                                  "pag_layers": list(teacher.pag_layers)}
    elif name in GUIDERS:
        cls = GUIDERS[name]
        parameters = inspect.signature(cls.__init__).parameters
        if "guidance_scale" in args:
            raise ValueError("teacher.guider_args.guidance_scale: set teacher.guidance_scale instead")
        unknown = sorted(set(args) - set(parameters))
        if unknown:
            raise ValueError(f"teacher.guider_args: {unknown} are not arguments of {name} "
                             f"({sorted(p for p in parameters if p != 'self')})")
        if "guidance_scale" in parameters:
            args["guidance_scale"] = scale
    else:
        raise ValueError(f"teacher.guidance={name!r}: use cfg, cfg_pag or a guider class of diffusers.guiders "
                         f"({sorted(GUIDERS)})")
    with _quiet_guider_init():
        return cls(**args)


def guider_identity(guider: BaseGuidance) -> dict:
    """The guider's class and saved config (``save_pretrained``'s JSON, without the diffusers version)."""
    config = json.loads(guider.to_json_string())
    config.pop("_diffusers_version", None)
    return {"class": type(guider).__name__, "config": config}


def guider_label(guider: BaseGuidance | None) -> str:
    """A short human label: "CFG 3", "CFG 3 + PAG 2", "AdaptiveProjectedGuidance 3"."""
    if guider is None:
        return "none"
    if type(guider) is GUIDERS["ClassifierFreeGuidance"]:
        return f"CFG {guider.guidance_scale:g}"
    if isinstance(guider, PipelinePAG):
        return f"CFG {guider.guidance_scale:g} + PAG {guider.skip_layer_guidance_scale:g}"
    scale = getattr(guider, "guidance_scale", None)
    return type(guider).__name__ + (f" {scale:g}" if isinstance(scale, (int, float)) else "")


def network_calls(guider: BaseGuidance | None, num_steps: int) -> int:
    """Denoiser evaluations per sample for a ``num_steps`` rollout (the guider may vary them per step)."""
    if guider is None:
        return num_steps
    probe = copy.copy(guider)  # set_state on a copy: the caller's guider keeps its state
    total = 0
    for step in range(num_steps):
        probe.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(0))
        total += probe.num_conditions
    return total


def perturbs_model(guider: BaseGuidance) -> bool:
    """Whether the guider installs hooks for some branch (PAG, SLG, SEG, AutoGuidance)."""
    return type(guider).prepare_models is not BaseGuidance.prepare_models


def _hooked(denoiser: torch.nn.Module) -> dict[torch.nn.Module, tuple[str, ...]]:
    return {module: tuple(module._diffusers_hook._hook_order) for module in denoiser.modules()
            if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook._hook_order}


def capture_branch(guider: BaseGuidance, denoiser: torch.nn.Module, perturbing: bool) -> dict:
    """Let the guider prepare the model for its next branch; return {module: hooked forward}, model restored."""
    before = _hooked(denoiser) if perturbing else {}
    guider.prepare_models(denoiser)
    try:
        if not perturbing:
            return {}
        return {module: module.forward for module, names in _hooked(denoiser).items()
                if names != before.get(module, ())}
    finally:
        guider.cleanup_models(denoiser)


def _rows(value, start: int, stop: int, total: int):
    """Rows ``start:stop`` of every tensor batched over the whole call (dicts, lists and tuples recursively)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.ndim and value.shape[0] == total else value
    if isinstance(value, Mapping):
        return {key: _rows(item, start, stop, total) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, start, stop, total) for item in value)
    return value


def _cat(parts: list):
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], (list, tuple)):
        return type(parts[0])(_cat([part[i] for part in parts]) for i in range(len(parts[0])))
    raise TypeError(f"cannot split a batched call per branch through a module returning {type(parts[0]).__name__}")


# The branches [first, last) whose rows the innermost running per-branch call holds: a hooked module
# nested in another (SLG hooks a block and its feed-forward) sees only its enclosing group's rows.
_ACTIVE_BRANCHES: list[tuple[int, int]] = []


class _PerBranchForward:
    """A module forward that runs each branch's rows through that branch's forward (plain or hooked).

    Consecutive branches with the same forward run as one call, so [uncond, cond] stay one batch
    as in the stock PAG processors.
    """

    def __init__(self, forwards: list[Callable], rows_per_branch: int):
        self.forwards, self.rows = forwards, rows_per_branch

    def __call__(self, *args, **kwargs):
        first, last = _ACTIVE_BRANCHES[-1] if _ACTIVE_BRANCHES else (0, len(self.forwards))
        total = self.rows * (last - first)
        groups: list[list] = []  # [forward, first branch, end branch]
        for branch in range(first, last):
            if groups and groups[-1][0] is self.forwards[branch]:
                groups[-1][2] = branch + 1
            else:
                groups.append([self.forwards[branch], branch, branch + 1])
        outputs = []
        for forward, start, stop in groups:
            rows = ((start - first) * self.rows, (stop - first) * self.rows, total)
            _ACTIVE_BRANCHES.append((start, stop))
            try:
                outputs.append(forward(*_rows(args, *rows), **_rows(kwargs, *rows)))
            finally:
                _ACTIVE_BRANCHES.pop()
        return outputs[0] if len(outputs) == 1 else _cat(outputs)


@contextlib.contextmanager
def per_branch_forwards(branch_hooks: list[dict], rows_per_branch: int) -> Iterator[None]:
    """Install :class:`_PerBranchForward` on every module some branch hooks; always restore the forwards."""
    modules = {module for hooks in branch_hooks for module in hooks}
    saved = {module: module.__dict__.get("forward") for module in modules}
    try:
        for module in modules:
            plain = module.forward
            module.forward = _PerBranchForward([hooks.get(module, plain) for hooks in branch_hooks],
                                               rows_per_branch)
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
