"""The noise refiner: a PEFT LoRA on the backend's own denoiser plus a residual.

``x̂_T = x_T + (eps_LoRA(x_T, t_ref, c) - eps(x_T, t_ref, c))`` with ``t_ref =
refiner.timestep``. LoRA ``B`` starts at zero, so at initialisation the
correction is exactly 0 and ``x̂_T == x_T`` bit for bit. The adapter is enabled
only inside the refiner forward (:func:`lora_enabled`); every other call
(teacher, student rollouts, evaluation, a diffusers pipeline sharing the
denoiser) runs the plain base model.

Use with a stock diffusers pipeline (guidance off)::

    refiner = load_refiner("runs/refiner/final", backend)   # backend wraps pipe.unet
    noise = noise_from_seeds(seeds, backend.latent_shape)
    latents = refiner.refine(noise, prompts)
    images = pipe(prompts, latents=latents.to(pipe.unet.dtype), num_inference_steps=10,
                  guidance_scale=1.0).images        # SD-Turbo-like pipelines: guidance_scale=0

Pipelines multiply user latents by ``scheduler.init_noise_sigma``. The refined
noise lives on the same unit-variance scale as ``x_T`` (a small residual), so
pass it as is and never pre-scale it.

Weights are saved with safetensors and read back with ``safetensors`` +
``peft.set_peft_model_state_dict`` only: loading never executes code from the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .backends.base import Backend, Conditioning
from .config import RefinerConfig, load_config, save_config
from .files import atomic_path

ADAPTER_NAME = "refiner"
WEIGHTS_FILE = "refiner.safetensors"
CONFIG_FILE = "config.yaml"


def adapters_enabled(denoiser: torch.nn.Module) -> bool:
    """True if any PEFT layer of ``denoiser`` currently applies its adapter."""
    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in denoiser.modules())


@contextlib.contextmanager
def lora_enabled(denoiser: torch.nn.Module) -> Iterator[None]:
    """Enable the adapters for the body of the ``with``; always disable them again.

    diffusers' ``enable_adapters``/``disable_adapters`` also flip ``requires_grad``
    of the adapter weights (peft sets it False on disable). A leaf whose
    ``requires_grad`` is False when ``backward`` runs silently gets no gradient,
    so the flags are restored exactly as they were before.
    """
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    denoiser.enable_adapters()
    try:
        yield
    finally:
        denoiser.disable_adapters()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


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
        self.denoiser = denoiser
        denoiser.add_adapter(LoraConfig(r=int(self.cfg["lora_rank"]), lora_alpha=float(self.cfg["lora_alpha"]),
                                        target_modules=list(self.cfg["target_modules"]),
                                        init_lora_weights=True), adapter_name=ADAPTER_NAME)
        denoiser.disable_adapters()
        self._lora = [p for name, p in denoiser.named_parameters()
                      if "lora_" in name and f".{ADAPTER_NAME}" in name]
        lora_ids = {id(p) for p in self._lora}
        for parameter in denoiser.parameters():
            parameter.requires_grad_(id(parameter) in lora_ids)
        self.register_buffer("timestep", torch.tensor(float(self.cfg["timestep"]), device=backend.device),
                             persistent=False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._lora)

    def forward(self, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``x̂_T = x_T + (eps_LoRA(x_T, t_ref, c) - eps(x_T, t_ref, c))``; the graph reaches the LoRA only."""
        if adapters_enabled(self.denoiser):
            raise RuntimeError("adapters are enabled outside the refiner forward; teacher/student "
                               "calls would run the LoRA")
        backend = self.backend
        noise = noise.to(backend.device)
        x = noise.to(backend.dtype)
        with torch.no_grad():
            base = backend.denoise(x, self.timestep, cond)
        with lora_enabled(self.denoiser):
            adapted = backend.denoise(x, self.timestep, cond)
        return noise + (adapted - base).to(noise.dtype)

    @torch.no_grad()
    def refine(self, noise: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Refined noise for ``prompts``: pass it as ``latents`` to an unguided pipeline."""
        return self(noise, self.backend.encode_prompts(list(prompts)))

    def state_dict_for_saving(self) -> dict[str, torch.Tensor]:
        """The LoRA weights (peft key names, no adapter name) as contiguous CPU tensors."""
        state = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER_NAME)
        return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}

    def load_weights(self, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> None:
        """Load LoRA weights; ``ValueError`` naming ``source`` if keys or shapes do not match."""
        expected = {key: value.shape for key, value in self.state_dict_for_saving().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: refiner weights do not match the LoRA built from the config: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
        if wrong:
            raise ValueError(f"{source}: refiner weights have wrong shapes (file vs model): {wrong}")
        result = set_peft_model_state_dict(self.denoiser, state, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{source}: peft did not load keys {sorted(result.unexpected_keys)}")


def save_refiner(refiner: Refiner, directory: str | Path, resolved_cfg: DictConfig) -> Path:
    """Write ``refiner.safetensors`` then ``config.yaml`` into ``directory``, each atomically.

    Each file goes to a temp name in the same directory and is ``os.replace``d,
    so a crash never leaves a truncated file; other files in ``directory`` are kept.
    """
    if _cfg_dict(resolved_cfg["refiner"]) != refiner.cfg:
        raise ValueError(f"resolved_cfg.refiner {_cfg_dict(resolved_cfg['refiner'])} differs from the "
                         f"refiner's own config {refiner.cfg}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(refiner.state_dict_for_saving(), str(tmp), metadata={"adapter": ADAPTER_NAME})
    save_config(resolved_cfg, directory / CONFIG_FILE)
    return directory


def load_refiner(directory: str | Path, backend: Backend) -> Refiner:
    """Rebuild the refiner from ``config.yaml`` (its ``refiner`` section) and load its weights."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    cfg = load_config(directory / CONFIG_FILE)
    refiner = Refiner(backend, cfg.refiner)
    try:
        refiner.load_weights(load_file(str(weights), device=str(backend.device)), source=weights)
    except BaseException:
        backend.denoiser.delete_adapters(ADAPTER_NAME)  # leave the backend as it was
        raise
    return refiner
