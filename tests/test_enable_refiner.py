"""``enable_refiner`` / ``disable_refiner`` (noiserefine/enable.py) on tiny SD, SDXL, PAG and SD3 pipelines.

After enable, a plain ``pipe(prompts, generator=...)`` equals today's two-call path
(``refined_latents`` then ``pipe(latents=..., **unguided_call_kwargs(pipe))``) bit for bit;
after disable, the pipeline's outputs (with its own scheduler and CFG) equal a freshly
loaded pipeline's bit for bit, and its class, scheduler, config and modules are the
originals. Tiny models, 2 steps; slow only because it loads several pipelines.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (StableDiffusion3Pipeline, StableDiffusionPAGPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline)
from faults.tiny_refiner import save_tiny_refiner
from tiny_models import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

from noiserefine.config import load_config
from noiserefine.enable import disable_refiner, enable_refiner
from noiserefine.noise import noise_from_seeds
from noiserefine.pipelines import refined_latents, unguided_call_kwargs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["a red cat", "the blue dog"]
SEEDS = [3, 4]
SD3_LORA = "refiner.target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out]"
# case -> (builder, model.backend, extra config overrides, pipeline class, its keyword arguments)
CASES = {
    "sd15": (build_tiny_sd, "stable_diffusion", [], StableDiffusionPipeline, {}),
    "sd15_pag": (build_tiny_sd, "stable_diffusion", [], StableDiffusionPAGPipeline, {"pag_applied_layers": ["mid"]}),
    "sdxl": (build_tiny_sdxl, "sdxl", [], StableDiffusionXLPipeline, {}),
    "sdxl_pag": (build_tiny_sdxl, "sdxl", [], StableDiffusionXLPAGPipeline, {"pag_applied_layers": ["mid"]}),
    "sd3": (build_tiny_sd3, "sd3", [SD3_LORA], StableDiffusion3Pipeline, {}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per model (sd15, sdxl, sd3): its directory and a saved refiner (random LoRA, 2 student steps)."""
    root = tmp_path_factory.mktemp("enable")
    out = {}
    for name in ("sd15", "sdxl", "sd3"):
        builder, backend, extra = CASES[name][:3]
        model = builder(root / name)
        cfg = load_config(overrides=[f"model.backend={backend}", f"model.path={model}", "student.num_steps=2",
                                     "refiner.lora_rank=4", "refiner.lora_alpha=4.0", *extra])
        out[name] = (model, save_tiny_refiner(cfg, root / f"{name}_refiner", seed=1))
    return out


def load(case, models):
    _, _, _, cls, kwargs = CASES[case]
    extra = dict(safety_checker=None, requires_safety_checker=False) if "sd15" in case else {}
    pipe = cls.from_pretrained(models[case.split("_")[0]][0], **extra, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("case", list(CASES))
def test_enabled_pipeline_equals_the_refined_latents_path_bit_for_bit(models, case):
    refiner_dir = models[case.split("_")[0]][1]
    pipe = enable_refiner(load(case, models), refiner_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unguided default warns about nothing
        ours = pipe(PROMPTS, generator=generators(), output_type="latent").images

    reference = load(case, models)
    latents = refined_latents(reference, refiner_dir, PROMPTS, SEEDS)
    kwargs = unguided_call_kwargs(reference)
    theirs = reference(PROMPTS, latents=latents, output_type="latent", **kwargs).images
    assert torch.equal(ours, theirs)
    unrefined = reference(PROMPTS, latents=noise_from_seeds(SEEDS, latents.shape[1:]), output_type="latent",
                          **kwargs).images
    assert (ours - unrefined).abs().max() > 1e-4  # the refiner changed the result: the comparison is not vacuous
    assert type(pipe).__name__ == CASES[case][3].__name__ and isinstance(pipe, CASES[case][3])


@pytest.mark.parametrize("case", list(CASES))
def test_disabled_pipeline_is_the_fresh_pipeline(models, case):
    fresh = load(case, models)
    pipe = load(case, models)
    scheduler, modules = pipe.scheduler, {name: [n for n, _ in m.named_modules()] for name, m in
                                          pipe.components.items() if isinstance(m, torch.nn.Module)}
    enable_refiner(pipe, models[case.split("_")[0]][1])
    assert pipe.scheduler is not scheduler
    pipe(PROMPTS, generator=generators(), output_type="latent")
    disable_refiner(pipe)

    assert type(pipe) is CASES[case][3] and pipe.scheduler is scheduler and dict(pipe.config) == dict(fresh.config)
    assert {name: [n for n, _ in m.named_modules()] for name, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)} == modules  # the LoRA wrappers are gone
    assert not [k for k in vars(pipe) if k.startswith("_noiserefine")]
    # The pipeline's own defaults again: its scheduler, its step count, CFG (and PAG) on.
    kwargs = dict(generator=generators(), output_type="latent", num_inference_steps=2)
    assert torch.equal(pipe(PROMPTS, **kwargs).images, fresh(PROMPTS, **{**kwargs, "generator": generators()}).images)
    with pytest.raises(ValueError, match="no refiner is enabled"):
        disable_refiner(pipe)


def test_guidance_on_top_warns_once_and_bad_calls_are_refused(models):
    pipe = enable_refiner(load("sd15_pag", models), models["sd15"][1])
    with pytest.warns(UserWarning, match="guidance on top") as caught:
        guided = pipe(PROMPTS, generator=generators(), guidance_scale=3.0, pag_scale=2.0, output_type="latent").images
        pipe(PROMPTS, generator=generators(), guidance_scale=3.0, output_type="latent")
    assert len([w for w in caught if "guidance on top" in str(w.message)]) == 1
    unguided = pipe(PROMPTS, generator=generators(), output_type="latent").images
    assert (guided - unguided).abs().max() > 1e-4  # the asked-for guidance was applied

    with pytest.raises(ValueError, match="refiner makes latents of shape"):
        pipe(PROMPTS, generator=generators(), height=32, width=32, output_type="latent")
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    with pytest.raises(ValueError, match="prompt_embeds alone cannot be refined"):
        pipe(prompt_embeds=embeds, generator=generators(), output_type="latent")
    # num_images_per_prompt: each prompt's copies are refined for that prompt, in the pipeline's batch order
    two = pipe(["a red cat"], num_images_per_prompt=2, generator=generators(), output_type="latent").images
    assert torch.equal(two, pipe(["a red cat"] * 2, generator=generators(), output_type="latent").images)


def test_sdxl_euler_scales_the_refined_latents_once_by_init_noise_sigma(models):
    """With an Euler scheduler (SDXL as shipped; init_noise_sigma ~14.6 with "leading" spacing) the refined x_T is
    scaled once, by the pipeline's own prepare_latents, exactly as latents a user passes."""
    from diffusers import EulerDiscreteScheduler

    pipe = enable_refiner(load("sdxl", models), models["sdxl"][1])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seen = []
    prepare = type(pipe).prepare_latents
    pipe.prepare_latents = lambda *a, **k: seen.append(prepare(pipe, *a, **k)) or seen[-1]
    ours = pipe(PROMPTS, generator=generators(), output_type="latent").images
    reference = load("sdxl", models)
    latents = refined_latents(reference, models["sdxl"][1], PROMPTS, SEEDS)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    sigma = float(reference.scheduler.init_noise_sigma)
    assert sigma > 10
    assert torch.equal(seen[0], latents * pipe.scheduler.init_noise_sigma)
    theirs = reference(PROMPTS, latents=latents, output_type="latent", **unguided_call_kwargs(reference)).images
    assert torch.equal(ours, theirs)


def test_a_refused_refiner_leaves_the_pipeline_as_it_was(models):
    """An SDXL refiner on an SD pipeline: same noise schedule (the scheduler check passes and the refiner's
    sampler is set), then refused for its architecture; the pipeline keeps its scheduler, class and modules."""
    pipe = load("sd15", models)
    scheduler, cls = pipe.scheduler, type(pipe)
    with pytest.raises(ValueError, match="another architecture"):
        enable_refiner(pipe, models["sdxl"][1])
    assert pipe.scheduler is scheduler and type(pipe) is cls
    assert not [k for k in vars(pipe) if k.startswith("_noiserefine")]
    assert "refiner" not in (getattr(pipe.unet, "peft_config", None) or {})


@pytest.fixture(scope="module")
def multi_w_refiner(models, tmp_path_factory):
    """A refiner told w (data.guidance_scales [1.5, 3], slope 200; random LoRA) on the tiny SD model."""
    cfg = load_config(overrides=["model.backend=stable_diffusion", f"model.path={models['sd15'][0]}",
                                 "student.num_steps=2", "refiner.lora_rank=4", "refiner.lora_alpha=4.0",
                                 "data.guidance_scales=[1.5,3.0]", "refiner.guidance_timestep_slope=200"])
    return save_tiny_refiner(cfg, tmp_path_factory.mktemp("multi-w") / "refiner", seed=2)


def test_a_refiner_told_w_takes_its_scale_in_both_helpers(models, multi_w_refiner):
    """refined_latents and enable_refiner refine for the given w (another w: other latents; the enabled pipeline
    equals the refined_latents path bit for bit at each w); a missing w is named before the pipeline changes."""
    pipe = load("sd15", models)
    low, high = (refined_latents(pipe, multi_w_refiner, PROMPTS, SEEDS, guidance_scale=w) for w in (1.5, 3.0))
    assert (low - high).abs().max() > 1e-4, "the refiner's w must change the refined noise"
    kwargs = dict(output_type="latent", **unguided_call_kwargs(pipe))
    for w, latents in ((1.5, low), (3.0, high)):
        enabled = enable_refiner(load("sd15", models), multi_w_refiner, guidance_scale=w)
        ours = enabled(PROMPTS, generator=generators(), output_type="latent").images
        assert torch.equal(ours, pipe(PROMPTS, latents=latents, **kwargs).images)
    fresh = load("sd15", models)
    scheduler, cls = fresh.scheduler, type(fresh)
    with pytest.raises(ValueError, match=r"range of guidance scales \(1\.5, 3"):
        enable_refiner(fresh, multi_w_refiner)
    assert fresh.scheduler is scheduler and type(fresh) is cls
    with pytest.raises(ValueError, match=r"range of guidance scales \(1\.5, 3"):
        refined_latents(fresh, multi_w_refiner, PROMPTS, SEEDS)
    with pytest.raises(ValueError, match=r"trained for guidance scale .* only.*guidance_scale=5"):
        refined_latents(fresh, models["sd15"][1], PROMPTS, SEEDS, guidance_scale=5.0)
