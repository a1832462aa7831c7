"""The project's samplers against the stock diffusers pipelines, and the refiner inside a stock pipeline.

Tiny random models of the real classes (``tiny_models.py``), float32, final latents
(``output_type="latent"``). The project's rollout from given latents must equal the
pipeline's from the same latents within 1e-5: unguided, CFG, CFG+PAG, for SD
(epsilon, v-prediction, trailing spacing), SDXL and DiT. The pipeline samples with
``DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)``, which is the
sampler the backends build from the same config (and what ``noiserefine.pipelines``
installs); with the shipped PNDM/Euler schedulers the results differ, which is why the
helper replaces them. Run with ``-s`` to see every maximum absolute difference.

The stock pipeline's modules are frozen (``requires_grad_(False)``) like the backends'
for the comparison: on the CPU, ``F.linear`` on a non-contiguous input (SDXL's
``use_linear_projection`` ``proj_in``) takes another kernel when its weight requires
grad, even under ``no_grad``, which alone moves SDXL's float32 latents by ~2e-5 after a
few CFG steps (recorded as an extra, unasserted case).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers import (DDIMScheduler, DiTPipeline, StableDiffusionPAGPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline)

from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.noise import noise_from_seeds
from noiserefine.pipelines import dit_latents, refined_latents, unguided_call_kwargs
from noiserefine.refiner import Refiner, adapters_enabled, save_refiner
from noiserefine.guidance import PipelinePAG, guider_label
from noiserefine.sampling import rollout
from tiny_models import build_tiny_dit, build_tiny_sd, build_tiny_sdxl

TOLERANCE = 1e-5
PROMPTS = ["a red cat", "the blue dog"]
SEEDS = [3, 4]
RESULTS: dict[str, float] = {}  # case -> max abs difference, printed at the end of the module

# name -> (model.backend, builder, pipeline class, PAG pipeline class)
MODELS = {
    "sd15_pndm_eps": ("stable_diffusion", lambda d: build_tiny_sd(d), StableDiffusionPipeline,
                      StableDiffusionPAGPipeline),
    "sd_ddim_v": ("stable_diffusion", lambda d: build_tiny_sd(d, prediction_type="v_prediction", scheduler="ddim"),
                  StableDiffusionPipeline, StableDiffusionPAGPipeline),
    "sd_turbo_euler_trailing": ("stable_diffusion", lambda d: build_tiny_sd(d, scheduler="euler"),
                                StableDiffusionPipeline, StableDiffusionPAGPipeline),
    "sdxl_euler_leading": ("sdxl", lambda d: build_tiny_sdxl(d), StableDiffusionXLPipeline,
                           StableDiffusionXLPAGPipeline),
    "dit": ("sit", lambda d: build_tiny_dit(d, num_classes=1000), DiTPipeline, None),  # DiTPipeline's null class is 1000
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {name: spec[1](root / name) for name, spec in MODELS.items()}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if RESULTS:
        print("\nmax |project - stock pipeline| on the final latents (float32):")
        for case, value in sorted(RESULTS.items()):
            print(f"  {case:<55} {value:.3e}")


def backend_of(name, dirs):
    return load_backend(load_config(overrides=[f"model.backend={MODELS[name][0]}", f"model.path={dirs[name]}"]).model)


def stock(cls, directory, freeze=True, **kwargs):
    extra = dict(safety_checker=None, requires_safety_checker=False) if cls in (
        StableDiffusionPipeline, StableDiffusionPAGPipeline) else {}
    pipe = cls.from_pretrained(directory, **extra, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if freeze:  # as the backends' modules (see the module docstring)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
    return pipe


def ddim(pipe):
    """The sampler the project builds from a model's scheduler config (see backends/stable_diffusion.py)."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


def record(case: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    difference = (ours.float() - theirs.float()).abs().max().item()
    RESULTS[case] = difference
    return difference


def pipe_latents(pipe, prompts, latents, steps, **kwargs):
    return pipe(prompts, latents=latents.clone(), num_inference_steps=steps, output_type="latent", **kwargs).images


def CFG(scale):
    return ClassifierFreeGuidance(guidance_scale=scale)


def PAG(scale, pag_scale, layers):
    return PipelinePAG(guidance_scale=scale, perturbed_guidance_scale=pag_scale, pag_layers=list(layers))


TEXT_CASES = [  # (model, steps, guider; None: unguided)
    ("sd15_pndm_eps", 4, None),
    ("sd15_pndm_eps", 4, CFG(7.5)),
    ("sd15_pndm_eps", 4, PAG(7.5, 3.0, ("mid",))),
    ("sd15_pndm_eps", 3, PAG(5.0, 2.0, ("mid", "up_blocks.0"))),
    ("sd_ddim_v", 4, None),
    ("sd_ddim_v", 4, CFG(7.5)),
    ("sd_ddim_v", 3, PAG(7.5, 3.0, ("mid",))),
    ("sd_turbo_euler_trailing", 1, None),
    ("sd_turbo_euler_trailing", 4, None),
    ("sd_turbo_euler_trailing", 2, CFG(3.0)),
    ("sdxl_euler_leading", 4, None),
    ("sdxl_euler_leading", 4, CFG(5.0)),
    ("sdxl_euler_leading", 3, PAG(5.0, 3.0, ("mid",))),
]


def case_id(name, steps, guider):
    layers = "+".join(guider.pag_layers) if isinstance(guider, PipelinePAG) else ""
    return f"{name}-{steps}steps-{guider_label(guider).replace(' ', '')}-{layers}"


@pytest.mark.parametrize("name,steps,guider", TEXT_CASES, ids=[case_id(*case) for case in TEXT_CASES])
def test_text_to_image_rollouts_equal_the_stock_pipelines(dirs, name, steps, guider):
    backend = backend_of(name, dirs)
    _, _, pipe_class, pag_class = MODELS[name]
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    ours = rollout(backend, x_t, backend.encode_prompts(PROMPTS), steps, guider)
    scale = 1.0 if guider is None else guider.guidance_scale
    if isinstance(guider, PipelinePAG):
        pipe = ddim(stock(pag_class, dirs[name], pag_applied_layers=list(guider.pag_layers)))
        theirs = pipe_latents(pipe, PROMPTS, x_t, steps, guidance_scale=scale,
                              pag_scale=guider.skip_layer_guidance_scale)
    else:
        pipe = ddim(stock(pipe_class, dirs[name]))
        theirs = pipe_latents(pipe, PROMPTS, x_t, steps, guidance_scale=scale)
    stock_class = pag_class if isinstance(guider, PipelinePAG) else pipe_class
    case = f"{stock_class.__name__} {case_id(name, steps, guider)}"
    assert record(case, ours, theirs) <= TOLERANCE
    assert (ours - x_t).abs().max() > 1e-2  # the comparison is not vacuous


def test_unfrozen_sdxl_pipeline_differs_by_float32_roundoff_only(dirs):
    backend = backend_of("sdxl_euler_leading", dirs)
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    ours = rollout(backend, x_t, backend.encode_prompts(PROMPTS), 4, CFG(5.0))
    pipe = ddim(stock(StableDiffusionXLPipeline, dirs["sdxl_euler_leading"], freeze=False))
    theirs = pipe_latents(pipe, PROMPTS, x_t, 4, guidance_scale=5.0)
    difference = record("StableDiffusionXLPipeline sdxl 4 steps cfg, modules NOT frozen (info)", ours, theirs)
    assert difference <= 1e-4 * theirs.abs().max().item()


def test_shipped_pndm_samples_differently(dirs):
    """SD 1.5 ships PNDM (a multistep method, not affine per step): the helper must replace it."""
    backend = backend_of("sd15_pndm_eps", dirs)
    pipe = stock(StableDiffusionPipeline, dirs["sd15_pndm_eps"])
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    ours = rollout(backend, x_t, backend.encode_prompts(PROMPTS), 4)
    theirs = pipe_latents(pipe, PROMPTS, x_t, 4, guidance_scale=1.0)
    assert record("PNDMScheduler as shipped (SD 1.5), 4 steps: NOT the trained sampler", ours, theirs) > 1e-2


@pytest.mark.parametrize("name", ["sd_turbo_euler_trailing", "sdxl_euler_leading"])
def test_shipped_euler_differs_only_by_its_initial_sigma(dirs, name):
    """Euler (SD-Turbo, SDXL as shipped) takes the same ODE steps as DDIM eta=0 with epsilon prediction, but
    for "trailing"/"linspace" spacing diffusers' ``init_noise_sigma`` is sigma_max, not sqrt(sigma_max^2 + 1):
    the pipeline starts from ~0.2% less noise. With "leading" (SDXL) the two agree to float32 round-off."""
    backend = backend_of(name, dirs)
    pipe = stock(MODELS[name][2], dirs[name])
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    ours = rollout(backend, x_t, backend.encode_prompts(PROMPTS), 4)
    theirs = pipe_latents(pipe, PROMPTS, x_t, 4, guidance_scale=1.0)
    shipped = type(pipe.scheduler).__name__
    difference = record(f"{shipped} as shipped ({name}), 4 steps: NOT used", ours, theirs)
    sigma_max = float(pipe.scheduler.sigmas.max())
    if name == "sd_turbo_euler_trailing":
        assert float(pipe.scheduler.init_noise_sigma) == pytest.approx(sigma_max) and difference > 1e-2
        theirs = pipe_latents(pipe, PROMPTS, x_t * ((sigma_max ** 2 + 1) ** 0.5 / sigma_max), 4, guidance_scale=1.0)
        difference = record(f"{shipped} ({name}) with latents x sqrt(s^2+1)/s (info)", ours, theirs)
    assert difference <= 1e-5 * theirs.abs().max().item() * 10


def run_dit(pipe, latents, labels, **kwargs):
    """DiTPipeline's own loop from ``latents``; returns its final latents (the last scheduler step's output,
    the first half of the batch under CFG) rather than the decoded images."""
    steps = []
    step = pipe.scheduler.step

    def recording(*args, **kw):
        out = step(*args, **kw)
        steps.append(out.prev_sample if hasattr(out, "prev_sample") else out[0])
        return out

    pipe.scheduler.step = recording
    try:
        with dit_latents(pipe, latents):
            pipe(class_labels=labels, output_type="pt", **kwargs)
    finally:
        pipe.scheduler.step = step
    return steps[-1][:len(labels)]


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_dit_rollout_equals_dit_pipeline_from_the_same_noise(dirs, guidance_scale):
    """DiTPipeline has no ``latents=``: its own loop runs from our noise through ``dit_latents``."""
    backend = backend_of("dit", dirs)
    labels = [207, 3]
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    guider = CFG(guidance_scale) if guidance_scale > 1 else None
    ours = rollout(backend, x_t, backend.encode_prompts([str(label) for label in labels]), 4, guider)
    pipe = ddim(stock(DiTPipeline, dirs["dit"]))
    theirs = run_dit(pipe, x_t, labels, guidance_scale=guidance_scale, num_inference_steps=4)
    assert record(f"DiTPipeline (own loop, same noise) 4 steps guidance {guidance_scale}", ours, theirs) <= TOLERANCE
    with pytest.raises(ValueError, match="shape"), dit_latents(pipe, x_t[:1]):
        pipe(class_labels=labels, num_inference_steps=1)


# --- the helper: refined latents for a stock pipeline --------------------------------------------------------

def make_refiner(name, dirs, out, num_steps=3, seed=1):
    """A saved refiner for the tiny model ``name`` with random (non-zero) LoRA weights."""
    cfg = load_config(overrides=[f"model.backend={MODELS[name][0]}", f"model.path={dirs[name]}",
                                 f"student.num_steps={num_steps}", "refiner.lora_rank=4", "refiner.lora_alpha=4.0"])
    backend = load_backend(cfg.model)
    refiner = Refiner(backend, cfg.refiner)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in refiner.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_refiner(refiner, out, cfg)
    return refiner, backend


@pytest.mark.parametrize("name", ["sd15_pndm_eps", "sdxl_euler_leading"])
def test_refined_latents_drive_the_stock_pipeline_as_in_training(dirs, tmp_path, name):
    refiner, backend = make_refiner(name, dirs, tmp_path / "refiner")
    pipe = stock(MODELS[name][2], dirs[name], freeze=False)  # as users load it
    x_t = noise_from_seeds(SEEDS, backend.latent_shape)
    before = pipe_latents(ddim(stock(MODELS[name][2], dirs[name], freeze=False)), PROMPTS, x_t, 3,
                          guidance_scale=1.0)

    latents = refined_latents(pipe, tmp_path / "refiner", PROMPTS, SEEDS)
    # The pipeline now samples with the refiner's DDIM, and its outputs are unchanged by the attached LoRA.
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.clip_sample
    assert torch.equal(pipe_latents(pipe, PROMPTS, x_t, 3, guidance_scale=1.0), before)
    assert not adapters_enabled(pipe.unet) and "refiner" in pipe.unet.peft_config
    # Refined noise from noiserefine.noise's per-seed CPU noise, as the trainer's refiner makes it (to float32
    # round-off: the pipeline's modules keep requires_grad, which selects other CPU kernels for SDXL).
    expected = refiner.refine(x_t, PROMPTS)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    assert (latents - x_t).abs().max() > 1e-3
    kwargs = unguided_call_kwargs(pipe)
    assert kwargs == {"num_inference_steps": 3, "guidance_scale": 1.0}
    assert all(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" not in n)  # flags kept
    # Once per directory: a second call reuses the attached refiner.
    assert torch.equal(refined_latents(pipe, tmp_path / "refiner", PROMPTS, SEEDS), latents)
    assert list(pipe.unet.peft_config) == ["refiner"]
    for module in pipe.components.values():  # frozen for the bit comparison only (module docstring)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    images = pipe(PROMPTS, latents=latents, output_type="latent", **kwargs).images
    ours = rollout(backend, latents, backend.encode_prompts(PROMPTS), 3)
    assert record(f"{type(pipe).__name__} {name} refined latents, 3 steps", ours, images) <= TOLERANCE


def test_attaching_leaves_pipeline_outputs_bit_identical_with_guidance_and_pag(dirs, tmp_path):
    make_refiner("sd15_pndm_eps", dirs, tmp_path / "refiner")
    pipe = ddim(stock(StableDiffusionPAGPipeline, dirs["sd15_pndm_eps"], freeze=False, pag_applied_layers=["mid"]))
    x_t = noise_from_seeds(SEEDS, (4, 8, 8))
    runs = [dict(guidance_scale=1.0, pag_scale=0.0), dict(guidance_scale=7.5, pag_scale=3.0)]
    before = [pipe_latents(pipe, PROMPTS, x_t, 3, **run) for run in runs]
    refined_latents(pipe, tmp_path / "refiner", PROMPTS, SEEDS)
    assert unguided_call_kwargs(pipe)["pag_scale"] == 0.0
    for run, expected in zip(runs, before):
        assert torch.equal(pipe_latents(pipe, PROMPTS, x_t, 3, **run), expected)


def test_helper_refuses_another_model_schedule(dirs, tmp_path):
    """A v-prediction pipeline is another model than the epsilon model the refiner was trained on."""
    make_refiner("sd15_pndm_eps", dirs, tmp_path / "refiner")
    pipe = stock(StableDiffusionPipeline, dirs["sd_ddim_v"])
    with pytest.raises(ValueError, match="prediction_type: 'epsilon' vs 'v_prediction'"):
        refined_latents(pipe, tmp_path / "refiner", PROMPTS, SEEDS)
    assert "refiner" not in (getattr(pipe.unet, "peft_config", None) or {})


@pytest.mark.slow  # >= 1 s on an idle 2-core machine: `make test` only, not the fast lane
def test_helper_follows_the_pipeline_to_another_dtype_and_refiner(dirs, tmp_path):
    make_refiner("sd15_pndm_eps", dirs, tmp_path / "one", seed=1)
    make_refiner("sd15_pndm_eps", dirs, tmp_path / "two", seed=2)
    pipe = stock(StableDiffusionPipeline, dirs["sd15_pndm_eps"])
    one = refined_latents(pipe, tmp_path / "one", PROMPTS, SEEDS)
    pipe.to(torch.bfloat16)
    half = refined_latents(pipe, tmp_path / "one", PROMPTS, SEEDS)
    assert half.dtype == torch.bfloat16 and list(pipe.unet.peft_config) == ["refiner"]
    torch.testing.assert_close(half.float(), one, rtol=0, atol=0.1)
    pipe.to(torch.float32)
    two = refined_latents(pipe, tmp_path / "two", PROMPTS, SEEDS)
    assert list(pipe.unet.peft_config) == ["refiner"] and (two - one).abs().max() > 1e-4
    back = refined_latents(pipe, tmp_path / "one", PROMPTS, SEEDS)  # (the bfloat16 round trip rounded the UNet)
    assert list(pipe.unet.peft_config) == ["refiner"] and (back - two).abs().max() > 1e-4


def test_helper_validates_prompts_and_seeds(dirs, tmp_path):
    make_refiner("sd15_pndm_eps", dirs, tmp_path / "refiner")
    pipe = stock(StableDiffusionPipeline, dirs["sd15_pndm_eps"])
    with pytest.raises(ValueError, match="3 prompts for 2 seeds"):
        refined_latents(pipe, tmp_path / "refiner", PROMPTS + ["x"], SEEDS)
    one = refined_latents(pipe, tmp_path / "refiner", "a red cat", SEEDS)
    assert one.shape == (2, 4, 8, 8)
    torch.testing.assert_close(one, refined_latents(pipe, tmp_path / "refiner", ["a red cat"] * 2, SEEDS))


def test_dit_pipeline_with_refined_latents(dirs, tmp_path):
    refiner, backend = make_refiner("dit", dirs, tmp_path / "refiner")
    pipe = stock(DiTPipeline, dirs["dit"])
    latents = refined_latents(pipe, tmp_path / "refiner", ["207", "3"], SEEDS)
    torch.testing.assert_close(latents, refiner.refine(noise_from_seeds(SEEDS, backend.latent_shape), ["207", "3"]),
                               rtol=0, atol=1e-6)
    theirs = run_dit(pipe, latents, [207, 3], **unguided_call_kwargs(pipe))
    ours = rollout(backend, latents, backend.encode_prompts(["207", "3"]), 3)
    assert record("DiTPipeline refined latents, 3 steps", ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("name", ["sd15_pndm_eps", "sdxl_euler_leading"])
@pytest.mark.parametrize("layers", [["mid"], ["up_blocks.0"], ["down_blocks.1.attentions.0", "mid"]])
def test_pag_layers_select_the_modules_diffusers_selects(dirs, name, layers):
    """teacher.pag_layers are module-path prefixes ("mid" -> mid_block); diffusers searches them as regexes in the
    module names. For "mid" and for full prefixes the two select the same self-attention modules."""
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    backend = backend_of(name, dirs)
    ours = sorted(backend.pag_attention_modules(layers))
    pipe = stock(MODELS[name][3], dirs[name], pag_applied_layers=layers)
    pipe._set_pag_attn_processor(pag_applied_layers=layers, do_classifier_free_guidance=True)
    theirs = sorted(n for n, m in pipe.unet.named_modules()
                    if isinstance(getattr(m, "processor", None), PAGCFGIdentitySelfAttnProcessor2_0))
    assert ours == theirs and ours
