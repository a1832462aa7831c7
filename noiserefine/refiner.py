"""The noise refiner: a PEFT LoRA on the backend's own denoiser plus a residual.

Two forms (``refiner.form``), both exactly the identity at initialisation (``x̂_T == x_T`` bit for bit):

- ``difference``: ``x̂_T = x_T + (eps_LoRA(x_T, t_ref, c) - eps(x_T, t_ref, c))``; LoRA ``B`` starts at
  zero, so the two calls agree bit for bit at first. Two network calls.
- ``single_call``: ``x̂_T = x_T + head(h_LoRA(x_T, t_ref, c))``, ``h_LoRA`` the input of the denoiser's final
  projection in one LoRA forward and ``head`` a zero-initialised copy of that projection (why this form:
  :mod:`noiserefine.refiner_head`). One network call, as the paper counts its refiner.

``t_ref = refiner.timestep``. :attr:`Refiner.network_calls` is the form's count (2 or 1). The form is
recorded in the saved ``config.yaml``; a refiner saved before forms existed has none and is a
``difference`` refiner (:func:`saved_form`).

A refiner for a range of guidance scales (``refiner.guidance_timestep_slope`` k > 0, trained
on ``data.guidance_scales``) is told each sample's scale w through the denoiser's time input:
``t_ref(w) = refiner.timestep - k (w - 1)`` (still zero at initialisation, for every w); with
``refiner.guidance_correction_gain`` its correction is also multiplied by ``w - 1``. It
must be given w (``refiner(x_T, c, guidance_scale=w)``); a refiner with k = 0 was trained for
one scale and refuses a w. The adapter "refiner"
is active only inside the refiner forward (:func:`lora_enabled`); every other
call (teacher, student rollouts, evaluation, a diffusers pipeline sharing the
denoiser) runs the model without it. Other adapters already on the denoiser (a
style LoRA loaded with ``pipe.load_lora_weights``) keep their state: attaching
the refiner switches nothing else off, and the refiner forward runs on top of
whatever adapters the model applies (zero-shot transfer to that variant).

Use with a stock diffusers pipeline: ``noiserefine.pipelines.refined_latents``
(it also sets the pipeline's scheduler to the sampler the refiner was trained against).
Pipelines multiply user latents by ``scheduler.init_noise_sigma``. The refined
noise lives on the same unit-variance scale as ``x_T`` (a small residual), so
pass it as is and never pre-scale it.

A saved refiner is ``refiner.safetensors`` (the LoRA; a single_call refiner also its head, keys
``output_head.*``), ``config.yaml`` (the
resolved training config), ``sampler.json`` (the denoiser class, config and
latent shape, and the scheduler class, config and number of steps of the
unguided student it was trained against) and its model card ``README.md``
(``model_card.py``). :func:`load_refiner` refuses a backend of another
architecture or, unless told otherwise, another sampler; it takes a directory or a
Hub repo id (``hub.py``).

Weights are saved with safetensors and read back with ``safetensors`` +
``peft.set_peft_model_state_dict`` only: loading never executes code from the file.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .backends.base import Backend, Conditioning
from .config import load_config, save_config
from .config_schema import RefinerConfig
from .files import atomic_path, write_text_atomic
from .hub_refs import resolve_refiner
from .model_card import write_model_card
from .refiner_head import head_replaces_output, zero_head
from .sampler_record import (SAMPLER_FILE, architecture_error, check_architecture, check_same_sampler,
                             diffusers_class_name, read_sampler_record, sampler_record)

ADAPTER_NAME = "refiner"
WEIGHTS_FILE = "refiner.safetensors"
CONFIG_FILE = "config.yaml"
HEAD_PREFIX = "output_head."  # the single_call head's keys in refiner.safetensors
# Network calls of one refinement, by refiner.form; a saved refiner without a form is a difference one.
FORMS = {"difference": 2, "single_call": 1}
LEGACY_FORM = "difference"


def _tuner_layers(denoiser: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]


def _holds_refiner(layer: BaseTunerLayer) -> bool:
    return ADAPTER_NAME in layer._all_available_adapter_names()


def adapters_enabled(denoiser: torch.nn.Module) -> bool:
    """True if any PEFT layer of ``denoiser`` currently applies the refiner's adapter."""
    return any(not m.disable_adapters and ADAPTER_NAME in m.active_adapters and _holds_refiner(m)
               for m in _tuner_layers(denoiser))


def _set_active(layer: BaseTunerLayer, names: list[str], disabled: bool) -> None:
    layer.set_adapter(list(names))
    if layer.disable_adapters != disabled:
        layer.enable_adapters(not disabled)


@contextlib.contextmanager
def lora_enabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """Apply the refiner's adapter for the body of the ``with``; always restore every layer's state.

    Only the layers holding the refiner change: each applies the refiner on top of
    the adapters it applied before (none if adapters were disabled), so a style
    LoRA stays on inside the refiner forward exactly when it is on outside.
    peft's ``set_adapter``/``enable_adapters`` also flip ``requires_grad`` of the
    adapter weights. A leaf whose ``requires_grad`` is False when ``backward`` runs
    silently gets no gradient, and one switched on would collect gradients it
    should not, so the flags are put back as they were, before the body and after.
    """
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    saved = [(m, list(m.active_adapters), m.disable_adapters) for m in _tuner_layers(denoiser) if _holds_refiner(m)]
    try:
        for layer, active, disabled in saved:
            others = [] if disabled else [name for name in active if name != ADAPTER_NAME]
            _set_active(layer, others + [ADAPTER_NAME], False)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        yield
    finally:
        for layer, active, disabled in saved:
            _set_active(layer, active, disabled)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _attach_adapter(denoiser: torch.nn.Module, config: LoraConfig) -> None:
    """``add_adapter`` without its side effect of making the new adapter the only active one.

    diffusers' ``add_adapter`` calls ``set_adapter(name)`` on the whole model, which
    would switch off any adapter loaded before (a style LoRA). Every layer gets back
    the active adapters and enabled state it had; layers new to PEFT apply nothing.
    """
    before = {name: (list(m.active_adapters), m.disable_adapters) for name, m in denoiser.named_modules()
              if isinstance(m, BaseTunerLayer)}
    # Layers new to PEFT take the model's state as diffusers reports it (its first tuner layer's), so that
    # ``active_adapters()`` still names the style LoRA: those names are absent there and apply nothing.
    default = next(iter(before.values()), ([], False))
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, module in denoiser.named_modules():
        if isinstance(module, BaseTunerLayer):
            active, disabled = before.get(name, default)
            _set_active(module, [a for a in active if a != ADAPTER_NAME], disabled)


def detach_refiner(denoiser: torch.nn.Module) -> None:
    """Remove the refiner's adapter from ``denoiser`` (other adapters and their states stay)."""
    if ADAPTER_NAME in getattr(denoiser, "peft_config", {}):
        denoiser.delete_adapters(ADAPTER_NAME)


def _cfg_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)


class Refiner(torch.nn.Module):
    """``refiner(x_T, cond) -> x̂_T``; the LoRA (adapter "refiner") is its only trainable part."""

    def __init__(self, backend: Backend, refiner_cfg: RefinerConfig | DictConfig):
        super().__init__()
        denoiser = backend.denoiser
        if not hasattr(denoiser, "add_adapter"):
            raise ValueError(f"the {backend.name} denoiser {type(denoiser).__name__} has no diffusers "
                             "PEFT support (add_adapter)")
        if ADAPTER_NAME in getattr(denoiser, "peft_config", {}):
            raise ValueError(f"the {backend.name} denoiser already has a '{ADAPTER_NAME}' adapter; "
                             "build the Refiner on a fresh backend")
        self.backend = backend
        self.cfg = _cfg_dict(refiner_cfg)
        self.form = str(self.cfg.get("form", LEGACY_FORM))
        if self.form not in FORMS:
            raise ValueError(f"refiner.form is {self.form!r}; expected one of {sorted(FORMS)}")
        self.gain = bool(self.cfg.get("guidance_correction_gain", False))  # the correction times (w - 1)
        if self.gain and not self.guidance_conditioned:
            raise ValueError("refiner.guidance_correction_gain needs a refiner told w (guidance_timestep_slope > 0)")
        self.denoiser = denoiser
        _attach_adapter(denoiser, LoraConfig(r=int(self.cfg["lora_rank"]), lora_alpha=float(self.cfg["lora_alpha"]),
                                             target_modules=list(self.cfg["target_modules"]), init_lora_weights=True))
        self._lora = [p for name, p in denoiser.named_parameters()
                      if "lora_" in name and f".{ADAPTER_NAME}" in name]
        lora_ids = {id(p) for p in self._lora}
        for parameter in denoiser.parameters():
            parameter.requires_grad_(id(parameter) in lora_ids)
        # single_call: the zero-initialised head (a submodule of the Refiner, never of the denoiser)
        self.head = zero_head(denoiser, self._lora[0].dtype) if self.form == "single_call" else None
        # What it was trained against (``sampler.json``), set by ``load_refiner``; None while training.
        self.sampler: dict | None = None
        self.register_buffer("timestep", torch.tensor(float(self.cfg["timestep"]), device=backend.device),
                             persistent=False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora) + (list(self.head.parameters()) if self.head is not None else [])

    @property
    def network_calls(self) -> int:
        """Denoiser calls of one refinement: 2 for the difference form, 1 for single_call."""
        return FORMS[self.form]

    @property
    def guidance_conditioned(self) -> bool:
        """True for a refiner of a range of guidance scales: every call needs ``guidance_scale``."""
        return float(self.cfg.get("guidance_timestep_slope", 0.0)) > 0

    def refiner_time(self, guidance_scale: float | torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The denoiser's time input: ``refiner.timestep``, or per sample ``timestep - k (w - 1)`` for a refiner
        told w (``ValueError`` for a w missing, given to a one-scale refiner, of the wrong shape, or whose time
        is negative)."""
        if not self.guidance_conditioned:
            if guidance_scale is not None:
                raise ValueError("this refiner was trained for one guidance scale (refiner.guidance_timestep_slope"
                                 " = 0): it is not told w; call it without guidance_scale")
            return self.timestep
        if guidance_scale is None:
            raise ValueError(f"this refiner was trained for a range of guidance scales (refiner."
                             f"guidance_timestep_slope = {self.cfg['guidance_timestep_slope']:g}): give the "
                             "guidance scale w to refine for (guidance_scale=...)")
        w = torch.as_tensor(guidance_scale, dtype=torch.float32, device=self.timestep.device)
        if w.ndim == 0:
            w = w.expand(batch_size)
        if tuple(w.shape) != (batch_size,):
            raise ValueError(f"guidance_scale has shape {tuple(w.shape)}; expected a number or one per sample "
                             f"({batch_size},)")
        time = self.timestep - float(self.cfg["guidance_timestep_slope"]) * (w - 1)
        if not bool(torch.isfinite(time).all()) or bool((time < 0).any()):
            raise ValueError(f"guidance scales {sorted(set(w.tolist()))} give refiner times {sorted(set(time.tolist()))}"
                             "; each must be finite and >= 0 (w <= 1 + refiner.timestep / "
                             "refiner.guidance_timestep_slope)")
        return time

    def forward(self, noise: torch.Tensor, cond: Conditioning,
                guidance_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """``x̂_T = x_T + (eps_LoRA - eps)`` (difference) or ``x_T + head(h_LoRA)`` (single_call), at
        ``(x_T, t_ref, c)``; the graph reaches the LoRA (and the head) only.

        ``guidance_scale``: w (a number, or one per sample) for a refiner told w, else None.
        """
        if adapters_enabled(self.denoiser):
            raise RuntimeError("adapters are enabled outside the refiner forward; teacher/student "
                               "calls would run the LoRA")
        backend = self.backend
        time = self.refiner_time(guidance_scale, noise.shape[0])
        noise = noise.to(backend.device)
        x = noise.to(backend.dtype)
        gain = 1.0 if not self.gain else (torch.as_tensor(guidance_scale, dtype=noise.dtype, device=noise.device)
                                          .expand(noise.shape[0]).view(-1, *[1] * (noise.ndim - 1)) - 1)
        if self.head is not None:  # one call: the head's output is the correction
            with lora_enabled(self.denoiser), head_replaces_output(self.denoiser, self.head):
                return noise + gain * backend.denoise(x, time, cond).to(noise.dtype)
        with torch.no_grad():
            base = backend.denoise(x, time, cond)
        with lora_enabled(self.denoiser):
            adapted = backend.denoise(x, time, cond)
        return noise + gain * (adapted - base).to(noise.dtype)

    @torch.no_grad()
    def refine(self, noise: torch.Tensor, prompts: Sequence[str],
               guidance_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Refined noise for ``prompts`` (at ``guidance_scale`` w for a refiner told w): pass it as ``latents``
        to an unguided pipeline."""
        return self(noise, self.backend.encode_prompts(list(prompts)), guidance_scale)

    def state_dict_for_saving(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (peft key names, no adapter name) and the head's (``output_head.*``) as contiguous
        CPU tensors."""
        state = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER_NAME)
        if self.head is not None:
            state.update({HEAD_PREFIX + key: value for key, value in self.head.state_dict().items()})
        return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}

    def load_weights(self, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> None:
        """Load LoRA weights; ``ValueError`` naming ``source`` if keys or shapes do not match."""
        expected = {key: value.shape for key, value in self.state_dict_for_saving().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        model = f"the {self.backend.name} {diffusers_class_name(self.denoiser)}"
        if missing or unexpected:
            raise ValueError(f"{source}: refiner weights do not match the LoRA built from the config on {model} "
                             f"(trained for another architecture?): missing keys {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
        if wrong:
            raise ValueError(f"{source}: refiner weights have wrong shapes for {model} (file vs model; trained for "
                             f"another architecture, or another lora_rank?): {wrong[:8]}{' ...' if len(wrong) > 8 else ''}")
        head = {key[len(HEAD_PREFIX):]: value for key, value in state.items() if key.startswith(HEAD_PREFIX)}
        if self.head is not None:
            self.head.load_state_dict(head)
        state = {key: value for key, value in state.items() if not key.startswith(HEAD_PREFIX)}
        result = set_peft_model_state_dict(self.denoiser, state, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{source}: peft did not load keys {sorted(result.unexpected_keys)}")


def save_refiner(refiner: Refiner, directory: str | Path, resolved_cfg: DictConfig) -> Path:
    """Write ``refiner.safetensors``, ``config.yaml`` and ``sampler.json`` into ``directory``, each atomically.

    ``sampler.json`` records the backend's denoiser and sampler with
    ``resolved_cfg.student.num_steps``: what the refiner was trained against.

    Each file goes to a temp name in the same directory and is ``os.replace``d,
    so a crash never leaves a truncated file; other files in ``directory`` are kept.
    """
    if _cfg_dict(resolved_cfg["refiner"]) != refiner.cfg:
        raise ValueError(f"resolved_cfg.refiner {_cfg_dict(resolved_cfg['refiner'])} differs from the "
                         f"refiner's own config {refiner.cfg}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(refiner.state_dict_for_saving(), str(tmp), metadata={"adapter": ADAPTER_NAME, "form": refiner.form})
    save_config(resolved_cfg, directory / CONFIG_FILE)
    record = sampler_record(refiner.backend, int(resolved_cfg["student"]["num_steps"]))
    write_text_atomic(directory / SAMPLER_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_model_card(directory, resolved_cfg, record)  # README.md: the Hub's metadata and what it was trained on
    return directory


def saved_form(directory: str | Path) -> str:
    """The form of the refiner saved in ``directory``: ``refiner.form`` of its ``config.yaml`` as written, or
    ``difference`` (:data:`LEGACY_FORM`) when the file has none (saved before forms existed, whatever today's
    default); ``ValueError`` naming the file and the value for a form this version does not know."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    form = OmegaConf.select(OmegaConf.load(path), "refiner.form", default=LEGACY_FORM)
    if form not in FORMS:
        raise ValueError(f"{path}: refiner.form is {form!r}, a refiner form this version does not know "
                         f"(expected one of {sorted(FORMS)})")
    return str(form)


def load_refiner(directory: str | Path, backend: Backend, check_sampler: bool = True) -> Refiner:
    """Rebuild the refiner from ``config.yaml`` (its ``refiner`` section, in its :func:`saved_form`) and load
    its weights.

    Refuses (``ValueError``) a backend whose denoiser class or latent shape differ from
    ``sampler.json``'s, or whose weights do not fit the LoRA (another architecture: the
    error names the differing denoiser config keys) and, with ``check_sampler``, one
    whose sampler differs (a refiner trained against one sampler must not silently meet
    another). A same-architecture model (a fine-tune, or the model with a style LoRA)
    loads it: zero-shot transfer. The backend is left as it was on any error. ``directory`` may be a Hub
    repo id (a string; ``noiserefine.hub_refs.resolve_refiner``'s rule), checked the same way once downloaded.
    """
    directory = resolve_refiner(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    form = saved_form(directory)
    cfg = load_config(directory / CONFIG_FILE)
    record = read_sampler_record(directory)
    config_differences: list[str] = []
    if record is None:
        warnings.warn(f"{directory} has no {SAMPLER_FILE} (saved by an older version): its architecture and "
                      "sampler cannot be checked", stacklevel=2)
    else:
        config_differences = check_architecture(record, backend, directory)
    refiner = Refiner(backend, {**_cfg_dict(cfg.refiner), "form": form})
    try:
        try:
            refiner.load_weights(load_file(str(weights), device=str(backend.device)), source=weights)
        except ValueError as error:
            if config_differences:  # the weights do not fit and the configs say why
                raise architecture_error(record, backend, directory, config_differences) from error
            raise
        if record is not None and check_sampler:
            check_same_sampler(record, backend, directory)
    except BaseException:
        detach_refiner(backend.denoiser)  # leave the backend as it was
        raise
    if config_differences:  # every weight fits: the same architecture, spelled differently
        warnings.warn(f"{directory}: the denoiser's config differs from the one the refiner was trained on in "
                      f"{'; '.join(config_differences)}, but every refiner weight fits it; loaded", stacklevel=2)
    refiner.sampler = record if record is not None else {"num_steps": int(cfg.student.num_steps)}
    return refiner
