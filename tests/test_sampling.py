import copy

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

from diffusers.guiders import ClassifierFreeGuidance

from conftest import tiny_digits_backend
from noiserefine.backends.base import _layer_prefix
from noiserefine.guidance import PipelinePAG
from noiserefine.noise import noise_from_seeds
from noiserefine.sampling import (affine_coefficients, guided_output, initial_sigma, make_scheduler, rollout,
                                  rollout_gain, scale_model_input)


def CFG(scale):
    return ClassifierFreeGuidance(guidance_scale=scale)


def PAG(scale, pag_scale, layers=("mid",)):
    return PipelinePAG(guidance_scale=scale, perturbed_guidance_scale=pag_scale, pag_layers=list(layers))


def plain_forwards(denoiser) -> bool:
    """No guider hook left and every module's forward is its class's own (hooks and per-branch forwards gone)."""
    return all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook._hook_order
               for m in denoiser.modules()) and \
        all(getattr(m.forward, "__func__", None) is type(m).forward for m in denoiser.modules())

PROMPTS = ["a handwritten seven", "a handwritten digit 3", "a cat", "nine"]


def _inputs(backend, n=4):
    noise = noise_from_seeds(range(n), backend.latent_shape)
    return noise, backend.encode_prompts(PROMPTS[:n])


def test_cfg_batched_forward_equals_two_forwards(tiny_backend):
    noise, cond = _inputs(tiny_backend)
    t = torch.tensor(500)
    null = tiny_backend.null_conditioning(len(noise))
    with torch.no_grad():
        guider = CFG(3.0)
        guider.set_state(step=0, num_inference_steps=1, timestep=t)
        guided = guided_output(tiny_backend, guider, noise, t, cond, null)
        uncond = tiny_backend.denoise(noise, t, null)
        conditional = tiny_backend.denoise(noise, t, cond)
    torch.testing.assert_close(guided, uncond + 3.0 * (conditional - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(uncond, conditional, atol=1e-3), "conditioning must matter"


def test_guidance_scale_one_equals_unguided(tiny_backend):
    noise, cond = _inputs(tiny_backend)
    with torch.no_grad():
        unguided = rollout(tiny_backend, noise, cond, 5)
        scale_one = rollout(tiny_backend, noise, cond, 5, CFG(1.0))
        scale_three = rollout(tiny_backend, noise, cond, 5, CFG(3.0))
    torch.testing.assert_close(scale_one, unguided, rtol=1e-5, atol=1e-5)
    assert (scale_three - unguided).abs().max() > 1e-2


def test_pag_changes_output_and_restores_processors(tiny_backend):
    noise, cond = _inputs(tiny_backend)
    processors = dict(tiny_backend.denoiser.attn_processors)
    pag = PAG(2.0, 3.0)
    with torch.no_grad():
        before = rollout(tiny_backend, noise, cond, 4)
        cfg_only = rollout(tiny_backend, noise, cond, 4, CFG(2.0))
        with_pag = rollout(tiny_backend, noise, cond, 4, pag)
        after = rollout(tiny_backend, noise, cond, 4)
    assert (with_pag - cfg_only).abs().max() > 1e-3, "PAG term had no effect"
    assert torch.equal(before, after)
    restored = tiny_backend.denoiser.attn_processors
    assert all(restored[name] is proc for name, proc in processors.items())
    assert plain_forwards(tiny_backend.denoiser)


def test_pag_hooks_and_forwards_restored_on_error(tiny_backend, monkeypatch):
    noise, cond = _inputs(tiny_backend)
    calls = []

    def failing_step(*args, **kwargs):  # fails inside the batched call, perturbed forwards installed
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_backend.denoiser.mid_block, "forward", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        rollout(tiny_backend, noise, cond, 2, PAG(2.0, 3.0))
    monkeypatch.undo()
    assert calls and plain_forwards(tiny_backend.denoiser)


def test_pag_zero_scale_equals_cfg(tiny_backend):
    noise, cond = _inputs(tiny_backend)
    with torch.no_grad():
        cfg_only = rollout(tiny_backend, noise, cond, 3, CFG(2.0))
        pag0 = rollout(tiny_backend, noise, cond, 3, PAG(2.0, 0.0))
    torch.testing.assert_close(pag0, cfg_only, rtol=1e-4, atol=1e-5)


def test_pag_layer_matching_is_exact(tiny_backend):
    assert _layer_prefix("mid") == "mid_block"
    assert _layer_prefix("down.block_1") == "down_blocks.1"
    assert _layer_prefix("up.block_0.attentions_1") == "up_blocks.0.attentions.1"
    assert _layer_prefix("transformer_blocks.1") == "transformer_blocks.1"
    mid = tiny_backend.pag_attention_modules(["mid"])
    assert list(mid) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    up = tiny_backend.pag_attention_modules(["up.block_0.attentions_1"])
    assert list(up) == ["up_blocks.0.attentions.1.transformer_blocks.0.attn1"]
    with pytest.raises(ValueError, match="match no self-attention"):
        tiny_backend.pag_attention_modules(["up_blocks.0.attentions.10"])


def _finite_difference(scheduler, out, t, x, h=0.5):
    # the step is affine, so a large h is exact and avoids float32 round-off inside step()
    plus = copy.deepcopy(scheduler).step(out, t, x + h, return_dict=False)[0]
    minus = copy.deepcopy(scheduler).step(out, t, x - h, return_dict=False)[0]
    return (plus - minus) / (2 * h)


SCHEDULERS = {
    "ddim-epsilon": (DDIMScheduler, {}),
    "ddim-v": (DDIMScheduler, {"prediction_type": "v_prediction"}),
    "euler-epsilon": (EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "flow-euler": (FlowMatchEulerDiscreteScheduler, None),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_affine_coefficient_matches_finite_difference(name):
    scheduler_class, overrides = SCHEDULERS[name]
    backend = tiny_digits_backend()
    backend.scheduler_class = scheduler_class
    if overrides is None:
        backend.scheduler_config = dict(scheduler_class().config)
    else:
        base = {k: v for k, v in backend.scheduler_config.items() if k != "set_alpha_to_one"} \
            if scheduler_class is EulerDiscreteScheduler else backend.scheduler_config
        backend.scheduler_config = {**base, **overrides}
    num_steps = 6
    coefficients = affine_coefficients(backend, num_steps)
    scheduler = make_scheduler(backend, num_steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((3, 1, 4, 4), generator=generator, dtype=torch.float64) * initial_sigma(scheduler)
    for index, t in enumerate(scheduler.timesteps):
        out = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        scale_model_input(scheduler, x, t)
        derivative = _finite_difference(scheduler, out, t, x)
        torch.testing.assert_close(derivative, torch.full_like(x, coefficients[index].item()),
                                   rtol=1e-5, atol=1e-6)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    # Euler with epsilon (or flow velocity) output moves x by dt * output: a_t = 1 exactly.
    if name in ("flow-euler", "euler-epsilon"):
        assert torch.allclose(coefficients, torch.ones_like(coefficients))
    else:
        assert not torch.allclose(coefficients, torch.ones_like(coefficients))
    expected_gain = initial_sigma(scheduler) * coefficients.prod().item()
    assert rollout_gain(backend, num_steps) == pytest.approx(expected_gain)


def test_rollout_jacobian_equals_gain_when_output_is_frozen(tiny_backend, monkeypatch):
    """With a network output independent of its input, d x0 / d x_T = K exactly."""
    fixed = torch.randn((2, 1, 16, 16))
    monkeypatch.setattr(tiny_backend, "denoise", lambda x, t, cond: fixed * (1 + t / 1000))
    noise = torch.randn((2, 1, 16, 16), requires_grad=True)
    x0 = rollout(tiny_backend, noise, tiny_backend.null_conditioning(2), 7)
    x0.sum().backward()
    torch.testing.assert_close(noise.grad, torch.full_like(noise, rollout_gain(tiny_backend, 7)))


def test_non_affine_schedulers_are_refused():
    backend = tiny_digits_backend()
    backend.scheduler_class = DPMSolverMultistepScheduler
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        make_scheduler(backend, 5)
    clipped = tiny_digits_backend(scheduler_overrides={"clip_sample": True})
    with pytest.raises(ValueError, match="clip_sample"):
        make_scheduler(clipped, 5)


def test_rollout_in_threads_is_each_parts_own_rollout_and_the_guider_is_not_shared(tiny_backend):
    from noiserefine.evaluation.rows import EvalSet, rollout_in_threads, sample_row, torch_threads

    prompts = ["a handwritten one", "seven", "a handwritten two", "nine", "a cat"]
    noise = noise_from_seeds(range(5), tiny_backend.latent_shape)
    cond = tiny_backend.encode_prompts(prompts)
    guider = ClassifierFreeGuidance(guidance_scale=3.0)
    threads_before = torch.get_num_threads()
    split = rollout_in_threads(tiny_backend, noise, cond, 4, guider, 2)
    assert torch.get_num_threads() == threads_before
    # parts [0, 1, 2] and [3, 4], each exactly its own one-thread rollout (a shared guider's state would mix them)
    for part in (slice(0, 3), slice(3, 5)):
        with torch_threads(1):
                alone = rollout(tiny_backend, noise[part], {k: v[part] for k, v in cond.items()}, 4,
                            ClassifierFreeGuidance(guidance_scale=3.0))
        assert torch.equal(split[part], alone)
    # the whole batch on torch's threads: the same up to float rounding (values here reach ~40)
    torch.testing.assert_close(split, rollout(tiny_backend, noise, cond, 4, guider), rtol=1e-4, atol=1e-3)
    assert torch.equal(rollout_in_threads(tiny_backend, noise, cond, 4, guider, 2), split)  # deterministic
    # sample_row takes the split from the eval set, timing and NFE as before
    row = sample_row("g", tiny_backend, EvalSet(list(range(5)), prompts, sampling_threads=2), 4, guidance=guider)
    assert torch.equal(row.latents, split.float()) and row.nfe == 8
