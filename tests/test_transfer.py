"""Zero-shot transfer: a refiner trained on one model used on another of the same architecture.

A fine-tune is the tiny SD UNet with other weights (another seed, same config); a
style variant is the same model with a LoRA loaded through ``pipe.load_lora_weights``.
Both load the refiner and use it; a refiner for another architecture is refused with
an error that says "architecture", and the model is left as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict

from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.noise import noise_from_seeds
from noiserefine.pipelines import refined_latents, unguided_call_kwargs
from noiserefine.refiner import Refiner, adapters_enabled, load_refiner, save_refiner
from tiny_models import build_tiny_dit, build_tiny_sd, build_tiny_sdxl

PROMPTS = ["a red cat", "the blue dog"]
SEEDS = [0, 1]


def sd_cfg(path, *extra):
    return load_config(overrides=["model.backend=stable_diffusion", f"model.path={path}", "student.num_steps=3",
                                  "refiner.lora_rank=4", "refiner.lora_alpha=4.0", *extra])


def randomise(refiner, seed=1, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    base = build_tiny_sd(root / "base")
    finetune = build_tiny_sd(root / "finetune", seed=7)  # same architecture, other weights
    cfg = sd_cfg(base)
    backend = load_backend(cfg.model)
    trained = Refiner(backend, cfg.refiner)
    randomise(trained)
    save_refiner(trained, root / "refiner", cfg)
    zero = Refiner(load_backend(cfg.model), cfg.refiner)  # LoRA B = 0: the correction is exactly 0
    save_refiner(zero, root / "zero-refiner", cfg)
    return {"root": root, "base": base, "finetune": finetune, "refiner": root / "refiner",
            "zero": root / "zero-refiner", "trained": trained}


def test_refiner_loads_on_a_fine_tune(models):
    backend = load_backend(sd_cfg(models["finetune"]).model)
    refiner = load_refiner(models["refiner"], backend)
    saved, loaded = models["trained"].state_dict_for_saving(), refiner.state_dict_for_saving()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    noise = noise_from_seeds(SEEDS, backend.latent_shape)
    refined = refiner.refine(noise, PROMPTS)
    on_base = models["trained"].refine(noise, PROMPTS)
    assert torch.isfinite(refined).all() and (refined - noise).abs().max() > 1e-3
    assert (refined - on_base).abs().max() > 1e-4  # the correction is computed by the fine-tuned model
    assert not adapters_enabled(backend.denoiser)


def style_lora(directory, unet: UNet2DConditionModel, seed=3):
    """A LoRA file in diffusers' format, as a style LoRA from the hub would be."""
    copy_ = copy.deepcopy(unet)
    copy_.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in copy_.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(copy_))
    return directory


def stock(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


def sample(pipe, latents, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, **kwargs}
    return pipe(PROMPTS, latents=latents.clone(), output_type="latent", **kwargs).images


@pytest.fixture(scope="module")
def style_dir(models):
    unet = UNet2DConditionModel.from_pretrained(models["base"], subfolder="unet")
    return style_lora(models["root"] / "style", unet)


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_refiner_with_a_style_lora_loaded_through_the_pipeline(models, style_dir):
    noise = noise_from_seeds(SEEDS, (4, 8, 8))
    plain = sample(stock(models["base"]), noise)
    pipe = stock(models["base"])
    pipe.load_lora_weights(style_dir, adapter_name="style")
    styled = sample(pipe, noise)
    assert (styled - plain).abs().max() > 1e-3  # the style LoRA does something

    latents = refined_latents(pipe, models["refiner"], PROMPTS, SEEDS)
    assert torch.equal(sample(pipe, noise), styled)  # attaching switched nothing off or on
    assert pipe.unet.active_adapters() == ["style"] and not adapters_enabled(pipe.unet)
    images = sample(pipe, latents, **unguided_call_kwargs(pipe))
    assert torch.isfinite(images).all()
    # The refiner forward runs on the styled model: its correction differs from the plain model's ...
    plain_latents = refined_latents(stock(models["base"]), models["refiner"], PROMPTS, SEEDS)
    assert (latents - plain_latents).abs().max() > 1e-4
    # ... and with the style switched off it is the plain model's again (float32 round-off aside).
    pipe.disable_lora()
    torch.testing.assert_close(refined_latents(pipe, models["refiner"], PROMPTS, SEEDS), plain_latents,
                               rtol=0, atol=1e-5)
    pipe.enable_lora()
    assert torch.equal(sample(pipe, noise), styled)


def test_zero_refiner_on_a_styled_pipeline_returns_the_noise_exactly(models, style_dir):
    pipe = stock(models["base"])
    pipe.load_lora_weights(style_dir, adapter_name="style")
    latents = refined_latents(pipe, models["zero"], PROMPTS, SEEDS)
    assert torch.equal(latents, noise_from_seeds(SEEDS, (4, 8, 8)))


def test_style_lora_loaded_after_the_refiner_leaves_the_refiner_off(models, style_dir):
    noise = noise_from_seeds(SEEDS, (4, 8, 8))
    reference = stock(models["base"])
    reference.load_lora_weights(style_dir, adapter_name="style")
    styled = sample(reference, noise)
    pipe = stock(models["base"])
    refined_latents(pipe, models["refiner"], PROMPTS, SEEDS)
    pipe.load_lora_weights(style_dir, adapter_name="style")
    assert not adapters_enabled(pipe.unet)
    assert "refiner" not in pipe.unet.active_adapters()
    torch.testing.assert_close(sample(pipe, noise), styled, rtol=0, atol=1e-5)


def test_another_architecture_is_refused_and_the_model_left_clean(models, tmp_path):
    sdxl = load_backend(load_config(overrides=["model.backend=sdxl",
                                               f"model.path={build_tiny_sdxl(tmp_path / 'sdxl')}"]).model)
    dit = load_backend(load_config(overrides=["model.backend=sit",
                                              f"model.path={build_tiny_dit(tmp_path / 'dit')}"]).model)
    for backend, other in ((sdxl, "UNet2DConditionModel"), (dit, "DiTTransformer2DModel")):
        with pytest.raises(ValueError, match="another architecture") as error:
            load_refiner(models["refiner"], backend)
        assert other in str(error.value) and "refiner" not in (getattr(backend.denoiser, "peft_config", None) or {})
    # Same class and latent shape, other widths: caught on the weights' shapes.
    wider = tmp_path / "wider"
    build_tiny_sd(wider)
    config = dict(UNet2DConditionModel.load_config(wider, subfolder="unet"))
    config["block_out_channels"] = [8, 16]
    UNet2DConditionModel.from_config(config).save_pretrained(wider / "unet")
    backend = load_backend(sd_cfg(wider).model)
    with pytest.raises(ValueError, match="another architecture.*block_out_channels: \\[4, 8\\] vs \\[8, 16\\]"):
        load_refiner(models["refiner"], backend)
    assert "refiner" not in (getattr(backend.denoiser, "peft_config", None) or {})
    Refiner(backend, sd_cfg(wider).refiner)  # the backend is usable: a retry or a new refiner works


def test_another_sampler_is_refused_unless_asked(models):
    backend = load_backend(sd_cfg(models["base"]).model)
    backend.scheduler_config = {**backend.scheduler_config, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match="another sampler.*timestep_spacing: 'leading' vs 'trailing'"):
        load_refiner(models["refiner"], backend)
    assert "refiner" not in (getattr(backend.denoiser, "peft_config", None) or {})
    refiner = load_refiner(models["refiner"], backend, check_sampler=False)
    assert refiner.sampler["scheduler_config"]["timestep_spacing"] == "leading"


def test_config_spelled_differently_but_weights_fit_loads_with_a_warning(models, tmp_path):
    import json
    import shutil

    copied = shutil.copytree(models["refiner"], tmp_path / "refiner")
    record = json.loads((copied / "sampler.json").read_text())
    record["denoiser_config"]["norm_eps"] = 1e-6  # a value the weights do not depend on
    (copied / "sampler.json").write_text(json.dumps(record))
    backend = load_backend(sd_cfg(models["base"]).model)
    with pytest.warns(UserWarning, match="norm_eps: 1e-06 vs 1e-05.*every refiner weight fits"):
        refiner = load_refiner(copied, backend)
    assert torch.equal(refiner.refine(noise_from_seeds(SEEDS, (4, 8, 8)), PROMPTS),
                       models["trained"].refine(noise_from_seeds(SEEDS, (4, 8, 8)), PROMPTS))
