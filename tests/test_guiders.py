"""Teacher guidance = a diffusers guider: our batched rollout against diffusers' own way of driving a guider.

The reference loop drives the guider as diffusers' modular pipelines do
(``modular_pipelines/stable_diffusion_xl/denoise.py``): ``set_state`` every step,
``prepare_inputs``, then branch by branch ``prepare_models`` -> one unbatched denoiser call ->
``cleanup_models``, and the guider combines the outputs. Ours runs all branches in ONE call.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
                               FrequencyDecoupledGuidance, PerturbedAttentionGuidance, SkipLayerGuidance,
                               TangentialClassifierFreeGuidance)

from conftest import tiny_digits_backend
from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.guidance import PipelinePAG, guider_identity, make_guider, network_calls
from noiserefine.noise import noise_from_seeds
from noiserefine.sampling import bind, initial_sigma, make_scheduler, rollout, scale_model_input
from noiserefine.targets.generate import shard_samples
from noiserefine.targets.plan import Plan
from tiny_models import build_tiny_dit

PROMPTS = ["a handwritten seven", "a handwritten digit 3", "a cat"]
STEPS = 4
MID = "mid_block.attentions.0.transformer_blocks"  # the digits UNet's mid transformer blocks
GUIDERS = {  # name -> a fresh guider (stateful guiders must not be shared between two rollouts)
    "CFG": lambda: ClassifierFreeGuidance(guidance_scale=3.0),
    "CFG+PAG (stock pipeline)": lambda: PipelinePAG(guidance_scale=3.0, perturbed_guidance_scale=2.0,
                                                    pag_layers=["mid"]),
    "PAG (diffusers, steps 1-2 of 4)": lambda: PerturbedAttentionGuidance(
        guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
        perturbed_guidance_stop=0.75, perturbed_guidance_config={"indices": [0], "fqn": MID}),
    "APG": lambda: AdaptiveProjectedGuidance(guidance_scale=3.0, adaptive_projected_guidance_momentum=-0.5,
                                             eta=0.0, adaptive_projected_guidance_rescale=2.0),
    "CFG-Zero*": lambda: ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1),
    "TCFG": lambda: TangentialClassifierFreeGuidance(guidance_scale=3.0),
    "FDG": lambda: FrequencyDecoupledGuidance(guidance_scales=[4.0, 2.0]),
    "SLG": lambda: SkipLayerGuidance(guidance_scale=3.0, skip_layer_guidance_scale=2.0,
                                     skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                                     skip_layer_config={"indices": [0], "fqn": MID}),
}


def reference_rollout(backend, noise, cond, num_steps, guider):
    """diffusers' modular-pipeline loop, unbatched; returns the final latents and the denoiser calls made."""
    bind(guider, backend)
    null = backend.null_conditioning(noise.shape[0])
    scheduler = make_scheduler(backend, num_steps)
    latents, calls = noise * initial_sigma(scheduler), 0
    channels = backend.guided_channels  # SiT: the guider sees the first channels, the rest is the conditional's
    for step, t in enumerate(scheduler.timesteps):
        guider.set_state(step=step, num_inference_steps=num_steps, timestep=t)
        model_in = scale_model_input(scheduler, latents, t)
        state = guider.prepare_inputs({key: (cond[key], null[key]) for key in cond})
        full = {}
        for branch in state:
            guider.prepare_models(backend.denoiser)
            out = backend.denoise(model_in, t, {key: getattr(branch, key) for key in cond})
            guider.cleanup_models(backend.denoiser)
            calls += 1
            full[getattr(branch, "__guidance_identifier__")] = out
            branch.noise_pred = out if channels is None else out[:, :channels]
        guided = guider(state)[0]
        if channels is not None:
            guided = torch.cat([guided, full["pred_cond"][:, channels:]], dim=1)
        latents = scheduler.step(guided, t, latents, return_dict=False)[0]
    return latents, calls


def in_float64(backend):
    """The comparison in float64: batched and unbatched float32 convolutions differ by round-off (~1e-4 after
    a few guided steps of the tiny models), which would hide a real difference of that size."""
    backend.denoiser.double()
    backend.dtype = torch.float64
    if hasattr(backend, "embedding"):
        backend.embedding = backend.embedding.double()
    return backend


def counted(backend, monkeypatch) -> list[int]:
    """Count the backend's denoiser calls and the samples in each."""
    sizes, denoise = [], backend.denoise

    def counting(x_t, t, cond):
        sizes.append(x_t.shape[0])
        return denoise(x_t, t, cond)

    monkeypatch.setattr(backend, "denoise", counting)
    return sizes


def check_against_reference(backend, cond, make, monkeypatch, steps=STEPS):
    noise = noise_from_seeds(range(len(PROMPTS)), backend.latent_shape, dtype=torch.float64)
    with torch.no_grad():
        sizes = counted(backend, monkeypatch)
        ours = rollout(backend, noise, cond, steps, make())
        monkeypatch.undo()
        theirs, calls = reference_rollout(backend, noise, cond, steps, make())
        cfg_only = rollout(backend, noise, cond, steps, ClassifierFreeGuidance(guidance_scale=3.0))
    difference = (ours - theirs).abs().max().item()
    print(f"max |ours - reference| = {difference:.3e}")
    assert difference <= 1e-6
    assert len(sizes) == steps, "not one batched denoiser call per step"
    assert sum(sizes) == calls * len(PROMPTS) == network_calls(make(), steps) * len(PROMPTS)
    return ours, cfg_only


@pytest.mark.parametrize("name", list(GUIDERS))
def test_batched_rollout_equals_the_modular_pipeline_loop(name, monkeypatch):
    backend = in_float64(tiny_digits_backend())
    ours, cfg_only = check_against_reference(backend, backend.encode_prompts(PROMPTS), GUIDERS[name], monkeypatch)
    if name != "CFG":  # each guider does something other than CFG (the comparison is not vacuous)
        assert (ours - cfg_only).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["APG", "SLG"])
def test_sit_guides_first_channels_with_any_guider(name, tmp_path, monkeypatch):
    cfg = load_config(overrides=["model.backend=sit", f"model.path={build_tiny_dit(tmp_path / 'sit', flow=True)}"])
    backend = in_float64(load_backend(cfg.model))
    assert backend.guided_channels == 3
    make = GUIDERS[name] if name == "APG" else lambda: SkipLayerGuidance(
        guidance_scale=3.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0, skip_layer_config={"indices": [0], "fqn": "transformer_blocks"})
    # (diffusers 0.42.1: skip_layer_guidance_layers=[0] builds LayerSkipConfig(0), whose int indices fail)
    check_against_reference(backend, backend.encode_prompts(["3", "7", "1"]), make, monkeypatch, steps=3)


def test_embedded_default_cfg_targets_are_bit_identical_to_the_old_formula():
    """The digits default (configs/digits.yaml: cfg) through shard_samples vs the code before guiders:
    one batched [uncond, cond] forward per step and ``uncond + w (cond - uncond)``."""
    cfg = load_config(overrides=["data.num_samples=5", "data.shard_size=5"])
    assert cfg.teacher.guidance == "cfg" and cfg.model.backend == "digits"
    backend, w = tiny_digits_backend(), float(cfg.teacher.guidance_scale)
    samples = Plan.from_config(cfg.data).shard(0)
    new = [s.arrays["target"] for s in shard_samples(
        backend, samples, guidance=make_guider(cfg.teacher), num_steps=cfg.teacher.num_steps,
        teacher_key="k", batch_size=2, target_dtype="float32")]
    old = []
    for start in range(0, len(samples), 2):
        batch = samples[start:start + 2]
        cond = backend.encode_prompts([s.prompt for s in batch])
        null = backend.null_conditioning(len(batch))
        scheduler = make_scheduler(backend, cfg.teacher.num_steps)
        latents = noise_from_seeds([s.seed for s in batch], backend.latent_shape) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_in = scale_model_input(scheduler, latents, t)
                both = backend.denoise(torch.cat([model_in] * 2), t,
                                       {k: torch.cat([null[k], cond[k]]) for k in cond})
                uncond, conditional = both.chunk(2)
                latents = scheduler.step(uncond + w * (conditional - uncond), t, latents, return_dict=False)[0]
        old += list(latents.numpy())
    assert len(new) == len(old) == 5
    assert all((a == b).all() for a, b in zip(new, old))


def test_make_guider_forms_and_identity():
    teacher = load_config(overrides=["teacher.guidance=cfg_pag", "teacher.pag_scale=2.5"]).teacher
    pag = make_guider(teacher)
    assert type(pag) is PipelinePAG and pag.skip_layer_guidance_scale == 2.5 and pag.pag_layers == ("mid",)
    apg = make_guider(load_config(overrides=["teacher.guidance=AdaptiveProjectedGuidance",
                                             "teacher.guider_args={eta: 0.0}"]).teacher, guidance_scale=4.0)
    assert type(apg) is AdaptiveProjectedGuidance and apg.guidance_scale == 4.0 and apg.eta == 0.0
    identity = guider_identity(apg)
    assert identity["class"] == "AdaptiveProjectedGuidance" and identity["config"]["eta"] == 0.0
    assert "_diffusers_version" not in identity["config"]
    assert network_calls(None, 7) == 7 and network_calls(pag, 4) == 12
    assert network_calls(ClassifierFreeGuidance(guidance_scale=1.0), 4) == 4  # w = 1: the conditional branch only
    with pytest.raises(ValueError, match="teacher.guider_args"):
        load_config(overrides=["teacher.guidance=cfg", "teacher.guider_args={eta: 0.0}"])
    with pytest.raises(ValueError, match="teacher.guidance"):
        load_config(overrides=["teacher.guidance=NoSuchGuidance"])
