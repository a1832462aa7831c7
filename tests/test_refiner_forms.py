"""The refiner's two forms (``refiner.form``): ``difference`` (2 calls) and ``single_call`` (1 call, zero head).

Both are exactly the identity at initialisation; the form is saved, loaded, refused when unknown, and
counted as the number of denoiser calls everywhere NFE are reported.
"""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import REFINER_PROMPTS as PROMPTS, randomise_lora, refiner_inputs, tiny_digits_backend
from noiserefine.backends import load_backend
from noiserefine.config import load_config
from noiserefine.refiner import (CONFIG_FILE, WEIGHTS_FILE, Refiner, adapters_enabled, load_refiner, save_refiner,
                                 saved_form)
from noiserefine.refiner_head import output_layer
from tiny_models import build_tiny_sd

FORMS = ["difference", "single_call"]
pytestmark = pytest.mark.usefixtures("one_thread")


def refiner_cfg(form: str, *overrides: str):
    return load_config(overrides=[f"refiner.form={form}", "refiner.lora_rank=4", "refiner.lora_alpha=4.0",
                                  *overrides])


def count_calls(denoiser: torch.nn.Module) -> list[int]:
    """A counter of the denoiser's forward calls (a list holding one int)."""
    calls = [0]
    denoiser.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("forms") / "sd")


def test_single_call_is_the_identity_at_init_bit_for_bit_on_the_digits_denoiser():
    backend = tiny_digits_backend()
    refiner = Refiner(backend, refiner_cfg("single_call").refiner)
    noise, cond = refiner_inputs(backend)
    assert torch.equal(refiner(noise, cond), noise)
    assert torch.equal(refiner.refine(noise, PROMPTS), noise)
    # the head is zero, the network is not: the same call with the base projection gives a non-zero output
    assert backend.denoise(noise, refiner.timestep, cond).abs().max() > 1e-3
    assert not adapters_enabled(backend.denoiser) and not output_layer(backend.denoiser)._forward_hooks
    randomise_lora(refiner)
    assert (refiner(noise, cond) - noise).abs().max() > 1e-3  # and it is not identity by construction


def test_single_call_is_the_identity_at_init_bit_for_bit_on_a_tiny_sd_unet(tiny_sd_dir):
    cfg = refiner_cfg("single_call", "model.backend=stable_diffusion", f"model.path={tiny_sd_dir}")
    backend = load_backend(cfg.model)
    assert backend.latent_shape[0] == 4 and type(backend.denoiser).__name__ == "UNet2DConditionModel"
    refiner = Refiner(backend, cfg.refiner)
    noise = torch.randn((3, *backend.latent_shape), generator=torch.Generator().manual_seed(0)) * 3
    cond = backend.encode_prompts(["a red cat", "the blue dog", ""])
    assert torch.equal(refiner(noise, cond), noise)
    assert backend.denoise(noise, refiner.timestep, cond).abs().max() > 1e-3


@pytest.mark.parametrize("form", FORMS)
def test_calls_per_refinement_are_counted(form):
    backend = tiny_digits_backend()
    refiner = Refiner(backend, refiner_cfg(form).refiner)
    calls = count_calls(backend.denoiser)
    noise, cond = refiner_inputs(backend)
    refiner(noise, cond)
    assert calls[0] == refiner.network_calls == {"difference": 2, "single_call": 1}[form]


def test_the_head_trains_from_the_first_step_and_the_lora_from_the_second():
    backend = tiny_digits_backend()
    refiner = Refiner(backend, refiner_cfg("single_call").refiner)
    noise, cond = refiner_inputs(backend)
    target = noise + 0.5
    optimizer = torch.optim.AdamW(refiner.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    head = list(refiner.head.parameters())
    lora_b = [p for n, p in backend.denoiser.named_parameters() if "lora_B" in n]
    assert head and lora_b and all(p.requires_grad for p in head)

    def step() -> None:
        optimizer.zero_grad()
        (refiner(noise, cond) - target).square().mean().backward()
        optimizer.step()

    step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    after_one = refiner(noise, cond).detach()
    assert (after_one - noise).abs().max() > 1e-4  # one optimizer step changes the output
    assert (after_one - target).square().mean() < (noise - target).square().mean()
    step()
    assert sum(p.grad.abs().sum() for p in lora_b) > 0  # the LoRA gets gradient through the non-zero head
    frozen = [p for n, p in backend.denoiser.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("form", FORMS)
def test_save_load_round_trip_keeps_the_form(form, tmp_path):
    cfg = refiner_cfg(form)
    refiner = Refiner(tiny_digits_backend(), cfg.refiner)
    randomise_lora(refiner)
    noise, _ = refiner_inputs(refiner.backend)
    expected = refiner.refine(noise, PROMPTS)
    save_refiner(refiner, tmp_path, cfg)
    assert OmegaConf.load(tmp_path / CONFIG_FILE).refiner.form == form == saved_form(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as handle:
        assert handle.metadata()["form"] == form
        assert any(k.startswith("output_head.") for k in handle.keys()) == (form == "single_call")
    loaded = load_refiner(tmp_path, tiny_digits_backend())
    assert loaded.form == form and loaded.network_calls == refiner.network_calls
    assert torch.equal(loaded.refine(noise, PROMPTS), expected)


def test_a_refiner_saved_before_forms_existed_loads_as_the_difference_form(tmp_path):
    cfg = refiner_cfg("difference")
    refiner = Refiner(tiny_digits_backend(), cfg.refiner)
    randomise_lora(refiner)
    noise, _ = refiner_inputs(refiner.backend)
    expected = refiner.refine(noise, PROMPTS)
    save_refiner(refiner, tmp_path, cfg)
    config = tmp_path / CONFIG_FILE
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith("form:")))
    assert "form" not in OmegaConf.load(config).refiner
    assert saved_form(tmp_path) == "difference"
    loaded = load_refiner(tmp_path, tiny_digits_backend())
    assert loaded.form == "difference" and loaded.network_calls == 2
    assert torch.equal(loaded.refine(noise, PROMPTS), expected)


def test_an_unknown_form_is_refused_naming_the_file_and_the_value(tmp_path):
    cfg = refiner_cfg("single_call")
    save_refiner(Refiner(tiny_digits_backend(), cfg.refiner), tmp_path, cfg)
    config = tmp_path / CONFIG_FILE
    config.write_text(config.read_text().replace("form: single_call", "form: triple_call"))
    backend = tiny_digits_backend()
    with pytest.raises(ValueError, match="triple_call") as error:
        load_refiner(tmp_path, backend)
    assert str(config) in str(error.value)
    assert "refiner" not in getattr(backend.denoiser, "peft_config", {})  # nothing attached
    with pytest.raises(ValueError, match="refiner.form"):
        load_config(overrides=["refiner.form=triple_call"])
    with pytest.raises(ValueError, match="triple_call"):
        Refiner(backend, {**OmegaConf.to_container(cfg.refiner), "form": "triple_call"})


def test_a_single_call_file_under_a_difference_config_is_refused(tmp_path):
    cfg = refiner_cfg("single_call")
    save_refiner(Refiner(tiny_digits_backend(), cfg.refiner), tmp_path, cfg)
    config = tmp_path / CONFIG_FILE
    config.write_text(config.read_text().replace("form: single_call", "form: difference"))
    with pytest.raises(ValueError, match="output_head"):
        load_refiner(tmp_path, tiny_digits_backend())


@pytest.mark.slow  # runs the sample command (~1 s each)
@pytest.mark.parametrize("form", FORMS)
def test_sample_and_evaluate_count_the_forms_calls(form, tmp_path):
    from noiserefine.evaluation.settings import REFINED_ROW, build_settings
    from noiserefine.sample import main as sample_main

    teacher = tmp_path / "teacher"
    tiny_digits_backend().save_pretrained(teacher)
    cfg = refiner_cfg(form, f"model.path={teacher}", "student.num_steps=2")
    save_refiner(Refiner(load_backend(cfg.model), cfg.refiner), tmp_path / "refiner", cfg)
    calls = {"difference": 2, "single_call": 1}[form]
    assert sample_main(["--refiner", str(tmp_path / "refiner"), "--prompt", "seven", "--seeds", "0",
                        "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "sample.json").read_text())["nfe_per_image"]["refined"] == 2 + calls
    rows = build_settings(cfg, None, 2, tmp_path / "refiner", None)
    assert [row.nfe for row in rows if row.slug == REFINED_ROW] == [2 + calls]


@pytest.mark.slow  # loads a stock pipeline (~2 s)
def test_refined_latents_of_a_stock_pipeline_with_a_single_call_refiner(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from noiserefine.noise import noise_from_seeds
    from noiserefine.pipelines import attach_refiner, refined_latents

    cfg = refiner_cfg("single_call", "model.backend=stable_diffusion", f"model.path={tiny_sd_dir}",
                      "student.num_steps=2")
    refiner = Refiner(load_backend(cfg.model), cfg.refiner)
    save_refiner(refiner, tmp_path / "zero", cfg)  # as initialised: the identity
    randomise_lora(refiner, std=0.05)
    save_refiner(refiner, tmp_path / "trained", cfg)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    seeds, prompts = [3, 4], ["a red cat", "the blue dog"]
    noise = noise_from_seeds(seeds, refiner.backend.latent_shape)
    assert torch.equal(refined_latents(pipe, tmp_path / "zero", prompts, seeds), noise)
    calls = count_calls(pipe.unet)
    latents = refined_latents(pipe, tmp_path / "trained", prompts, seeds)
    assert calls[0] == 1 and attach_refiner(pipe, tmp_path / "trained").network_calls == 1
    torch.testing.assert_close(latents, refiner.refine(noise, prompts), rtol=0, atol=1e-5)
    assert (latents - noise).abs().max() > 1e-3
    assert not output_layer(pipe.unet)._forward_hooks
