"""Stable Diffusion 3 (flow matching, CFG) on tiny random models of the real classes.

``SD3Transformer2DModel``, two ``CLIPTextModelWithProjection`` encoders, optionally a T5
encoder, ``FlowMatchEulerDiscreteScheduler(shift=3)``. The project's rollouts equal
``StableDiffusion3Pipeline``'s from the same latents (final latents, float32, 1e-5),
the MSD gain read off the scheduler is 1 and is the rollout's Jacobian with frozen
network outputs, and the refiner attaches, trains and drives the stock pipeline.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.guiders import ClassifierFreeGuidance

from noiserefine.backends import load_backend
from noiserefine.backends.sd3 import SD3Backend
from noiserefine.config import load_config
from noiserefine.noise import noise_from_seeds
from noiserefine.pipelines import refined_latents, unguided_call_kwargs
from noiserefine.refiner import Refiner, adapters_enabled, save_refiner
from noiserefine.guidance import PipelinePAG
from noiserefine.sampling import affine_coefficients, rollout, rollout_gain
from tiny_models import IMAGE_SIZE, build_tiny_dit, build_tiny_sd3

PROMPTS = ["a red cat", "the blue dog"]
SEEDS = [3, 4]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": build_tiny_sd3(root / "t5"), "no_t5": build_tiny_sd3(root / "no_t5", with_t5=False)}


def backend_of(path, *extra):
    return load_backend(load_config(overrides=["model.backend=sd3", f"model.path={path}", *extra]).model)


def stock(path, with_t5=True):
    extra = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():  # as the backend's modules (see tests/test_stock_pipelines.py)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return pipe


def test_backend_loads_conditioning_and_decodes(dirs):
    backend = backend_of(dirs["t5"])
    assert isinstance(backend, SD3Backend) and backend.latent_shape == (4, 8, 8)
    assert backend.scheduler_class is FlowMatchEulerDiscreteScheduler and backend.scheduler_config["shift"] == 3.0
    cond = backend.encode_prompts(PROMPTS)
    assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 77 + 256, 32),
                                                             "pooled_projections": (2, 64)}
    assert (cond["pooled_projections"][0] - cond["pooled_projections"][1]).abs().max() > 1e-3
    null = backend.null_conditioning(3)
    torch.testing.assert_close(null["pooled_projections"][:1], backend.encode_prompts([""])["pooled_projections"])
    images = backend.decode(rollout(backend, noise_from_seeds(SEEDS, backend.latent_shape), cond, 2))
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("variant", ["t5", "no_t5"])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.0])
def test_rollouts_equal_stable_diffusion_3_pipeline(dirs, variant, guidance_scale):
    backend = backend_of(dirs[variant])
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    guidance = ClassifierFreeGuidance(guidance_scale=guidance_scale) if guidance_scale > 1 else None
    ours = rollout(backend, x_t, backend.encode_prompts(PROMPTS), 4, guidance)
    pipe = stock(dirs[variant], with_t5=variant == "t5")
    theirs = pipe(PROMPTS, latents=x_t.clone(), num_inference_steps=4, guidance_scale=guidance_scale,
                  output_type="latent").images
    difference = (ours - theirs).abs().max().item()
    print(f"StableDiffusion3Pipeline ({variant}) 4 steps guidance {guidance_scale}: max abs difference {difference:.3e}")
    assert difference <= TOLERANCE and (ours - x_t).abs().max() > 1e-2


def test_msd_gain_comes_from_the_scheduler_and_is_the_frozen_jacobian(dirs, monkeypatch):
    backend = backend_of(dirs["no_t5"])
    assert affine_coefficients(backend, 5).tolist() == [1.0] * 5 and rollout_gain(backend, 5) == 1.0
    fixed = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(backend, "denoise", lambda x, t, cond: fixed * (1 + t / 1000))
    noise = torch.randn(2, *backend.latent_shape, requires_grad=True)
    rollout(backend, noise, backend.null_conditioning(2), 5).sum().backward()
    torch.testing.assert_close(noise.grad, torch.full_like(noise, rollout_gain(backend, 5)))


def test_refiner_trains_and_drives_the_stock_pipeline(dirs, tmp_path):
    cfg = load_config(overrides=["model.backend=sd3", f"model.path={dirs['t5']}", "student.num_steps=3",
                                 *[f"refiner.{k}" for k in ("lora_rank=4", "lora_alpha=4.0")],
                                 "refiner.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,"
                                 "to_add_out]"])
    backend = load_backend(cfg.model)
    refiner = Refiner(backend, cfg.refiner)
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    cond = backend.encode_prompts(PROMPTS)
    assert torch.equal(refiner(x_t, cond), x_t)  # zero correction at init
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    refined = refiner(x_t, cond)
    refined.pow(2).sum().backward()
    assert (refined - x_t).abs().max() > 1e-4
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.trainable_parameters())
    save_refiner(refiner, tmp_path / "refiner", cfg)

    pipe = StableDiffusion3Pipeline.from_pretrained(dirs["t5"])
    pipe.set_progress_bar_config(disable=True)
    before = pipe(PROMPTS, latents=x_t.clone(), num_inference_steps=3, guidance_scale=1.0, output_type="latent").images
    latents = refined_latents(pipe, tmp_path / "refiner", PROMPTS, SEEDS)
    after = pipe(PROMPTS, latents=x_t.clone(), num_inference_steps=3, guidance_scale=1.0, output_type="latent").images
    assert torch.equal(after, before) and not adapters_enabled(pipe.transformer)
    torch.testing.assert_close(latents, refiner.refine(x_t, PROMPTS), rtol=0, atol=1e-5)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    images = pipe(PROMPTS, latents=latents, output_type="latent", **unguided_call_kwargs(pipe)).images
    ours = rollout(backend, latents, cond, 3)
    assert (ours - images).abs().max().item() <= TOLERANCE


def test_pag_is_refused_and_paths_are_checked(dirs, tmp_path):
    backend = backend_of(dirs["no_t5"])
    with pytest.raises(ValueError, match="PAG is not implemented for SD3"):
        rollout(backend, noise_from_seeds(SEEDS, backend.latent_shape), backend.encode_prompts(PROMPTS), 1,
                PipelinePAG(guidance_scale=7.0, perturbed_guidance_scale=3.0, pag_layers=["mid"]))
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*Stable Diffusion 3 pipeline"):
        backend_of(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=r"Stable Diffusion 3 pipeline.*missing.*holds a DiTPipeline"):
        backend_of(build_tiny_dit(tmp_path / "dit"))
    with pytest.raises(ValueError, match="no SD3 architecture"):
        backend_of("unused", "model.init=random", "model.architecture=sd21")
